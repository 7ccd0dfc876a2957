"""Configuration validation: defaults, every error with its key path, the example file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from virtwatch.config import ConfigError, config_warnings, load_settings, parse_listen

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_without_a_file() -> None:
    s = load_settings(None)
    assert s.libvirt.uri == "qemu:///system"
    assert s.stats.poll_interval == 15.0
    assert s.stats.effective_poll_timeout == 10.0
    assert s.http.listen == ":9177"
    assert s.stats.groups == ("state", "cpu", "balloon", "vcpu", "interface", "block")


def test_example_config_loads_and_documents_every_key() -> None:
    example = ROOT / "config" / "virtwatch.example.toml"
    s = load_settings(example)
    assert s.libvirt.uri == "qemu:///system"
    text = example.read_text()
    # every key of every core section appears in the example (commented or set)
    for section in ("libvirt", "stats", "http", "metrics", "log", "daemon", "policy", "alerts", "console", "agent",
                    "demo"):
        model = getattr(s, section)
        for key in type(model).model_fields:
            documented = f"{key} =" in text or f"[{section}.{key}" in text or f"[[{section}.{key}]]" in text
            assert documented, f"{section}.{key} undocumented"
    from virtwatch.policy.config import GuestPolicy
    for key in GuestPolicy.model_fields:
        assert f"\n{key} =" in text, f"policy.defaults.{key} undocumented"
    assert s.policy.defaults == GuestPolicy()  # the example shows the defaults


def test_unknown_keys_and_bad_values_name_their_path(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[stats]\npoll_intervall = 5\npoll_interval = -1\n[libvirt]\nkeepalive_count = "x"\n'
                   '[http]\nlisten = "nope"\n[bogus]\n')
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    errors = info.value.errors
    joined = "\n".join(errors)
    assert "stats.poll_intervall: unknown key" in joined
    assert "stats.poll_interval: Input should be greater than or equal to 0.1" in joined
    assert "libvirt.keepalive_count" in joined
    assert "http.listen: expected HOST:PORT, got 'nope'" in errors  # the validator's words, no "Value error, "
    assert "bogus: unknown key" in joined
    assert len(errors) == 5


def test_toml_syntax_error(tmp_path: Path) -> None:
    cfg = tmp_path / "syntax.toml"
    cfg.write_text("[stats\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.errors[0].startswith("TOML syntax")


def test_overrides_win_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[libvirt]\nuri = "qemu:///system"\n[stats]\npoll_interval = 30\n')
    s = load_settings(cfg, {"libvirt.uri": "test:///default", "stats.poll_interval": 2.0, "http.listen": None})
    assert s.libvirt.uri == "test:///default"
    assert s.stats.poll_interval == 2.0
    assert s.stats.effective_poll_timeout == pytest.approx(1.6)
    assert s.http.listen == ":9177"


def test_warning_for_timeout_longer_than_interval() -> None:
    s = load_settings(None, {"stats.poll_interval": 2.0, "stats.poll_timeout": 5.0})
    assert any("poll_timeout" in w for w in config_warnings(s))


@pytest.mark.parametrize("value,expected", [(":9177", (None, 9177)), ("127.0.0.1:80", ("127.0.0.1", 80)),
                                            ("[::1]:9177", ("::1", 9177))])
def test_parse_listen(value: str, expected: tuple) -> None:
    assert parse_listen(value) == expected


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = ROOT / "config" / "virtwatch.example.toml"
    r = subprocess.run([sys.executable, "-m", "virtwatch", "check-config", str(good)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[stats]\npoll_interval = 0\nfoo = 1\n")
    r = subprocess.run([sys.executable, "-m", "virtwatch", "check-config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "stats.poll_interval" in r.stderr and "stats.foo: unknown key" in r.stderr
    assert "2 problems" in r.stderr


def test_check_config_also_validates_the_web_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[http]\nweb_config_file = "{tmp_path / "missing-web.yml"}"\n')
    r = subprocess.run([sys.executable, "-m", "virtwatch", "check-config", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing-web.yml" in r.stderr


def test_demo_config_loads() -> None:
    s = load_settings(ROOT / "config" / "virtwatch.demo.toml")
    assert s.daemon.socket == str(ROOT / "config" / "../.demo/virtwatch.sock") and s.agent.enabled is False


def test_found_by_a_new_user_are_errors_now(tmp_path) -> None:
    # non-UTF-8 bytes: a clear error (a SIGHUP with such a file used to kill the daemon)
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[libvirt]\n")
    with pytest.raises(ConfigError) as err:
        load_settings(bad)
    assert err.value.errors == ["not valid UTF-8 (TOML files are UTF-8): byte 0"]
    # the bounds of [policy.defaults] hold in rules and profiles too; booleans are booleans
    cases = {
        "policy.match.0.restart_delay": {"policy.match": [{"glob": "w*", "restart_delay": -2}]},
        "policy.profile.p.console_buffer": {"policy.profile": {"p": {"console_buffer": 0}}},
        "policy.defaults.capture_console": {"policy.defaults": {"capture_console": "yes"}},
        "console.enabled": {"console.enabled": "yes"},
        "daemon.socket": {"daemon.socket": ""},
        "libvirt.uri": {"libvirt.uri": ""},
    }
    for path, overrides in cases.items():
        with pytest.raises(ConfigError) as err:
            load_settings(None, overrides)
        assert [e.split(":")[0] for e in err.value.errors] == [path]


def test_console_capture_makes_auto_read_write() -> None:
    from virtwatch.config import wants_read_only

    assert wants_read_only(load_settings(None, {})) is True
    assert wants_read_only(load_settings(None, {"console.guests": ["db*"]})) is False
    assert wants_read_only(load_settings(None, {"policy.match": [{"glob": "w*", "capture_console": True}]})) is False
    assert wants_read_only(load_settings(None, {"console.guests": ["db*"], "console.enabled": False})) is True
    assert wants_read_only(load_settings(None, {"console.guests": ["db*"], "libvirt.read_only": "yes"})) is True


def test_toml_types_are_strict_and_errors_name_the_key(tmp_path: Path) -> None:
    """Issue 13: lax conversions (a string, a boolean or a float with no fraction for a number)
    are errors naming the key, in every section, policy tables included."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[stats]\npoll_interval = "15"\nmax_stuck_lanes = 2.0\n[libvirt]\nkeepalive_count = true\n'
                   '[policy.defaults]\nrestart_delay = "5"\n[[policy.match]]\nglob = "x"\nlimit_burst = "3"\n'
                   '[console]\nbuffer_kib = "8"\nbogus = 1\n')
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    assert err.value.errors == [
        "stats.poll_interval: expected a number, got the string '15' (TOML types are strict: no quotes around numbers)",
        "stats.max_stuck_lanes: expected an integer, got 2.0",
        "libvirt.keepalive_count: expected an integer, got the boolean true",
        "policy.defaults.restart_delay: expected a number, got the string '5' (TOML types are strict: no quotes "
        "around numbers)",
        "policy.match.0.limit_burst: expected an integer, got the string '3' (TOML types are strict: no quotes "
        "around numbers)",
        "console.buffer_kib: expected an integer, got the string '8' (TOML types are strict: no quotes around "
        "numbers)",
        "console.bogus: unknown key",
    ]
    cfg.write_text('[stats]\npoll_interval = 15\n[policy.defaults]\non_host_shutdown = ["managedsave:300"]\n')
    s = load_settings(cfg)  # an integer for a float is a number; strings the model parses stay allowed
    assert s.stats.poll_interval == 15.0 and s.policy.defaults.on_host_shutdown[0].timeout == 300.0


def test_relative_paths_resolve_from_the_config_files_directory(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "virtwatch.toml"
    cfg.write_text('[http]\nweb_config_file = "web.yml"\n[daemon]\nstate_dir = "../state"\nsocket = "/run/x.sock"\n'
                   'boot_id_file = "boot"\n[alerts]\nbearer_token_file = "sub/token"\n')
    s = load_settings(cfg)
    etc = tmp_path / "etc"
    assert s.http.web_config_file == str(etc / "web.yml")
    assert s.daemon.state_dir == str(etc / "../state")
    assert s.daemon.socket == "/run/x.sock"  # absolute: unchanged
    assert s.daemon.boot_id_file == str(etc / "boot")
    assert s.alerts.bearer_token_file == str(etc / "sub/token")
    # command-line values are taken as given (relative to the working directory, as a shell user expects)
    assert load_settings(None, {"daemon.state_dir": "st"}).daemon.state_dir == "st"


def test_every_path_key_is_resolved() -> None:
    """A new ``*_file``, ``*_dir`` or ``socket`` key must join PATH_KEYS (or be told apart here)."""
    from virtwatch.config import PATH_KEYS, Settings

    pathlike = {f"{section}.{key}" for section, field in Settings.model_fields.items()
                for key in field.annotation.model_fields  # type: ignore[union-attr]
                if key.endswith(("_file", "_dir")) or key == "socket"}
    assert pathlike - {"console.read_log_file"} == set(PATH_KEYS)  # read_log_file is a switch, not a path
