"""Licence, version and changelog metadata agree (issue 13, item 7)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import virtwatch

ROOT = Path(__file__).resolve().parents[2]


def project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)


def test_version_is_the_same_in_pyproject_and_the_package() -> None:
    assert project()["project"]["version"] == virtwatch.__version__ == "0.2.0"  # type: ignore[index]


def test_licence_metadata_is_a_pep639_spdx_expression_with_its_file() -> None:
    """``license`` a string (a TOML table makes setuptools >= 77 warn at every build), the
    file listed in ``license-files``, and a setuptools that understands both required."""
    data = project()
    meta = data["project"]
    assert meta["license"] == "Apache-2.0"  # type: ignore[index]
    assert meta["license-files"] == ["LICENSE"]  # type: ignore[index]
    requires = data["build-system"]["requires"]  # type: ignore[index]
    assert requires == ["setuptools>=77"]


def test_licence_file_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_changelog_starts_at_0_2_0_and_names_the_current_version_first() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    versions = re.findall(r"^## \[?(\d+\.\d+\.\d+)\]?", text, flags=re.MULTILINE)
    assert versions[0] == virtwatch.__version__
    assert versions[-1] == "0.2.0"
