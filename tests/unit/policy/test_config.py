"""[policy] settings: defaults, validation, warnings."""

import pydantic
import pytest

from virtwatch.config import ConfigError, config_warnings, settings_from_mapping
from virtwatch.policy.config import GuestPolicy, PolicySettings, ShutdownStep


def test_defaults_are_complete_and_described():
    s = PolicySettings()
    assert s.enabled is False and s.mode == "enforce"
    assert s.max_parallel_starts == 2 and s.max_parallel_restores == 1
    g = s.defaults
    assert (g.on_crash, g.on_qemu_failure, g.on_host_kill) == ("restart", "restart", "restart")
    assert (g.on_poweroff, g.on_destroy, g.on_watchdog, g.on_io_error) == ("leave", "leave", "restart", "leave")
    assert g.on_restore_failure == "keep"
    assert g.capture_console is False and g.console_buffer == 64
    assert [st.action for st in g.on_host_shutdown] == ["managedsave", "shutdown", "destroy"]
    for model in (GuestPolicy, PolicySettings, ShutdownStep):
        for key, f in model.model_fields.items():
            assert f.description, f"{model.__name__}.{key} has no description"


def test_full_section_via_top_level_loader():
    s = settings_from_mapping({"policy": {
        "enabled": True, "mode": "dry-run", "debounce": 0.2,
        "defaults": {"restart_delay": 10, "limit_burst": 3, "limit_interval": 300},
        "profile": {"critical": {"limit_burst": 10, "on_poweroff": "restart", "priority": 50}},
        "match": [{"glob": "web*", "profile": "critical", "mode": "enforce", "restart_delay": 2},
                  {"metadata": {"tier": "db"}, "on_io_error": "resume"}],
    }})
    p = s.policy
    assert p.mode == "dry-run" and p.debounce == 0.2
    assert p.defaults.restart_delay == 10.0
    assert p.profile["critical"].limit_burst == 10 and p.profile["critical"].on_crash is None
    assert p.match[0].glob == "web*" and p.match[0].restart_delay == 2.0
    assert p.match[1].metadata == {"tier": "db"}


@pytest.mark.parametrize("bad, path", [
    ({"defaults": {"on_crashh": "restart"}}, "policy.defaults.on_crashh: unknown key"),
    ({"defaults": {"on_io_error": "reboot"}}, "policy.defaults.on_io_error"),
    ({"profile": {"p": {"bogus": 1}}}, "policy.profile.p.bogus: unknown key"),
    ({"match": [{"glob": "x", "nope": 1}]}, "policy.match.0.nope: unknown key"),
    ({"match": [{"profile": "p"}]}, "at least one selector"),
    ({"match": [{"glob": "x", "profile": "missing"}]}, "unknown profile 'missing'"),
    ({"match": [{"regex": "(unclosed"}]}, "invalid regular expression"),
    ({"defaults": {"console_failure_patterns": ["BUG:", ""]}}, "matches an empty line"),
    ({"defaults": {"console_failure_patterns": ["panic|"]}}, "matches an empty line"),
    ({"defaults": {"limit_burst": 0}}, "policy.defaults.limit_burst"),
    ({"defaults": {"on_host_shutdown": []}}, "at least one step"),
    ({"defaults": {"on_host_shutdown": ["hibernate:10"]}}, "policy.defaults.on_host_shutdown"),
])
def test_errors_name_their_key(bad, path):
    with pytest.raises(ConfigError) as exc:
        settings_from_mapping({"policy": bad})
    assert any(path in e for e in exc.value.errors), exc.value.errors


def test_shutdown_steps_string_forms():
    g = GuestPolicy(on_host_shutdown="managedsave:30, destroy")
    assert g.on_host_shutdown == (ShutdownStep(action="managedsave", timeout=30.0),
                                  ShutdownStep(action="destroy", timeout=120.0))
    g2 = GuestPolicy(on_host_shutdown=[{"action": "shutdown", "timeout": 5}])
    assert g2.on_host_shutdown == (ShutdownStep(action="shutdown", timeout=5.0),)


def test_models_are_frozen():
    s = PolicySettings()
    with pytest.raises(pydantic.ValidationError):
        s.defaults.restart_delay = 1  # type: ignore[misc]


def test_warning_when_interval_too_short_for_burst():
    s = PolicySettings.model_validate({"defaults": {"limit_burst": 5, "restart_delay": 120, "limit_interval": 600}})
    w = s.warnings()
    assert len(w) == 1
    assert w[0].startswith("policy.defaults: limit_interval (600 s) <= limit_burst (5) * restart_delay (120 s)")


def test_warning_follows_profile_and_rule_layers():
    s = PolicySettings.model_validate({
        "profile": {"slow": {"restart_delay": 200}},
        "match": [{"name": "a", "profile": "slow"}, {"name": "b", "restart_delay": 1}],
    })
    w = s.warnings()
    assert [x.split(":")[0] for x in w if "limit_interval" in x] == ["policy.profile.slow", "policy.match[0]"]


def test_no_warning_for_defaults_and_top_level_collects_policy_warnings():
    assert PolicySettings().warnings() == []
    s = settings_from_mapping({"policy": {"defaults": {"restart_delay": 300}}})
    assert any("limit_interval" in w for w in config_warnings(s))


def test_effective_mode():
    assert PolicySettings().effective_mode() == "observe"
    assert PolicySettings(enabled=True, mode="dry-run").effective_mode() == "dry-run"
