"""``vlp config --schema``: every run-config key, generated from the pydantic models (and each objective's
``Config``), as a Markdown reference (``docs/config.md`` is this output) or as JSON Schema (``--json``).

A key's description is the comment on its line in the model's source (``name: type = default  # what it does``)."""
from __future__ import annotations

import inspect
import json
import re
import typing

from pydantic import BaseModel

from vlp.config import Config

_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$")


def _comments(cls: type) -> dict[str, str]:
    """Field -> the comment on its line, for ``cls`` and its pydantic bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        above: list[str] = []  # a comment block right above a field describes it too
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# ").strip())
                continue
            name = re.match(r"^\s+(\w+)\s*:", line)
            if name and name.group(1) in klass.model_fields:
                m = _COMMENT.match(line)
                doc = " ".join(above + ([m.group(2).strip()] if m else []))
                if doc:
                    out[name.group(1)] = doc
            above = []
    return {k: v for k, v in out.items()}


DOCS = {  # keys whose source line has no comment
    "output_dir": "run folder: checkpoints/, metrics.jsonl, tb/, config.yaml",
    "seed": "seeds model init, data order, augmentation and masking (per rank)",
    "model.text.lock_unlocked_layers": "with model.text.lock: leave the last N text layers trainable",
    "model.image_std": "open_clip_train's --image-std; default and recording as model.image_mean",
    "data.sources[].name": "name in logs and bad-sample counters (default: kind + index)",
    "data.sources[].kind": "paired (image + caption), labeled (image + class), unlabeled (image)",
    "data.sources[].shards": "WebDataset shards: brace pattern, glob, folder, URL; several joined by ::",
    "data.sources[].weight": "sampling weight among the sources of the same kind",
    "data.batch.paired": "paired rows per step per process", "data.batch.labeled": "labeled rows per step per process",
    "data.batch.unlabeled": "unlabeled rows per step per process",
    "data.workers": "DataLoader workers per process", "data.shuffle_buffer": "samples in each stream's shuffle buffer",
    "data.augment": "open_clip's train transform: RandomResizedCrop (data.scale), no flip (false: resize + centre "
                    "crop)",
    "teacher.tau": "EMA momentum at step 0", "teacher.tau_end": "EMA momentum at the last step",
    "teacher.schedule": "tau from tau to tau_end along a cosine, or constant",
    "teacher.scope": "image: image tower + projection + named heads; all: every parameter",
    "optim.lr": "peak learning rate (AdamW)", "optim.weight_decay": "on weight matrices only",
    "optim.betas": "AdamW betas", "optim.eps": "AdamW eps", "optim.warmup_steps": "linear warmup steps",
    "optim.min_lr_ratio": "cosine floor, as a fraction of lr", "optim.grad_clip": "max global grad norm (null: none)",
    "train.steps": "optimizer steps (or train.epochs [+ train.num_samples]; on the command line either replaces the "
                   "other)",
    "train.epochs": "instead of train.steps: epochs of train.num_samples samples (open_clip_train --epochs)",
    "train.precision": "mixed precision (Accelerate)", "train.log_every": "steps between logged metrics",
    "train.save_every": "steps between checkpoints", "train.keep_last": "checkpoints kept",
    "train.eval_every": "steps between evaluations (the last step always evaluates when eval is configured)",
    "eval.zeroshot.shards": "labeled shards for zero-shot top-1/top-5",
    "eval.zeroshot.classnames": "default: classnames.txt beside the shards, else the run's classes",
    "eval.zeroshot.templates": "default: beside the shards, else data.templates",
    "eval.zeroshot.max_samples": "evaluate on the first N samples", "eval.knn.k": "neighbours",
    "eval.knn.max_samples": "evaluate on the first N samples", "eval.batch_size": "evaluation batch size",
    "log.wandb_project": "wandb project",
    "weight": "its weight in the summed loss (0: off)",
}


def _type_name(annotation) -> str:
    text = str(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|vlp\.config\.|<class '([^']+)'>", r"\1", text)
    return text.replace("NoneType", "None").replace("Literal", "one of ")


def _model_class(annotation) -> type | None:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _rows(cls: type, prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    comments = _comments(cls)
    for name, field in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        sub = _model_class(field.annotation)
        if sub is not None and name != "objectives":
            rows += _rows(sub, key + ("[]" if typing.get_origin(field.annotation) is list else ""))
            continue
        if field.is_required():
            default = "required"
        else:
            value = field.get_default(call_default_factory=True)
            default = json.dumps(value.model_dump(mode="json") if isinstance(value, BaseModel) else value,
                                 default=str)
        rows.append((key, _type_name(field.annotation).replace("|", "\\|"), default,
                     comments.get(name) or DOCS.get(key) or DOCS.get(name, "")))
    return rows


def config_reference() -> str:
    """The Markdown reference of every key (docs/config.md)."""
    from vlp.objectives import OBJECTIVES

    lines = ["# Run config reference", "",
             "Generated by `vlp config --schema` from the pydantic models in `vlp/config.py` and each objective's "
             "`Config`; do not edit by hand. Dotted keys are also command-line overrides (`train.steps=80`).", "",
             "| key | type | default | what it does |", "|---|---|---|---|"]
    for key, typ, default, doc in _rows(Config, ""):
        if key == "objectives":
            continue
        lines.append(f"| `{key}` | {typ} | `{default}` | {doc} |".replace("`required`", "required"))
    lines += ["", "## Objectives", "",
              "`objectives.<name>` (a weight alone is `objectives.<name>: 0.5`).", "",
              "| key | type | default | what it does |", "|---|---|---|---|"]
    for name in sorted(OBJECTIVES):
        for key, typ, default, doc in _rows(OBJECTIVES[name].Config, f"objectives.{name}"):
            lines.append(f"| `{key}` | {typ} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def json_schema() -> dict:
    return Config.model_json_schema()
