"""Shards written once: a folder's marker file records the settings they were written with."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from benchlib.cli import write_json


def written(folder: Path, params: dict, marker: str = "done.json") -> dict | None:
    """What ``folder/marker`` records (``{"params": ..., ...}``) when it was written with ``params``; else None."""
    path = folder / marker
    if path.is_file():
        info = json.loads(path.read_text())
        if info.get("params") == params:
            return info
    return None


def cached(folder: Path, params: dict, write: Callable[[Path], dict], marker: str = "done.json") -> dict:
    """The shards of ``folder``, written by ``write(folder)`` (into an empty folder; it returns what to record)
    unless the marker file records the same ``params``. Returns the marker's content: ``{"params": ..., **write's}``."""
    info = written(folder, params, marker)
    if info is None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        info = {"params": params, **write(folder)}
        write_json(folder / marker, info)
    return info


def class_files(folder: Path, classes: list[str], labels: list[int]) -> None:
    """``vlp.shards.write_class_files`` with the count of each class among ``labels``."""
    from vlp.shards import write_class_files

    write_class_files(folder, classes, {c: labels.count(c) for c in range(len(classes))})
