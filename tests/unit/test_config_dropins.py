"""conf.d drop-ins: merged over the configuration file in file-name order (issue 13, item 1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtwatch.config import ConfigError, load_settings, merge_tables


def test_dropins_merge_in_file_name_order(tmp_path: Path) -> None:
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text('[libvirt]\nuri = "qemu:///system"\n[stats]\npoll_interval = 30\ngroups = ["state", "cpu"]\n')
    dropins = tmp_path / "conf.d"
    dropins.mkdir()
    # Written out of order on purpose: 50- is read after 10- whatever the directory order.
    (dropins / "50-later.toml").write_text('[stats]\npoll_interval = 5\n[http]\nlisten = "127.0.0.1:9300"\n')
    (dropins / "10-site.toml").write_text('[stats]\npoll_interval = 10\ngroups = ["state"]\n'
                                          '[libvirt]\nread_only = "yes"\n')
    (dropins / "README").write_text("not a .toml file: ignored\n")
    s = load_settings(cfg)
    assert s.libvirt.uri == "qemu:///system"  # from the file: a drop-in changes only the keys it sets
    assert s.libvirt.read_only == "yes"  # from 10-site
    assert s.stats.poll_interval == 5  # 50-later wins over 10-site and the file
    assert s.stats.groups == ("state",)  # arrays are replaced, not appended to
    assert s.http.listen == "127.0.0.1:9300"
    # Command-line overrides still win over every file.
    assert load_settings(cfg, {"stats.poll_interval": 2.0}).stats.poll_interval == 2.0


def test_a_bad_dropin_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text("")
    (tmp_path / "conf.d").mkdir()
    bad = tmp_path / "conf.d" / "20-bad.toml"
    bad.write_text("[stats\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.source == str(bad)
    assert info.value.errors[0].startswith("TOML syntax")
    bad.write_text("[stats]\npoll_intervall = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    assert info.value.source == f"{cfg} with conf.d/20-bad.toml"
    assert info.value.errors == ["stats.poll_intervall: unknown key"]


def test_merge_tables_is_deep_for_tables_only() -> None:
    base = {"policy": {"enabled": False, "defaults": {"on_crash": "restart", "limit_burst": 5}},
            "console": {"guests": ["a"]}}
    top = {"policy": {"defaults": {"limit_burst": 2}}, "console": {"guests": ["b"]}}
    assert merge_tables(base, top) == {"policy": {"enabled": False, "defaults": {"on_crash": "restart",
                                                                                 "limit_burst": 2}},
                                       "console": {"guests": ["b"]}}
    assert base["policy"]["defaults"]["limit_burst"] == 5  # inputs untouched


def test_relative_paths_in_dropins_are_from_the_configuration_directory(tmp_path: Path) -> None:
    cfg = tmp_path / "virtwatch.toml"
    cfg.write_text("")
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "10-state.toml").write_text('[daemon]\nstate_dir = "state"\n')
    assert load_settings(cfg).daemon.state_dir == str(tmp_path.resolve() / "state")  # not conf.d/state
