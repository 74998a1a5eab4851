"""The tested dependency set: ``constraints.txt`` pins every package ``vlp[dev]`` pulls in to the version the test
suite last passed with (as open_clip's ``requirements-test.txt``), so a fresh install resolves what was tested.

    python tools/constraints.py write          # pin what is installed here (run after the suite passed)
    python tools/constraints.py try-newest     # fresh venv, newest versions, run the suite; pin them if it passes

README's install and ``.ci/run`` use it: ``pip install -e ".[dev]" -c constraints.txt``.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"
NOT_PINNED = {"vlp", "pip", "setuptools", "wheel"}  # the project itself and the installer's own tools
HEADER = ("# The versions `HF_HUB_OFFLINE=1 python -m pytest tests -q` last passed with (x86_64 Linux, Python 3.11).\n"
          "# Install with: pip install -e \".[dev]\" -c constraints.txt\n"
          "# Regenerate with: python tools/constraints.py try-newest   (or `write` to pin what is installed)\n")


def installed_closure(root: str = "vlp", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """``{name: version}`` of every installed distribution ``root[extras]`` requires, transitively."""
    found: dict[str, tuple[str, set[str]]] = {}
    stack = [(root, set(extras))]
    while stack:
        name, wanted = stack.pop()
        key = canonicalize_name(name)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # an optional dependency not installed here (a marker for another platform)
        if key in found and wanted <= found[key][1]:
            continue
        found[key] = (dist.version, found.get(key, ("", set()))[1] | wanted)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                stack.append((req.name, set(req.extras)))
    return {k: v for k, (v, _) in sorted(found.items()) if k not in NOT_PINNED}


def write(pins: dict[str, str], path: Path = CONSTRAINTS) -> None:
    path.write_text(HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
    print(f"wrote {len(pins)} pins to {path}")


def try_newest() -> int:
    """Install vlp[dev] with the newest versions into a new venv, run the suite there; pin them if it passes."""
    with tempfile.TemporaryDirectory(prefix="vlp-newest-") as tmp:
        py = str(Path(tmp) / "bin" / "python")
        subprocess.run([sys.executable, "-m", "venv", tmp], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "-e", f"{REPO}[dev]"], check=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if subprocess.run([py, "-m", "pytest", "tests", "-q"], cwd=REPO, env=env).returncode:
            print("the suite failed with the newest versions: constraints.txt left as it is", file=sys.stderr)
            return 1
        code = f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); import constraints as c; c.write(c.installed_closure())"
        subprocess.run([py, "-c", code], check=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["write", "try-newest"])
    args = parser.parse_args(argv)
    if args.command == "write":
        write(installed_closure())
        return 0
    return try_newest()


if __name__ == "__main__":
    sys.exit(main())
