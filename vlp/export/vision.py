"""The image tower alone, as timm and as open_clip weights. For a standard ViT tower (the default)::

    config.json                   timm's hub config (architecture, model_args, pretrained_cfg), so
                                  ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)`` (or ``local-dir:DIR``)
                                  loads it; plus vlp's ``"open_clip_vision": {"embed_dim", "vision_cfg", "mean",
                                  "std", "weights", ...}``
    model.safetensors             the timm ``VisionTransformer``'s weights (head = open_clip's projection)
    open_clip_vision.safetensors  ``model.visual.state_dict()`` (open_clip)
    open_clip_config.json         for open_clip (load with ``load_weights=False, pretrained_image_path=...``)
    README.md

Towers with no timm counterpart (or ``timm_format=False``): ``config.json`` is vlp's description
(``{"architecture": "open_clip_vision", ...}``) and ``model.safetensors`` the open_clip tower's weights. Older exports
kept the timm copy in ``timm/``; both loaders still read them. The supervised head of a run (``classifier``) is not
part of the tower: the timm model's head is the CLIP projection (``num_classes`` = embed_dim).

``load_vision_tower(dir)`` rebuilds the open_clip tower and loads it strict; ``load_timm_vision_tower(dir)`` the
timm one.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from vlp.export.card import render_model_card
from vlp.export.clip import _check_no_pickles, _save_safetensors, _unwrap, _write_open_clip_config
from vlp.export.common import (CONFIG_NAME, VISION_ARCHITECTURE, VISION_CONFIG_NAME, VISION_WEIGHTS_NAME,
                               _clean_model_cfg, _is_hf_text, _num_params, _prepare_dir, _write_manifest)

log = logging.getLogger(__name__)

TIMM_SUBDIR = "timm"  # where older exports kept the timm copy
OPEN_CLIP_VISION_WEIGHTS = "open_clip_vision.safetensors"  # the open_clip tower's weights beside timm's
TIMM_ARCHITECTURE = "vit_base_patch16_clip_224"  # a CLIP-style timm ViT (pre-norm, LayerNorm eps 1e-5); dims overridden

# a stand-in text tower for vision-only exports of a model whose text tower is a Hugging Face model: open_clip
# needs *some* text_cfg to build a CLIP, and the real one would need the HF model's files, which are not exported
_VISION_ONLY_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


def export_vision_tower(model: torch.nn.Module, model_cfg: dict, out_dir, card: dict | None = None,
                        timm_format: bool | None = None, overwrite: bool = False) -> Path:
    """Write the image tower alone (see module docstring). ``timm_format``: also write ``timm/`` (None: when the
    tower converts to a timm ViT; True: required, raises if not convertible; False: never)."""
    clip = _unwrap(model)
    cfg = _clean_model_cfg(model_cfg)
    visual = clip.visual
    out, foreign = _prepare_dir(out_dir, overwrite)

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
            has_timm = True
    if has_timm:  # timm's files at the root (hf-hub: / local-dir: load them), the open_clip tower beside them
        _write_timm(visual, cfg, mean, std, out)
        vision_config["weights"] = OPEN_CLIP_VISION_WEIGHTS
        timm_cfg = json.loads((out / VISION_CONFIG_NAME).read_text())
        (out / VISION_CONFIG_NAME).write_text(json.dumps({**timm_cfg, VISION_ARCHITECTURE: vision_config}, indent=2))
    else:
        (out / VISION_CONFIG_NAME).write_text(json.dumps(vision_config, indent=2))
    _save_safetensors(visual.state_dict(), out / vision_config["weights"])

    card = dict(card or {})
    card.setdefault("variant", "vision")
    card.setdefault("local_dir", str(out))
    card.setdefault("parameters", {"image": _num_params(visual)})
    card.setdefault("timm", has_timm)
    (out / "README.md").write_text(render_model_card(card, cfg))
    _check_no_pickles(out, foreign)
    _write_manifest(out, foreign)
    return out


def load_vision_tower(path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The open_clip image tower of a vision-only export, weights loaded strict, in eval mode.

    ``image_mean`` / ``image_std`` / ``image_size`` attributes are set as open_clip sets them on ``model.visual``.
    """
    import safetensors.torch
    from open_clip.model import _build_vision_tower

    path = Path(path)
    config = json.loads((path / VISION_CONFIG_NAME).read_text())
    config = config.get(VISION_ARCHITECTURE, config)  # beside timm's config, or the whole file
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
    """The timm model of a vision-only export (its root; ``DIR/timm`` in older exports), pretrained weights, eval
    mode: ``timm.create_model("local-dir:DIR", pretrained=True)``."""
    import timm

    path = Path(path)
    try:
        at_root = "pretrained_cfg" in json.loads((path / VISION_CONFIG_NAME).read_text())
    except (OSError, ValueError):
        at_root = False
    if not at_root and (path / TIMM_SUBDIR / "config.json").is_file():  # an older export
        path = path / TIMM_SUBDIR
    return timm.create_model(f"local-dir:{path}", pretrained=True).to(device).eval()
