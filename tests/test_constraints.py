"""#30: a fresh install resolves the tested dependency set: constraints.txt pins every dependency pyproject names,
each pin inside pyproject's range, and the README's install and CI use it."""
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib" if __import__("sys").version_info >= (3, 11) else "tomli")

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            out[canonicalize_name(name)] = version.strip()
    return out


def test_every_dependency_is_pinned_inside_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pinned = pins()
    for text in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), f"{req.name}=={pinned[name]} is outside {req}"


def test_install_commands_use_the_constraints():
    readme_install = next(l for l in (REPO / "README.md").read_text().splitlines() if "# 1. set up" in l)
    assert "-c constraints.txt" in readme_install
    assert '-e ".[dev]" -c constraints.txt' in (REPO / ".ci/run").read_text()
