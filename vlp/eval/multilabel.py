"""Zero-shot multi-label classification: shards whose samples carry several classes (``cls`` ``3,17,42`` or a
``tags`` member of class names, :func:`vlp.data.format.parse_labels`; weak supervision as Mahajan et al. 2018),
scored as clip_benchmark scores VOC 2007 multi-label: every class's image-text similarity ranks the images, and the
metric is the mean over classes of the average precision (non-interpolated AP; classes with no positive image are
left out), with the multi-label objective's own metric functions (``mean_average_precision``, ``precision_at_1``:
``top1_hit``, the share of images whose best class is one of their labels).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import webdataset as wds

from vlp.data.format import IMAGE_KEYS, Rejected, decode_image, parse_labels
from vlp.eval.data import expand_urls
from vlp.eval.zeroshot import input_dtype
from vlp.models.factory import unwrap
from vlp.objectives.multilabel import mean_average_precision, precision_at_1

log = logging.getLogger(__name__)


def multilabel_batches(spec, preprocess, classnames: Sequence[str], batch_size: int = 64,
                       max_samples: int | None = None, skipped: dict | None = None):
    """``(images [B,3,H,W], k-hot [B, classes])`` from multi-label (or single-label) shards, in order; a sample
    whose labels or image cannot be read is skipped and counted in ``skipped`` (reason -> count)."""
    index = {c: i for i, c in enumerate(classnames)}
    ds = wds.WebDataset(expand_urls(spec), shardshuffle=False, nodesplitter=lambda urls: urls, empty_check=False)
    images, targets, seen = [], [], 0
    skipped = {} if skipped is None else skipped
    for sample in ds:
        if max_samples is not None and seen >= max_samples:
            break
        labels = parse_labels(sample, classnames, index)
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        if isinstance(labels, Rejected) or key is None:
            reason = labels.reason if isinstance(labels, Rejected) else "no image"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        try:
            image = preprocess(decode_image(sample[key]))
        except Exception as err:  # noqa: BLE001  a corrupt image: counted, as training counts it
            log.debug("multi-label eval: %s: %s", sample.get("__key__"), err)
            skipped["corrupt image"] = skipped.get("corrupt image", 0) + 1
            continue
        target = torch.zeros(len(classnames))
        target[labels] = 1.0
        images.append(image)
        targets.append(target)
        seen += 1
        if len(images) == batch_size:
            yield torch.stack(images), torch.stack(targets)
            images, targets = [], []
    if images:
        yield torch.stack(images), torch.stack(targets)


def zeroshot_multilabel_eval(model, classifier: torch.Tensor, batches, device="cpu", skipped: dict | None = None
                              ) -> dict:
    """``{"mAP", "top1_hit", "n", "labels_per_image", "skipped"}`` of ``normalize(image features) @ classifier``
    (``classifier`` [D, C], as :func:`vlp.eval.zeroshot.build_classifier` builds it); ``skipped``: the dict
    :func:`multilabel_batches` counts into."""
    model = unwrap(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    scores, targets, skipped = [], [], {} if skipped is None else skipped
    for images, target in batches:
        feats = model.encode_image(images.to(device=device, dtype=input_dtype(model)), normalize=True).float()
        scores.append((feats @ classifier).cpu())
        targets.append(target)
    if not scores:
        raise ValueError(f"multi-label evaluation: the data yielded no usable sample (skipped: {skipped or 'none'})")
    scores, targets = torch.cat(scores), torch.cat(targets)
    return {"mAP": mean_average_precision(scores, targets), "top1_hit": float(precision_at_1(scores, targets)),
            "n": int(len(targets)),
            "labels_per_image": float(targets.sum(1).mean()), "skipped": sum(skipped.values())}
