"""Checkpoint folders: atomic publishing, finding the latest, and reading weights and run info back.

A checkpoint is ``RUN_DIR/checkpoints/step_000100/``: accelerate's ``save_state`` files (``model.safetensors``,
optimizer, scheduler, RNG states; all loaded with ``weights_only=True``), plus ``config.yaml`` (the resolved run
config) and ``vlp_state.json`` (step, samples seen, bad-sample counts, last metrics). It is written under a
``.tmp`` name and renamed when complete, so a crash mid-save never leaves a half checkpoint as the latest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from vlp.config import Config, config_from_dict

import yaml

STATE_FILE = "vlp_state.json"
CONFIG_FILE = "config.yaml"
_STEP_DIR = re.compile(r"^step_(\d+)$")
TEACHER_FILES = ("teacher.safetensors", "ema.safetensors")  # the momentum teacher (ema.safetensors: older runs)
WEIGHTS = ("student", "teacher")


LOCK_FILE = ".vlp-run.lock"


class RunDirBusy(RuntimeError):
    """Another live process trains into this output_dir."""


def lock_run_dir(run_dir: str | os.PathLike):
    """Hold an exclusive ``flock`` on ``RUN_DIR/.vlp-run.lock`` for the life of the returned file (released by the
    OS when the process dies, so a killed run never leaves a stale lock). Raises :class:`RunDirBusy` at once if
    another process holds it: two runs writing one folder would mix checkpoints and metrics."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirBusy(f"output_dir: {run_dir} is in use by a running training ({holder}); wait for it, "
                         f"or pick another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    return f


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the latest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {str(path)!r} (looked for checkpoints/step_*/{STATE_FILE})")
    return found[-1]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, keep_last: int) -> None:
    """Rename a finished ``.tmp`` checkpoint into place (its files and folder fsynced first, the parent after, so a
    power loss never publishes a checkpoint whose data is still in the page cache), then prune all but the
    ``keep_last`` newest."""
    for f in tmp.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    for old in list_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def write_state(ckpt: Path, state: dict) -> None:
    (ckpt / STATE_FILE).write_text(json.dumps(state, indent=2, default=float))


def read_run_info(ckpt: str | os.PathLike) -> dict:
    return json.loads((find_checkpoint(ckpt) / STATE_FILE).read_text())


def read_run_config(ckpt: str | os.PathLike) -> Config:
    tree = yaml.safe_load((find_checkpoint(ckpt) / CONFIG_FILE).read_text())
    return config_from_dict(tree, check_files=False)


def model_state_dict(ckpt: str | os.PathLike) -> dict:
    """The training model's weights (``clip.*``, ``mae_decoder.*``, ``classifier.*``) from safetensors."""
    return load_file(str(find_checkpoint(ckpt) / "model.safetensors"))


def teacher_file(ckpt: str | os.PathLike) -> Path | None:
    """The checkpoint's momentum-teacher weights file, or None when the run had no teacher."""
    ckpt = find_checkpoint(ckpt)
    return next((ckpt / name for name in TEACHER_FILES if (ckpt / name).is_file()), None)


def clip_state_dict(ckpt: str | os.PathLike, weights: str = "student", ema: bool = False) -> dict:
    """A plain open_clip state dict: the ``clip.`` part of the training model.

    ``weights="teacher"`` (or ``ema=True``): the student's state with the momentum teacher's ``clip.*`` values
    (``teacher.safetensors``, else ``ema.safetensors``) written over it.
    """
    if ema:
        weights = "teacher"
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: one of {', '.join(WEIGHTS)}")
    ckpt = find_checkpoint(ckpt)
    state = _clip_part(load_file(str(ckpt / "model.safetensors")))
    if weights == "teacher":
        source = teacher_file(ckpt)
        if source is None:
            raise FileNotFoundError(f"{ckpt}: no momentum teacher to load (neither {' nor '.join(TEACHER_FILES)}); "
                                    f"use the student weights")
        teacher = _clip_part(load_file(str(source)))
        if not teacher:
            raise ValueError(f"{source}: no clip.* weights")
        unknown = sorted(set(teacher) - set(state))
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} keys not in the student's model.safetensors "
                             f"(clip.{unknown[0]}, ...)")
        state.update(teacher)
    return state


def _clip_part(state: dict) -> dict:
    return {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
