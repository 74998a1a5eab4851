"""The model card (README.md) of an export, and the card of a training run (``card_from_run``)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from vlp.data.format import KINDS
from vlp.export.common import _clean_model_cfg, _is_hf_text, hf_source_name

_EVAL_PREFIXES = ("zeroshot/", "retrieval/", "probe/", "linear_probe/", "eval/", "knn/")


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


_SECRET = "***"
_SECRET_PARAMS = r"(?:sig|signature|token|access_token|auth|key|apikey|api_key|password|passwd|secret|" \
                 r"x-amz-[a-z-]+|x-goog-[a-z-]+|se|sp|sv|st)"
_REDACTIONS = [
    # curl/wget headers and credentials: -H 'Authorization: Bearer ...', --header=..., -u user:pass, --password
    (re.compile(r"""((?:-H|--header)[ =]?\s*)(['"]?)([^'"\s:]+:)[^'"]*\2""", re.I), rf"\1\2\3 {_SECRET}\2"),
    (re.compile(r"""((?:-u|--user|--password|--http-password|--oauth2-bearer)[ =]\s*)(['"]?)[^'"\s]+\2""", re.I),
     rf"\1\2{_SECRET}\2"),
    (re.compile(r"(Bearer|Basic|token)\s+[A-Za-z0-9._~+/=-]+", re.I), rf"\1 {_SECRET}"),
    (re.compile(r"(\w+://)[^/\s@'\"]+@"), rf"\1{_SECRET}@"),  # https://user:pass@host
    (re.compile(rf"([?&]{_SECRET_PARAMS}=)[^&\s'\"]*", re.I), rf"\1{_SECRET}"),  # presigned URLs, SAS tokens
    (re.compile(r"\b([A-Z][A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|KEY)[A-Z0-9_]*=)\S+"), rf"\1{_SECRET}"),  # env assignments
]


def redact_shard_spec(spec: str) -> str:
    """A shard spec with the credentials a ``pipe:curl ...`` or presigned URL may carry replaced by ``***`` (the
    model card is uploaded by ``--push``; the spec's paths, hosts and brace ranges stay)."""
    for pattern, repl in _REDACTIONS:
        spec = pattern.sub(repl, spec)
    return spec


def _shards(spec) -> str:
    if isinstance(spec, (list, tuple)):
        spec = " :: ".join(str(s) for s in spec)
    return f"`{redact_shard_spec(spec)}`" if spec else ""


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
    library = "timm" if vision_only and card.get("timm") else "open_clip"  # a timm layout loads with timm
    front = ["---", f"library_name: {library}", f"license: {_yaml_str(card.get('license') or 'other')}", "tags:"]
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
    kinds = [k for k in KINDS if k in batch or k in seen] + \
            [k for k in list(batch) + list(seen) if k not in KINDS]
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


_PLACEHOLDER = "/path/to/this/folder"  # the snippet's path when the card knows neither a repo nor a folder


def _load_section(card: dict, cfg: dict, vision_only: bool) -> str:
    """The snippet names the Hub repo when there is one, else the export's absolute path (it runs from any folder)."""
    repo_id, local = card.get("repo_id"), card.get("local_dir")
    local = str(Path(local).resolve()) if local else None
    lines = ["## How to load", "", "```python"]
    if vision_only:
        lines += ["from vlp.export import load_vision_tower", ""]
        if repo_id:
            lines += ["from huggingface_hub import snapshot_download",
                      f"path = snapshot_download({_yaml_str(repo_id)})"]
        else:
            lines += [f"path = {_yaml_str(local or _PLACEHOLDER)}"]
        lines += ["visual = load_vision_tower(path)  # open_clip VisionTransformer: image -> embedding",
                  "", "# with open_clip alone (a CLIP whose text tower is untrained, image tower loaded):",
                  "import open_clip",
                  "model = open_clip.create_model(f\"local-dir:{path}\", load_weights=False,",
                  "                               pretrained_image_path=f\"{path}/"
                  + ("open_clip_vision" if card.get("timm") else "model") + ".safetensors\")"]
        if card.get("timm"):
            hub = f"hf-hub:{repo_id}" if repo_id else None
            lines += ["", "# as a timm backbone (head: the CLIP projection):", "import timm",
                      (f"backbone = timm.create_model({_yaml_str(hub)}, pretrained=True)" if hub else
                       "backbone = timm.create_model(f\"local-dir:{path}\", pretrained=True)")]
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
    else:
        ref = _yaml_str("local-dir:" + (local or _PLACEHOLDER))
        lines += [f"model, _, preprocess = open_clip.create_model_and_transforms({ref})",
                  f"tokenizer = open_clip.get_tokenizer({ref})"]
    lines += ["model.eval()", "```", ""]
    if _is_hf_text(cfg):
        lines += ["The text tower is a Hugging Face model: open_clip rebuilds it from `text_cfg.hf_model_name` "
                  "(its `config.json` is in this repo). That is the repo id in the Hub copy and the folder's absolute "
                  "path in a local export; after moving a local export, run "
                  "`vlp.export.relocate_export(NEW_DIR)`.", ""]
    return "\n".join(lines)


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
    batch = {k: getattr(cfg.data.batch, k) for k in KINDS}

    from vlp.objectives import OBJECTIVES

    objectives = {oname: OBJECTIVES[oname].card_settings(o, cfg) if oname in OBJECTIVES else {"weight": o.weight}
                  for oname, o in cfg.objectives.items()}

    train_metrics = dict(info.get("metrics") or {})
    metrics = {k: v for k, v in train_metrics.items() if k.startswith(_EVAL_PREFIXES)}
    metrics.update(info.get("eval") or {})

    training = {"steps": cfg.train.steps}
    if info.get("step") is not None and int(info["step"]) != cfg.train.steps:
        training["step"] = int(info["step"])
    training.update({"lr": cfg.optim.lr, "batch_per_process": cfg.data.batch.total, "grad_accum": cfg.train.grad_accum,
                     **({"accum_freq": cfg.train.accum_freq} if cfg.train.accum_freq > 1 else {})})
    world = info.get("world_size")
    if world:
        training["world_size"] = int(world)
        training["global_batch_size"] = cfg.data.batch.total * int(world) * cfg.train.micro_batches
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
