"""Weak multi-label supervision (Mahajan et al. 2018, "Exploring the Limits of Weakly Supervised Pretraining").

Each labeled row carries k >= 1 classes (hashtags, JFT-style noisy labels; ``Batch.labels``, see
:mod:`vlp.data.format`). The paper's loss (``loss: softmax``): the target is the k-hot vector normalized to sum 1
(each of the image's k labels gets 1/k) and the loss is the cross-entropy between softmax(logits) and it,
``-sum_c t_c log softmax(z)_c``, averaged over rows. ``loss: bce``: a per-class sigmoid binary cross-entropy on the
k-hot vector, averaged over rows and classes. The classifier head is the supervised objective's (same ``classifier``
head, ``class_logits``), so the two are alternatives, not companions. A single-label row is the 1-hot case (its
softmax loss is the plain cross-entropy). Resampling (``data.sources[i].balance: sqrt``) and label noise
(``data.sources[i].noise``) are the source's (:mod:`vlp.data.sources`).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from vlp.objectives.base import ObjectiveConfig, register
from vlp.objectives.supervised import SupervisedObjective


def multi_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[N,K]`` class indices padded with -1 (or ``[N]`` single labels) -> ``[N,C]`` float k-hot targets."""
    if labels.dim() == 1:
        labels = labels[:, None]
    target = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    index = torch.where(labels >= 0, labels, torch.full_like(labels, num_classes))  # padding -> a spare column
    target.scatter_(1, index, 1.0)
    return target[:, :num_classes]


def softmax_multilabel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mahajan et al. 2018: cross-entropy between softmax(logits) and the k-hot ``target`` normalized to sum 1."""
    t = target / target.sum(1, keepdim=True).clamp_min(1)
    return -(t * torch.log_softmax(logits.float(), 1)).sum(1).mean()


def bce_multilabel_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-class sigmoid binary cross-entropy on the k-hot ``target``, averaged over rows and classes."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def precision_at_1(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fraction of rows whose top-scoring class is one of theirs (Mahajan et al.'s hashtag precision@1)."""
    return target.gather(1, logits.argmax(1, keepdim=True)).squeeze(1).float().mean()


def mean_average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """mAP over the classes with at least one positive row: per class, the mean of the precision at each positive
    in the ranking of the rows by score (ties: the order of ``torch.sort``, stable)."""
    aps = []
    for c in range(target.shape[1]):
        pos = target[:, c] > 0
        if not pos.any():
            continue
        order = torch.sort(scores[:, c].float(), descending=True, stable=True).indices
        hits = pos[order].float()
        precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1, dtype=torch.float32)
        aps.append(float((precision * hits).sum() / hits.sum()))
    return sum(aps) / len(aps) if aps else float("nan")


@register("multilabel")
class MultiLabelObjective(SupervisedObjective):
    """The supervised classifier head trained on every label of each labeled row (Mahajan et al. 2018)."""

    class Config(ObjectiveConfig):
        loss: Literal["softmax", "bce"] = "softmax"

    @classmethod
    def check(cls, o, cfg) -> None:
        super().check(o, cfg)
        sup = cfg.objectives.get("supervised")
        if sup is not None and sup.weight > 0:
            raise ValueError("objectives.multilabel: trains the supervised objective's classifier head on every "
                             "label; drop objectives.supervised (or set its weight to 0)")

    @classmethod
    def card_settings(cls, o, cfg):
        return {"weight": o.weight, "loss": o.loss}

    def forward(self, outputs, batch):
        rows = batch["label"] >= 0
        logits = outputs["class_logits"][rows]
        labels = batch.labels[rows] if getattr(batch, "labels", None) is not None else batch["label"][rows]
        target = multi_hot(labels, logits.shape[1])
        loss = (softmax_multilabel_loss if self.cfg.loss == "softmax" else bce_multilabel_loss)(logits, target)
        return loss, {"p@1": precision_at_1(logits.detach(), target)}
