"""The .deb, installed the way a Debian administrator would (issue 13, "Prove it").

``make deb`` builds two packages (the tree's version and a higher one, in parallel); a fresh
Debian 12 root made by mmdebstrap (cached as a tarball under ``$VIRTWATCH_PACKAGE_CACHE``,
default ``/var/cache/virtwatch-test``: the bootstrap is paid once per machine) boots under
``systemd-nspawn --boot`` with a private network, and runs its own libvirtd (Debian's
libvirt-daemon-system, qemu:///system, no guests). The host's libvirtd and guests are
never touched. In that container:

1. ``dpkg -i`` the package: the postinst creates the user, starts the socket and the service;
   /metrics answers with ``libvirt_up 1`` on the read-only socket, and the daemon's process
   has no ``libvirt`` group.
2. A conf.d drop-in enables policy actions, then ``systemctl reload``: libvirtd (polkit)
   refuses read-write access, the daemon warns once per feature that cannot work and goes
   on monitoring read-only. With the shipped polkit rule enabled, the next start is
   read-write.
3. An upgrade to the higher version keeps the state directory, the changed conffile and
   the drop-in, and restarts the service; ``dpkg -r`` keeps the state, ``dpkg -P`` removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("VIRTWATCH_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the root needs to run the package offline: its Depends (python3.11, libvirt0, systemd),
# a libvirtd to talk to, polkitd (it decides read-write access), curl to scrape.
ROOT_PACKAGES = ["systemd", "systemd-sysv", "dbus", "polkitd", "libvirt-daemon-system", "libvirt-daemon-driver-qemu",
                 "libvirt0", "python3.11", "curl", "procps"]
ROOT_HOOKS = [
    # No console getty (the console is not a terminal here), no default network (no dnsmasq).
    'ln -sf /dev/null "$1/etc/systemd/system/console-getty.service"',
    'rm -f "$1/etc/libvirt/qemu/networks/autostart/default.xml"',
]
TIMEOUT = 120


def _cache_dir() -> Path:
    return Path(os.environ.get("VIRTWATCH_PACKAGE_CACHE") or "/var/cache/virtwatch-test")


def root_tarball() -> Path:
    """The bootstrapped Debian 12 root, made by mmdebstrap on first use (about a minute)."""
    key = hashlib.sha256(json.dumps([MIRROR, ROOT_PACKAGES, ROOT_HOOKS]).encode()).hexdigest()[:12]
    tarball = _cache_dir() / f"bookworm-{key}.tar"
    if tarball.exists():
        return tarball
    tarball.parent.mkdir(parents=True, exist_ok=True)
    tmp = tarball.with_suffix(".tmp.tar")
    cmd = ["mmdebstrap", "--variant=minbase", "--aptopt=APT::Install-Recommends \"false\"",
           "--include=" + ",".join(ROOT_PACKAGES), *(f"--customize-hook={h}" for h in ROOT_HOOKS),
           "bookworm", str(tmp), MIRROR]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"mmdebstrap failed:\n{r.stderr[-4000:]}"
    tmp.rename(tarball)
    return tarball


def build_debs(out: Path, versions: list[str]) -> dict[str, Path]:
    """``make deb`` once per version, in parallel; ``versions[0]`` is the tree's own."""
    procs = {}
    for i, version in enumerate(versions):
        args = ["make", "-C", str(REPO), "deb", f"DEB_BUILDDIR={out}/build{i}", f"DEB_OUTDIR={out}"]
        if i:
            args.append(f"DEB_VERSION={version}")
        log = open(out / f"build{i}.log", "w")  # noqa: SIM115 -- closed below
        procs[version] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log)
    debs = {}
    for version, (proc, log) in procs.items():
        code = proc.wait(timeout=900)
        log.close()
        text = Path(log.name).read_text()
        assert code == 0, f"make deb ({version}) failed:\n{text[-4000:]}"
        debs[version] = out / f"virtwatch_{version}_amd64.deb"
        assert debs[version].exists(), text[-2000:]
    return debs


def tree_version() -> str:
    """The version ``make deb`` gives the package by default: pyproject's."""
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


class Container:
    """A booted systemd-nspawn container of ``root``; :meth:`sh` runs a command in it."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self._log = open(log, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--boot", "--quiet", "-D", str(root), f"--machine=vwpkg{os.getpid()}",
             "--register=no", "--keep-unit", "--private-network", "--console=pipe", "--resolv-conf=off",
             "--timezone=off", "--link-journal=no"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = self._find_leader()

    def _find_leader(self) -> int:
        """The container's PID 1: the descendant of nspawn whose innermost PID is 1."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"systemd-nspawn exited ({self.proc.returncode}): {self.log_text()}"
            for pid in self._descendants(self.proc.pid):
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                nspid = next((ln.split()[1:] for ln in status.splitlines() if ln.startswith("NSpid:")), [])
                if len(nspid) > 1 and nspid[-1] == "1":
                    return pid
            time.sleep(0.1)
        raise AssertionError(f"no container init found: {self.log_text()}")

    @staticmethod
    def _descendants(pid: int) -> list[int]:
        out, todo = [], [pid]
        while todo:
            p = todo.pop()
            try:
                children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            except OSError:
                continue
            out.extend(int(c) for c in children)
            todo.extend(int(c) for c in children)
        return out

    def log_text(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text()[-3000:]

    def sh(self, script: str, check: bool = True, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``script`` with /bin/sh as root inside the container (all its namespaces)."""
        r = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "-C", "--", "/usr/bin/env", "-i",
             "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
             "SYSTEMD_PAGER=", "/bin/sh", "-c", script],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"{script!r} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return r

    def wait_for(self, script: str, timeout: float = 60) -> str:
        """Run ``script`` until it succeeds; its stdout."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.sh(script, check=False)
            if r.returncode == 0:
                return r.stdout
            if time.monotonic() > deadline:
                raise AssertionError(f"{script!r} did not succeed within {timeout}s:\n{r.stdout}\n{r.stderr}")
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            self._log.close()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="virtwatch-package-", dir="/var/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def status(ct: Container) -> dict:
    return json.loads(ct.sh("curl -sf http://127.0.0.1:9177/api/v1/status").stdout)


def main_pid(ct: Container) -> int:
    return int(ct.sh("systemctl show -p MainPID --value virtwatch.service").stdout.strip())


def restart_and_wait(ct: Container, how: str = "restart") -> None:
    ct.sh(f"systemctl {how} virtwatch.service")
    ct.wait_for("curl -sf http://127.0.0.1:9177/readyz")


def test_deb_install_least_privilege_upgrade_purge(workdir: Path) -> None:  # noqa: PLR0915 -- one story
    started = time.monotonic()
    v1 = tree_version()
    v2 = f"{v1}+upgrade1"
    tarball = root_tarball()
    debs = build_debs(workdir, [v1, v2])
    root = workdir / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "-xf", str(tarball)], check=True, timeout=300)
    for deb in debs.values():
        shutil.copy(deb, root / "srv" / deb.name)
    ct = Container(root, workdir / "container.log")
    try:
        # systemd and libvirtd (socket-activated) in the container
        ct.wait_for("systemctl is-system-running | grep -E -q '^(running|degraded)$'", timeout=90)
        ct.wait_for("virsh -c qemu:///system uri")

        # 1. install: started by the postinst, monitoring on the read-only socket, no libvirt group
        ct.sh(f"dpkg -i /srv/{debs[v1].name}")
        assert ct.sh("systemctl is-enabled virtwatch.service virtwatch.socket").stdout.split() == ["enabled"] * 2
        assert ct.sh("systemctl is-enabled virtwatch-guests-save.service", check=False).stdout.strip() == "disabled"
        ct.wait_for("curl -sf http://127.0.0.1:9177/readyz")
        metrics = ct.sh("curl -sf http://127.0.0.1:9177/metrics").stdout
        assert "libvirt_up 1.0" in metrics
        assert "libvirt_version_info{" in metrics and 'driver="QEMU"' in metrics
        st = status(ct)
        assert st["read_only"] is True and st["write_denied"] is None  # auto: nothing asked for write access
        pid = main_pid(ct)
        proc_status = ct.sh(f"cat /proc/{pid}/status").stdout
        fields = {ln.split(":", 1)[0]: ln.split(":", 1)[1].split() for ln in proc_status.splitlines()}
        virtwatch_uid = ct.sh("id -u virtwatch").stdout.strip()
        libvirt_gid = ct.sh("getent group libvirt | cut -d: -f3").stdout.strip()
        assert libvirt_gid, "libvirt-daemon-system made no libvirt group"
        assert fields["Uid"][0] == virtwatch_uid
        assert libvirt_gid not in fields["Groups"], fields["Groups"]
        assert "libvirt" not in ct.sh("id -nG virtwatch").stdout.split()
        # the man page, the completions and the shipped configuration
        assert ct.sh("test -s /usr/share/man/man8/virtwatch.8.gz && "
                     "grep -q check-config /usr/share/bash-completion/completions/virtwatch && "
                     "grep -q check-config /usr/share/zsh/vendor-completions/_virtwatch", check=False).returncode == 0
        assert "/etc/virtwatch/virtwatch.toml" in ct.sh("cat /var/lib/dpkg/info/virtwatch.conffiles").stdout
        assert ct.sh("virtwatch check-config /etc/virtwatch/virtwatch.toml").stdout.strip().endswith("OK")

        # 2. a drop-in enables policy: check-config says what to grant; without it, a warning per feature
        ct.sh("printf '[policy]\\nenabled = true\\n' > /etc/virtwatch/conf.d/50-policy.toml")
        note = ct.sh("virtwatch check-config /etc/virtwatch/virtwatch.toml").stderr
        assert "read-write libvirt access is needed by policy actions" in note and "polkit" in note
        restart_and_wait(ct, "reload")  # SIGHUP re-reads the file and its drop-ins
        ct.wait_for("journalctl -u virtwatch.service -o cat | grep -q feature_unavailable", timeout=30)
        st = status(ct)
        assert st["connected"] is True and st["read_only"] is True and st["write_denied"], st
        assert "libvirt_up 1.0" in ct.sh("curl -sf http://127.0.0.1:9177/metrics").stdout  # monitoring goes on
        logged = ct.sh("journalctl -u virtwatch.service -o cat | grep feature_unavailable").stdout.splitlines()
        features = [json.loads(line)["feature"] for line in logged]
        assert len(features) == len(set(features)) and any(f.startswith("policy") for f in features), logged
        # journald priorities (issue 13, item 3, another branch): strict once the daemon writes them
        installed_logs = ct.sh("cat /usr/lib/virtwatch/lib/python3*/site-packages/virtwatch/logs.py").stdout
        warnings_only = ct.sh("journalctl -u virtwatch.service -p warning -o cat").stdout
        if "JOURNAL_STREAM" in installed_logs:
            assert "feature_unavailable" in warnings_only, warnings_only
        else:
            print("NOTE: journald priorities not in this tree yet: journalctl -p warning not asserted")
        # the shipped polkit rule grants read-write access to the virtwatch user
        ct.sh("cp /usr/share/virtwatch/polkit/50-virtwatch-libvirt.rules /etc/polkit-1/rules.d/")
        restart_and_wait(ct)
        st = status(ct)
        assert st["read_only"] is False and st["write_denied"] is None, st
        ct.wait_for("test -s /var/lib/virtwatch/virtwatch.sqlite")  # the policy engine's state

        # 3. upgrade keeps state, the admin's conffile change and the drop-in; restarts the service
        ct.sh("echo virtwatch-state-marker > /var/lib/virtwatch/marker && chown virtwatch: /var/lib/virtwatch/marker")
        ct.sh("echo '# changed by the admin' >> /etc/virtwatch/virtwatch.toml")
        before = main_pid(ct)
        ct.sh(f"dpkg -i /srv/{debs[v2].name}")
        assert ct.sh("dpkg-query -W -f '${Version}' virtwatch").stdout == v2
        ct.wait_for("curl -sf http://127.0.0.1:9177/readyz")
        assert main_pid(ct) != before
        assert ct.sh("cat /var/lib/virtwatch/marker").stdout.strip() == "virtwatch-state-marker"
        assert ct.sh("test -s /var/lib/virtwatch/virtwatch.sqlite", check=False).returncode == 0
        assert "# changed by the admin" in ct.sh("cat /etc/virtwatch/virtwatch.toml").stdout
        assert ct.sh("test -f /etc/virtwatch/conf.d/50-policy.toml", check=False).returncode == 0

        # remove keeps state and configuration; purge removes the state and the conffile
        ct.sh("dpkg -r virtwatch")
        assert ct.sh("systemctl is-active virtwatch.service", check=False).stdout.strip() != "active"
        assert ct.sh("test -f /var/lib/virtwatch/marker && test -f /etc/virtwatch/virtwatch.toml",
                     check=False).returncode == 0
        ct.sh("dpkg -P virtwatch")
        assert ct.sh("test -e /var/lib/virtwatch", check=False).returncode != 0
        assert ct.sh("test -e /etc/virtwatch/virtwatch.toml", check=False).returncode != 0
        assert ct.sh("test -e /usr/lib/virtwatch", check=False).returncode != 0
    except BaseException:
        print(ct.log_text())
        print(ct.sh("journalctl -u virtwatch.service --no-pager -n 80", check=False).stdout)
        raise
    finally:
        ct.stop()
    print(f"test_package: {time.monotonic() - started:.0f} s")
