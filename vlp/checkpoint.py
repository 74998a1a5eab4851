"""Checkpoint folders: atomic publishing, finding the latest, and reading weights and run info back.

A checkpoint is ``RUN_DIR/checkpoints/step_000100/``: accelerate's ``save_state`` files (``model.safetensors``,
optimizer, scheduler, RNG states; all loaded with ``weights_only=True``), plus ``config.yaml`` (the resolved run
config), ``vlp_state.json`` (step, samples seen, bad-sample counts, last metrics), ``teacher.safetensors`` and
``objectives.safetensors`` (the momentum teacher, rank 0's objective buffers) and, in a multi-process run,
``objectives.rank<R>.safetensors`` (each rank's own buffers, e.g. SwAV's queue). It is written under a
``.tmp`` name and renamed when complete, so a crash mid-save never leaves a half checkpoint as the latest.

Under FSDP accelerate writes the model as ``pytorch_model_fsdp.bin`` (FULL_STATE_DICT) or as a
torch.distributed.checkpoint folder ``pytorch_model_fsdp_0/`` (SHARDED_STATE_DICT); the trainer then also writes the
gathered full weights as ``model.safetensors``. :func:`model_state_dict` reads whichever a folder has (see
``MODEL_WEIGHTS``), so export, eval and ``load_clip`` work on all of them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file

from vlp.config import Config, config_from_dict

import yaml

log = logging.getLogger(__name__)

STATE_FILE = "vlp_state.json"
CONFIG_FILE = "config.yaml"
PER_PROCESS_FILE = "objectives.rank{rank}.safetensors"  # a rank's own objective buffers (Objective.per_process_state)
_STEP_DIR = re.compile(r"^step_(\d+)$")
TEACHER_FILES = ("teacher.safetensors", "ema.safetensors")  # the momentum teacher (ema.safetensors: older runs)
WEIGHTS = ("student", "teacher")


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
    if not path.exists() and _STEP_DIR.match(path.name) and path.parent.name == "checkpoints":
        raise FileNotFoundError(f"checkpoint {str(path)!r} no longer exists: a live run removes its older checkpoints "
                                f"(train.keep_last); give the run folder for its latest, or copy a checkpoint aside")
    found = list_checkpoints(path)
    if not found:
        export = " (an export folder needs open_clip_config.json beside its weights)" if any(
            path.glob("open_clip_model.*")) else ""
        raise FileNotFoundError(f"no complete checkpoint in {str(path)!r} (looked for checkpoints/step_*/{STATE_FILE})"
                                f"{export}")
    return found[-1]


def newest_first(path: str | os.PathLike) -> list[Path]:
    """The checkpoints a resume or a reader tries, in order: ``path`` itself when it is one, else a run's complete
    checkpoints newest first (a corrupt latest one falls back to the one before), else :func:`find_checkpoint`'s."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return [path]
    return list(reversed(list_checkpoints(path))) or [find_checkpoint(path)]


class CheckpointUnreadable(ValueError):
    """No checkpoint of a run can be read (corrupt or truncated files)."""


def readable_checkpoint(path: str | os.PathLike) -> Path:
    """:func:`find_checkpoint`, except that for a run directory an unreadable latest checkpoint (see
    :func:`check_readable`) is skipped, with a warning, for the newest readable one, as ``--resume auto`` does."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = newest_first(path)
    for i, ckpt in enumerate(found):
        try:
            check_readable(ckpt)
            return ckpt
        except Exception as err:  # truncated or corrupt files: safetensors, yaml, json raise many types
            if i == len(found) - 1:
                raise CheckpointUnreadable(f"checkpoint {ckpt} is unreadable ({err!r}) and no older one is "
                                           f"left") from err
            log.warning("checkpoint %s is unreadable (%r); using %s", ckpt, err, found[i + 1].name)
    raise AssertionError("unreachable")


def check_readable(ckpt: Path) -> None:
    """Raise if a checkpoint's run info, config or model weights cannot be read (a safetensors file: its header and
    size only; other formats are read whole)."""
    from safetensors import safe_open

    json.loads((ckpt / STATE_FILE).read_text())
    read_run_config(ckpt)
    weights = model_weights_path(ckpt)
    if weights.suffix == ".safetensors":
        with safe_open(str(weights), "pt") as f:
            f.keys()
    else:
        read_weights(weights)


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


# where a checkpoint folder's model weights may be, in the order they are tried
MODEL_WEIGHTS = (
    "model.safetensors",       # accelerate's save_state (DDP / one process); vlp's gathered copy under FSDP;
                               # `accelerate merge-weights CKPT/pytorch_model_fsdp_0 CKPT`
    "pytorch_model.bin",       # `accelerate merge-weights --unsafe_serialization`
    "pytorch_model_fsdp.bin",  # FSDP FULL_STATE_DICT
    "pytorch_model_fsdp_0",    # FSDP SHARDED_STATE_DICT: a torch.distributed.checkpoint (DCP) folder
)
# wrapper prefixes that may appear in saved key names (FSDP1, activation checkpointing, torch.compile, DDP)
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


# 0-dim parameters (open_clip's logit scale and bias) are trained as shape [1] under FSDP, which cannot shard a
# scalar (vlp.task.fsdp_ready); state dicts read or gathered are given their open_clip shape back
SCALAR_PARAMS = ("logit_scale", "logit_bias")


def clean_state(state: dict) -> dict:
    """A state dict with wrapper parts dropped from its keys (:func:`clean_key`) and FSDP's [1]-shaped scalar
    parameters (``SCALAR_PARAMS``) back to 0-dim."""
    out = {}
    for key, value in state.items():
        key = clean_key(key)
        if key.rsplit(".", 1)[-1] in SCALAR_PARAMS and value.shape == (1,):
            value = value.reshape(())
        out[key] = value
    return out


def clean_key(name: str) -> str:
    """A parameter name without the wrappers' parts (``_fsdp_wrapped_module.``, ``_orig_mod.``, ``module.``)."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name[len("module."):] if name.startswith("module.") else name


def model_weights_path(ckpt: str | os.PathLike) -> Path:
    """The file or DCP folder holding a checkpoint's model weights (the first of ``MODEL_WEIGHTS`` present)."""
    ckpt = find_checkpoint(ckpt)
    for name in MODEL_WEIGHTS:
        path = ckpt / name
        if path.is_file() or (path.is_dir() and (path / ".metadata").is_file()):
            return path
    raise FileNotFoundError(f"{ckpt}: no model weights (looked for {', '.join(MODEL_WEIGHTS)})")


def read_dcp_folder(folder: str | os.PathLike) -> dict:
    """A torch.distributed.checkpoint folder as one plain state dict, read in this process (no process group):
    ``dcp_to_torch_save`` into a temporary file, loaded back with ``weights_only=True``. Accelerate saves the model
    under one top-level key (``{"model": state}``), which is dropped."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory(prefix="vlp-dcp-") as tmp:
        dcp_to_torch_save(str(folder), os.path.join(tmp, "state.pt"))
        state = torch.load(os.path.join(tmp, "state.pt"), map_location="cpu", weights_only=True)
    if len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    return state


def read_weights(path: str | os.PathLike) -> dict:
    """A state dict from a safetensors file, a torch file (``weights_only=True``) or a DCP folder, cleaned
    (:func:`clean_state`: wrapper parts of keys, FSDP's [1]-shaped scalars)."""
    import torch

    path = Path(path)
    if path.is_dir():
        state = read_dcp_folder(path)
    elif path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return clean_state(state)


def model_state_dict(ckpt: str | os.PathLike) -> dict:
    """The training model's weights (``clip.*``, ``mae_decoder.*``, ``classifier.*``) from whichever of
    ``MODEL_WEIGHTS`` the checkpoint holds (safetensors, a ``weights_only`` torch file, or an FSDP DCP folder)."""
    return read_weights(model_weights_path(ckpt))


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
    state = _clip_part(model_state_dict(ckpt))
    if weights == "teacher":
        source = teacher_file(ckpt)
        if source is None:
            raise FileNotFoundError(f"{ckpt}: no momentum teacher to load (neither {' nor '.join(TEACHER_FILES)}); "
                                    f"use the student weights")
        teacher = _clip_part(read_weights(source))
        if not teacher:
            raise ValueError(f"{source}: no clip.* weights")
        unknown = sorted(set(teacher) - set(state))
        if unknown:
            raise ValueError(f"{source}: {len(unknown)} keys not in the student's weights "
                             f"(clip.{unknown[0]}, ...)")
        state.update(teacher)
    return state


def _clip_part(state: dict) -> dict:
    return {k[len("clip."):]: v for k, v in state.items() if k.startswith("clip.")}
