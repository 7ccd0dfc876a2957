"""Libraries a feature needs are imported only when that feature is on (issue 16: RSS)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys
    import virtwatch.cli.main, virtwatch.cli.run, virtwatch.app  # everything `virtwatch run` imports
    {then}
    print(" ".join(m for m in ("yaml", "bcrypt") if m in sys.modules))
""")


def loaded(then: str = "") -> set[str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(then=then)], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_daemon_imports_neither_pyyaml_nor_bcrypt_without_a_web_config() -> None:
    assert loaded() == set()


@pytest.mark.parametrize(("web_config", "expected"), [
    ("http_server_config:\n  headers:\n    X-Frame-Options: deny\n", {"yaml"}),
    ("basic_auth_users:\n  u: $2b$04$abcdefghijklmnopqrstuu5l4Q2.vPVOq9jYVbSRp9lXQAu0R4R.u\n", {"yaml", "bcrypt"}),
])
def test_a_web_config_brings_pyyaml_and_users_bring_bcrypt(tmp_path, web_config: str, expected: set[str]) -> None:
    path = tmp_path / "web.yml"
    path.write_text(web_config)
    then = textwrap.dedent(f"""
        from virtwatch.web.webconfig import load_web_config
        from virtwatch.web import basic_auth_middleware
        cfg = load_web_config({str(path)!r})
        if cfg.basic_auth_users:
            basic_auth_middleware(cfg.basic_auth_users)
    """)
    assert loaded(then) == expected
