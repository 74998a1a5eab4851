"""Supervised classification: cross-entropy of the classifier head on the labeled rows (label >= 0)."""
from __future__ import annotations

import logging

import torch.nn.functional as F
from pydantic import Field

from vlp.objectives.base import Objective, ObjectiveConfig, register
from vlp.objectives.heads import CLASSIFIER, ClassifierHead

log = logging.getLogger(__name__)


@register("supervised")
class SupervisedObjective(Objective):
    """A linear classifier head on the shared pass's pooled feature, trained on the labeled rows."""

    class Config(ObjectiveConfig):
        label_smoothing: float = Field(0.0, ge=0, lt=1)

    kinds = ("labeled",)
    head_names = (CLASSIFIER,)

    @classmethod
    def card_settings(cls, o, cfg):
        return {"weight": o.weight, "label_smoothing": o.label_smoothing}

    def heads(self, ctx):
        if ctx.num_classes <= 0:
            raise ValueError("model.num_classes: the supervised objective needs a class count "
                             "(or classnames on a labeled source)")
        return {CLASSIFIER: ClassifierHead(ctx.width, ctx.num_classes)}

    def forward(self, outputs, batch):
        if getattr(batch, "labels", None) is not None and not getattr(self, "_warned_multilabel", False):
            self._warned_multilabel = True
            log.warning("objectives.supervised: multi-label rows (several ids in .cls, or .tags) train on their "
                        "first label only; objectives.multilabel trains on all of them (Mahajan et al. 2018)")
        rows = batch["label"] >= 0
        logits, labels = outputs["class_logits"][rows], batch["label"][rows]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return loss, {"acc": acc.detach()}
