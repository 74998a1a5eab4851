"""The full CLIP as an open_clip export (what open_clip's ``save_for_hf`` writes, safetensors only)::

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
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vlp.export.card import render_model_card
from vlp.export.common import (CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, _clean_model_cfg, _is_hf_text,
                               _num_params, _prepare_dir, _write_manifest, hf_source_name)


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


def _check_no_pickles(folder: Path, foreign: set[str] = frozenset()) -> None:
    """Refuse an export holding a pickle; ``foreign`` files (there before the export, never uploaded) are not ours."""
    bad = [rel for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES
           and (rel := p.relative_to(folder).as_posix()) not in foreign]
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
    out, foreign = _prepare_dir(out_dir, overwrite)

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
    _check_no_pickles(out, foreign)
    _write_manifest(out, foreign)
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
