"""The pinned sets agree with what pyproject.toml asks for: a bumped requirement without new pins fails here."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lines(path: Path) -> list[str]:
    """A requirements file's entries, comments and blank lines left out."""
    return [s for line in path.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in _lines(path):
        name, _, version = line.partition("==")
        assert version, f"{path.name}: {line!r} is not a name==version pin"
        pins[canonicalize_name(name)] = version
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *(r for e in extras for r in project["optional-dependencies"][e])]
    return [Requirement(r) for r in lines]


@pytest.mark.parametrize(
    ("constraints", "extras", "caps"),
    [("constraints.txt", ("dev", "services"), None), ("constraints-gpu.txt", ("gpu",), "infra/gpu-worker-caps.txt")],
)
def test_every_requirement_is_pinned_to_a_version_it_accepts(constraints, extras, caps):
    pins = _pins(ROOT / constraints)
    wanted = _requirements(*extras)
    if caps:
        wanted += [Requirement(line) for line in _lines(ROOT / caps)]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{constraints} has no pin for {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{constraints}: {name}=={pins[name]} is not {req}"
