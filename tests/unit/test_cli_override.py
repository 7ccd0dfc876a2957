"""``virtwatch override`` turns KEY=VALUE words into JSON values: TOML literals when they are one, else strings."""

from __future__ import annotations

import pytest

from virtwatch.cli.operator import override_values


def test_values_are_read_as_toml_else_taken_as_words() -> None:
    got = override_values(["restart_delay=2.5", "limit_burst=3", "capture_console=true", "on_crash=leave",
                           "mode=dry-run", "on_host_shutdown=managedsave:300,destroy:30",
                           'on_host_shutdown_list=["managedsave:300", "destroy:30"]', "when=2026-01-01",
                           "two_lines=1\nx = 2", "empty="], clear=False)
    assert got == {"restart_delay": 2.5, "limit_burst": 3, "capture_console": True, "on_crash": "leave",
                   "mode": "dry-run", "on_host_shutdown": "managedsave:300,destroy:30",
                   "on_host_shutdown_list": ["managedsave:300", "destroy:30"],
                   "when": "2026-01-01",          # a TOML date is no policy value: left as written
                   "two_lines": "1\nx = 2",       # never a second TOML line
                   "empty": ""}


@pytest.mark.parametrize("pairs, clear, says", [
    (["restart_delay"], False, "expected KEY=VALUE, got 'restart_delay'"),
    (["=2"], False, "expected KEY=VALUE"),
    (["a=1", "a=2"], False, "a given twice"),
    ([], False, "give KEY=VALUE pairs or --clear"),
    (["a=1"], True, "--clear takes no KEY=VALUE pairs"),
])
def test_malformed_input_is_refused_before_asking_the_daemon(pairs: list[str], clear: bool, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        override_values(pairs, clear)


def test_clear_sends_an_empty_override() -> None:
    assert override_values([], clear=True) == {}
