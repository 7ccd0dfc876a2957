"""Fixtures for the service integration tests: a throwaway PKI made with the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PKI:
    """Paths of a test CA, a server cert for 127.0.0.1/localhost, and client certs."""

    dir: Path
    ca_crt: Path
    server_crt: Path
    server_key: Path
    client_ca_crt: Path
    client_crt: Path
    client_key: Path
    other_ca_crt: Path  # a CA that signed nothing here: verification must fail


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN=virtwatch test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def _make_leaf(d: Path, name: str, ca: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=d,
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.fail("openssl CLI missing: it is in .ci/apt-packages.txt")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "clientca", "otherca"):
        _make_ca(d, ca)
    _make_leaf(
        d, "server", "ca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    _make_leaf(
        d, "client", "clientca",
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    return PKI(
        dir=d,
        ca_crt=d / "ca.crt",
        server_crt=d / "server.crt",
        server_key=d / "server.key",
        client_ca_crt=d / "clientca.crt",
        client_crt=d / "client.crt",
        client_key=d / "client.key",
        other_ca_crt=d / "otherca.crt",
    )
