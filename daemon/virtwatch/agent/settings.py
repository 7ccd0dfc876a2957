"""``[agent]``: the guest-agent settings and the address filter they describe.

Apart from the agent's lane (:mod:`virtwatch.agent.lane`) so that :mod:`virtwatch.config`
can import the section without importing the feature.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import ipaddress

from pydantic import BaseModel, ConfigDict, Field, StrictBool

#: Guest interfaces whose addresses are not exported by default: container runtimes' and
#: CNI plugins' bridges, veth pairs and tunnels, nested libvirt/LXC bridges.
DEFAULT_SKIP_INTERFACES = ("docker*", "br-*", "veth*", "cni*", "flannel*", "cali*", "vxlan.calico", "tunl*",
                           "weave*", "kube-ipvs*", "cilium_*", "lxc*", "podman*", "virbr*", "nerdctl*")


class AgentSettings(BaseModel):
    """``[agent]``: guest agent queries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: StrictBool = Field(True, description="query guest agents")
    interval: float = Field(60.0, ge=0.1, le=86400, description="seconds between refreshes of one guest")
    timeout: int = Field(5, ge=1, le=300, description="agentSetResponseTimeout, seconds; our own deadline adds 2 s")
    startup_delay: float = Field(1.0, ge=0, le=600,
                                 description="wait after AGENT_LIFECYCLE CONNECTED before the first query, seconds")
    skip_loopback: StrictBool = Field(True, description="leave out loopback addresses (127.0.0.0/8, ::1)")
    skip_link_local: StrictBool = Field(True, description="leave out link-local addresses (169.254.0.0/16, fe80::/10)")
    skip_interfaces: tuple[str, ...] = Field(
        DEFAULT_SKIP_INTERFACES,
        description="guest interface name globs (fnmatch) whose addresses are left out: container bridges, veths")

    @property
    def address_filter(self) -> AddressFilter:
        """The address filter these settings describe."""
        return AddressFilter(self.skip_loopback, self.skip_link_local, self.skip_interfaces)


@dataclasses.dataclass(frozen=True, slots=True)
class AddressFilter:
    """Which guest addresses to leave out: loopback, link-local, and any address of an
    interface whose name matches one of ``interfaces`` (shell globs, case-sensitive)."""

    loopback: bool = True
    link_local: bool = True
    interfaces: tuple[str, ...] = DEFAULT_SKIP_INTERFACES

    def skips(self, interface: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when ``address`` on guest interface ``interface`` is to be left out."""
        return ((self.loopback and address.is_loopback) or (self.link_local and address.is_link_local)
                or any(fnmatch.fnmatchcase(interface, glob) for glob in self.interfaces))
