"""Zero-shot classification: classifier weights from prompts (open_clip), saving them, top-k evaluation, predict."""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F

from vlp.eval.data import template_fns
from vlp.models.factory import unwrap

log = logging.getLogger(__name__)


@torch.no_grad()
def build_classifier(model, tokenizer, classnames: Sequence[str], templates: Sequence, device="cpu",
                     num_classes_per_batch: int | None = 10, progress_every: int = 1000) -> torch.Tensor:
    """Zero-shot weights ``[embed_dim, num_classes]``: per class, the mean of the normalized text embeddings
    over templates, renormalized (``open_clip.build_zero_shot_classifier``). Templates are strings with a
    ``{c}`` placeholder (or callables). Over ``progress_every`` classes, a progress line every ``progress_every``
    classes (:func:`_progress`)."""
    model = unwrap(model)
    classnames, fns = list(classnames), template_fns(templates)
    step = len(classnames) if len(classnames) <= progress_every else progress_every
    parts, t0 = [], time.monotonic()
    for start in range(0, len(classnames) or 1, max(step, 1)):
        parts.append(open_clip.build_zero_shot_classifier(
            model, tokenizer=tokenizer, classnames=classnames[start:start + step], templates=fns,
            num_classes_per_batch=num_classes_per_batch, device=device).float())
        if step < len(classnames):
            done, took = min(start + step, len(classnames)), time.monotonic() - t0
            _progress(f"zero-shot classifier: {done}/{len(classnames)} classes x {len(fns)} templates, "
                      f"{took:.0f} s, ~{took / done * (len(classnames) - done):.0f} s left")
    return torch.cat(parts, dim=1) if len(parts) != 1 else parts[0]


def _progress(message: str) -> None:
    """A progress line: logged at INFO where logging shows INFO (training), else on stderr (``vlp eval``)."""
    if log.isEnabledFor(logging.INFO) and logging.getLogger().handlers:
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def save_classifier(path: str | os.PathLike, weights: torch.Tensor, classnames: Sequence[str],
                    templates: Sequence) -> None:
    """Save ``weights`` ``[embed_dim, num_classes]`` as safetensors; class names and templates in the metadata."""
    from safetensors.torch import save_file

    weights = weights.detach().float().cpu().contiguous()
    if weights.shape[1] != len(classnames):
        raise ValueError(f"classifier has {weights.shape[1]} columns for {len(classnames)} class names")
    templates = [t("{c}") if callable(t) else str(t) for t in templates]
    save_file({"weights": weights}, str(path),
              metadata={"classnames": json.dumps(list(classnames)), "templates": json.dumps(templates),
                        "format": "vlp-zeroshot-classifier"})


def load_classifier(path: str | os.PathLike):
    """Returns ``(weights [embed_dim, num_classes], classnames, templates)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        weights = f.get_tensor("weights")
    return weights, json.loads(meta.get("classnames", "[]")), json.loads(meta.get("templates", "[]"))


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # [B, maxk]
    hit = pred.eq(labels.view(-1, 1))
    return {k: int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def zeroshot_eval(model, classifier: torch.Tensor, loader, device="cpu") -> dict:
    """Top-1 / top-5 accuracy of argmax over ``normalize(image_features) @ classifier``.

    ``loader`` yields ``(images, labels)``. Returns ``{"top1", "top5", "mean_per_class_recall", "n"}`` (top-5 is
    top-min(5, classes); the mean per-class recall is over the classes present, as clip_benchmark's).
    """
    model = unwrap(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    correct = {1: 0, 5: 0}
    n = 0
    num_classes = classifier.shape[1]
    per_class = torch.zeros(2, num_classes, dtype=torch.long)  # [hits, samples] of each true class
    for images, labels in loader:
        images = images.to(device=device, dtype=input_dtype(model))
        labels = labels.to(device)
        if len(labels) and (labels.min() < 0 or labels.max() >= classifier.shape[1]):
            bad = labels[(labels < 0) | (labels >= classifier.shape[1])][0].item()
            raise ValueError(f"zero-shot evaluation: a sample has label {bad} but the classifier has "
                             f"{classifier.shape[1]} classes; give the data's full class list (--classnames)")
        feats = model.encode_image(images, normalize=True).float()
        logits = feats @ classifier
        c = _topk_correct(logits, labels)
        correct[1] += c[1]
        correct[5] += c[5]
        n += len(labels)
        valid = (labels >= 0) & (labels < num_classes)
        hit = (logits.argmax(dim=-1) == labels) & valid
        per_class[0] += torch.bincount(labels[hit].cpu(), minlength=num_classes)
        per_class[1] += torch.bincount(labels[valid].cpu(), minlength=num_classes)
    if n == 0:
        raise ValueError("zero-shot evaluation: the data yielded no samples (check the shard spec)")
    present = per_class[1] > 0  # clip_benchmark: balanced accuracy over the classes the data holds
    recall = (per_class[0][present].double() / per_class[1][present].double()).mean().item()
    return {"top1": correct[1] / n, "top5": correct[5] / n, "mean_per_class_recall": recall, "n": n}


def input_dtype(model) -> torch.dtype:
    """The dtype image batches are cast to (the vision tower's parameters', e.g. bf16 models)."""
    for p in unwrap(model).visual.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def logit_scale_of(model, default: float = 100.0) -> float:
    scale = getattr(unwrap(model), "logit_scale", None)
    if scale is None:
        return default
    return float(scale.detach().exp()) if isinstance(scale, torch.Tensor) else float(scale)


@torch.no_grad()
def predict(model, preprocess, classifier: torch.Tensor, classnames: Sequence[str], image_paths, k: int = 5,
            device="cpu", logit_scale: float | None = None, batch_size: int = 32,
            errors: dict | None = None) -> list[list[tuple[str, float]] | None]:
    """For each image file, the top-``k`` ``(classname, probability)`` pairs, probabilities being
    ``softmax(logit_scale * cosine logits)`` (``logit_scale`` defaults to the model's, else 100).

    A file that cannot be read as an image gets ``None`` (its error in ``errors[path]`` when given); the others are
    still classified. Files are decoded as training and eval shards are (:func:`vlp.data.format.decode_image`: an
    image too thin to resize safely is refused before decoding, transparency is composited on white)."""
    from pathlib import Path

    from vlp.data.format import decode_image

    model = unwrap(model)
    scale = logit_scale_of(model) if logit_scale is None else float(logit_scale)
    classifier = classifier.to(device=device, dtype=torch.float32)
    k = min(k, classifier.shape[1])
    paths = [str(p) for p in image_paths]
    results: list[list[tuple[str, float]] | None] = [None] * len(paths)
    readable: list[tuple[int, torch.Tensor]] = []
    for i, path in enumerate(paths):
        try:
            readable.append((i, preprocess(decode_image(Path(path).read_bytes()))))
        except Exception as exn:  # missing file, not an image, truncated: PIL and the OS raise many types
            if errors is not None:
                errors[path] = f"{type(exn).__name__}: {exn}"
    for start in range(0, len(readable), batch_size):
        chunk = readable[start:start + batch_size]
        batch = torch.stack([img for _, img in chunk]).to(device=device, dtype=input_dtype(model))
        feats = model.encode_image(batch, normalize=True).float()
        top = F.softmax(scale * (feats @ classifier), dim=-1).topk(k, dim=-1)
        for (i, _), vals, idxs in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results[i] = [(classnames[j], v) for j, v in zip(idxs, vals)]
    return results
