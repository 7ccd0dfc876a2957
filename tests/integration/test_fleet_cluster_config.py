"""config/fleet/alertmanager-cluster.default started for real: three Alertmanagers with the
shipped cluster flags (host names and ports made local) form one gossip cluster."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostlib.promstack import AM_CONFIG, _Server, binary, free_port, http_json, wait_until

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "fleet" / "alertmanager-cluster.default"


def shipped_args() -> list[str]:
    (line,) = re.findall(r'^ARGS="(.*)"$', SHIPPED.read_text(), re.M)
    return shlex.split(line)


class Peer(_Server):
    """One Alertmanager run with the shipped flags of am1, rewritten for node ``index`` on loopback
    (the file says am2 and am3 list the other two the same way)."""

    name = "alertmanager"

    def __init__(self, workdir: Path, index: int, gossip: list[int]) -> None:
        super().__init__(workdir)
        (workdir / "alertmanager.yml").write_text(AM_CONFIG)
        local = {f"am{i + 1}.example.org:9094": f"127.0.0.1:{port}" for i, port in enumerate(gossip)}
        me = f"am{index + 1}.example.org:9094"
        self.gossip_address = local[me]
        args = []
        for arg in shipped_args():
            flag, _, value = arg.partition("=")
            if flag == "--config.file":
                value = str(workdir / "alertmanager.yml")
            elif flag == "--storage.path":
                value = str(workdir / "data")
            elif flag == "--web.listen-address":
                value = f"127.0.0.1:{self.port}"
            elif flag == "--cluster.listen-address":
                value = f"127.0.0.1:{gossip[index]}"
            elif flag == "--cluster.advertise-address":
                value = local[me]
            elif flag == "--cluster.peer":
                continue  # rewritten below: every node lists the two others
            args.append(f"{flag}={value}")
        args += [f"--cluster.peer={addr}" for name, addr in local.items() if name != me]
        self.args = args

    def command(self) -> list[str]:
        return [binary("prometheus-alertmanager", "alertmanager"), *self.args, "--log.level=warn"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Peer]]:
    gossip = [free_port() for _ in range(3)]
    peers = [Peer(tmp_path / f"am{i + 1}", i, gossip) for i in range(3)]
    try:
        for p in peers:
            p.start()
        yield peers
    finally:
        for p in peers:
            p.stop()


def test_the_shipped_flags_form_a_three_node_cluster(cluster: list[Peer]) -> None:
    flags = shipped_args()
    assert sum(f.startswith("--cluster.peer=") for f in flags) == 2  # am1 lists am2 and am3
    for p in cluster:
        status = wait_until(lambda p=p: (s := http_json(p.url + "/api/v2/status"))["cluster"]["status"] == "ready"
                            and len(s["cluster"].get("peers", [])) == 3 and s, 30, "cluster of three",
                            detail=p.log_text)
        assert {peer["address"] for peer in status["cluster"]["peers"]} == {c.gossip_address for c in cluster}
