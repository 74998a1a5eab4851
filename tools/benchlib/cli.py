"""A benchmark's console and output: log lines, comma-separated lists, the results JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

_SCRIPT = Path(sys.argv[0]).resolve()
TOOL = _SCRIPT.stem if _SCRIPT.parent == Path(__file__).resolve().parents[1] else "benchlib"  # e.g. bench_quality


def log(msg: str) -> None:
    print(f"[{TOOL} {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def write_json(path: Path, doc: dict, **dumps) -> Path:
    """``doc`` as indented JSON at ``path`` (its folder made); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, **dumps) + "\n")
    return path
