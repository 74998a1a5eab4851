"""Supervised classification: cross-entropy of the classifier head on the labeled rows (label >= 0)."""
from __future__ import annotations

import torch.nn.functional as F

from vlp.objectives.base import Objective, register


@register("supervised")
class SupervisedObjective(Objective):
    needs = ("class_logits",)

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    @classmethod
    def from_config(cls, o, cfg, *, patch, rank, world_size):
        return cls(o.label_smoothing)

    @classmethod
    def card_settings(cls, o, cfg) -> dict:
        return {"weight": o.weight, "label_smoothing": o.label_smoothing}

    def forward(self, outputs, batch):
        rows = batch["label"] >= 0
        logits, labels = outputs["class_logits"][rows], batch["label"][rows]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc": acc.detach()}
