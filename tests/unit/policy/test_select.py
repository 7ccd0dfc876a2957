"""Selection precedence: override > metadata > match rules (file order) > profile > defaults."""

import json

import pytest

from virtwatch.policy.config import PolicySettings
from virtwatch.policy.select import parse_metadata, select, validate_override

S = PolicySettings.model_validate({
    "enabled": True,
    "defaults": {"restart_delay": 5, "limit_burst": 5},
    "profile": {"critical": {"limit_burst": 10, "restart_delay": 1, "priority": 100},
                "lax": {"on_crash": "leave", "limit_burst": 2}},
    "match": [
        {"glob": "web*", "profile": "critical", "restart_delay": 3},
        {"regex": "web[0-9]+", "restart_delay": 99, "on_poweroff": "restart"},
        {"uuid": "AAAAAAAA-0000-0000-0000-000000000001", "mode": "dry-run"},
        {"metadata": {"tier": "db"}, "profile": "lax"},
    ],
})

NS = 'xmlns="https://virtwatch.dev/xmlns/policy/1"'


def test_unmatched_guest_is_observed_only():
    sel = select(S, "mail", "u", None)
    assert not sel.managed and sel.mode == "observe"
    assert sel.policy == S.defaults
    assert all(v == "defaults" for v in sel.sources.values())


def test_first_matching_rule_wins_per_key_then_profile_then_defaults():
    sel = select(S, "web1", "u", None)
    assert sel.managed and sel.matched == (0, 1) and sel.mode == "enforce"
    assert sel.policy.restart_delay == 3.0
    assert sel.sources["restart_delay"] == "match[0] (glob=web*)"
    assert sel.policy.on_poweroff == "restart"
    assert sel.sources["on_poweroff"] == "match[1] (regex=web[0-9]+)"
    assert sel.policy.limit_burst == 10
    assert sel.sources["limit_burst"] == "profile critical (via match[0])"
    assert sel.policy.on_crash == "restart" and sel.sources["on_crash"] == "defaults"


def test_metadata_beats_rules_and_labels_select_rules():
    xml = f'<policy {NS} restart_delay="7"><label name="tier">db</label><on_io_error>resume</on_io_error></policy>'
    sel = select(S, "pg1", "u", xml)
    assert sel.matched == (3,)
    assert sel.policy.restart_delay == 7.0 and sel.sources["restart_delay"] == "metadata"
    assert sel.policy.on_io_error == "resume"
    assert sel.policy.on_crash == "leave" and sel.sources["on_crash"] == "profile lax (via match[3])"
    sel2 = select(S, "web1", "u", f'<policy {NS}><restart_delay>8</restart_delay></policy>')
    assert sel2.policy.restart_delay == 8.0 and sel2.policy.limit_burst == 10


def test_metadata_profile_ranks_above_rule_profiles():
    sel = select(S, "web1", "u", f'<policy {NS} profile="lax"/>')
    assert sel.policy.limit_burst == 2
    assert sel.sources["limit_burst"] == "profile lax (via metadata)"
    assert sel.policy.restart_delay == 3.0  # rule's own key still beats any profile


def test_override_beats_everything():
    sel = select(S, "web1", "u", f'<policy {NS} restart_delay="7"/>', {"restart_delay": 42.0, "profile": "lax"})
    assert sel.policy.restart_delay == 42.0 and sel.sources["restart_delay"] == "override"
    assert sel.policy.limit_burst == 2 and sel.sources["limit_burst"] == "profile lax (via override)"


def test_override_alone_makes_a_guest_managed():
    sel = select(S, "mail", "u", None, {"on_crash": "leave"})
    assert sel.managed and sel.policy.on_crash == "leave"


def test_mode_most_conservative_wins():
    sel = select(S, "x", "aaaaaaaa-0000-0000-0000-000000000001", None)
    assert sel.managed and sel.mode == "dry-run" and sel.mode_source.startswith("match[2]")
    s2 = PolicySettings.model_validate({"enabled": True, "mode": "dry-run",
                                        "match": [{"name": "x", "mode": "enforce"}]})
    assert select(s2, "x", "u", None).mode == "dry-run"
    s3 = PolicySettings.model_validate({"enabled": False, "match": [{"name": "x"}]})
    assert select(s3, "x", "u", None).mode == "observe"


def test_bad_metadata_is_ignored_and_reported():
    sel = select(S, "web1", "u", f'<policy {NS} on_crash="explode" restart_delay="2"/>')
    assert sel.policy.on_crash == "restart" and sel.policy.restart_delay == 3.0
    assert any(e.startswith("metadata.on_crash") for e in sel.errors)
    md = parse_metadata("<policy")
    assert not md.present and md.errors[0].startswith("metadata: not XML")
    md = parse_metadata(f'<policy {NS} profile="nope"/>')
    assert md.present and md.profile == "nope"
    errors = select(S, "web1", "u", f'<policy {NS} profile="nope"/>').errors
    assert errors == ("metadata: unknown profile 'nope' ignored",)


def test_metadata_as_libvirt_returns_it_without_namespace_and_host_shutdown_string():
    md = parse_metadata('<policy on_host_shutdown="shutdown:10,destroy:5">\n  <profile>critical</profile>\n</policy>')
    assert md.profile == "critical"
    assert [(s.action, s.timeout) for s in md.values["on_host_shutdown"]] == [("shutdown", 10.0), ("destroy", 5.0)]


def test_validate_override():
    assert validate_override({"restart_delay": "3", "mode": "dry-run"}, S) == {"restart_delay": 3.0, "mode": "dry-run"}
    with pytest.raises(ValueError, match="profile"):
        validate_override({"profile": "zzz"}, S)
    with pytest.raises(ValueError, match="bogus"):
        validate_override({"bogus": 1}, S)


def test_override_values_survive_the_json_round_trip_of_the_store():
    # the store persists an override as JSON: what validate_override returns must be JSON,
    # and select must turn it back into typed values (ShutdownStep, not dicts)
    v = validate_override({"on_host_shutdown": "managedsave:30,destroy", "restart_delay": "2"}, S)
    stored = json.loads(json.dumps(v))
    assert stored == v == {"on_host_shutdown": [{"action": "managedsave", "timeout": 30.0},
                                                {"action": "destroy", "timeout": 120.0}], "restart_delay": 2.0}
    sel = select(S, "mail", "u", None, stored)
    steps = [(st.action, st.timeout) for st in sel.policy.on_host_shutdown]
    assert steps == [("managedsave", 30.0), ("destroy", 120.0)]
    assert sel.policy.restart_delay == 2.0 and sel.sources["on_host_shutdown"] == "override"
    assert sel.managed and sel.errors == ()


def test_validate_override_names_every_bad_key_and_the_valid_ones():
    with pytest.raises(ValueError) as exc:
        validate_override({"bogus": 1, "restart_delay": -1, "mode": "fast"}, S)
    msg = str(exc.value)
    assert "bogus: unknown key" in msg and "on_crash" in msg  # says which keys exist
    assert "restart_delay: Input should be greater than or equal to 0" in msg
    assert "mode: 'fast' is not one of enforce, dry-run, observe" in msg


def test_a_stored_override_that_no_longer_validates_is_ignored_and_reported():
    # e.g. written by another virtwatch version: select never raises, it reports
    sel = select(S, "web1", "u", None, {"restart_delay": -5, "no_longer_a_key": 1})
    assert sel.policy.restart_delay == 3.0 and sel.sources["restart_delay"].startswith("match[0]")
    assert any(e.startswith("override.restart_delay") for e in sel.errors)
    assert any(e == "override.no_longer_a_key: unknown key" for e in sel.errors)
