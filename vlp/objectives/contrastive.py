"""Image-text contrastive objectives on the shared (masked) image pass.

- CLIP (Radford et al. 2021): open_clip's ``ClipLoss``, with its distributed feature gather.
- SigLIP (Zhai et al. 2023): open_clip's ``SigLipLoss``.
- UniCL (Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space"): labeled rows carry their
  class name in a prompt as text; every pair of rows with the same label is a positive, so the target of each
  row is uniform over its positives. With all labels distinct it is exactly the CLIP loss.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from pydantic import Field

from vlp.objectives.base import BuildContext, Objective, ObjectiveConfig, register
from vlp.objectives.gather import gather_nograd


class UniCLLoss(ClipLoss):
    """CLIP loss with a same-label-positives target matrix. ``labels`` identify rows: equal labels = positives."""

    def forward(self, image_features, text_features, logit_scale, labels, logit_bias=None):
        if image_features.ndim != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"UniCL expects [N, D] features of equal shape, got {tuple(image_features.shape)} "
                             f"and {tuple(text_features.shape)}")
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            if self.local_loss:
                raise ValueError("UniCL needs the full gathered logits (local_loss=False)")
            labels = gather_nograd(labels)
        targets = (labels[:, None] == labels[None, :]).to(logits_per_image.dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        loss_i = -(targets * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
        loss_t = -(targets.T * F.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
        return (loss_i + loss_t) / 2


def row_ids(label: torch.Tensor, rank: int) -> torch.Tensor:
    """UniCL row identities: the class index for labeled rows, a unique negative id for every other row."""
    n = label.shape[0]
    unique = -(rank * n + torch.arange(n, device=label.device)) - 1
    return torch.where(label >= 0, label, unique)


@register("contrastive")
class ContrastiveObjective(Objective):
    """CLIP / SigLIP / UniCL on the rows that carry text; after each optimizer step the logit scale is clamped
    to [0, ln 100] as in CLIP."""

    class Config(ObjectiveConfig):
        # clip: open_clip's ClipLoss on the full global logits, features gathered with grad (no --local-loss choice:
        # the same gradients, N x N logits on every process); siglip: open_clip's SigLipLoss
        loss: Literal["clip", "siglip"] = "clip"
        labels_as_text: bool = False  # UniCL (Yang et al. 2022): labeled rows carry a class prompt as text
        # the text rows' own masking ratio (FLIP: 50% ~free, 75% hurts at small scale); None: model.mask_ratio
        mask_ratio: float | None = Field(None, ge=0.0, lt=1.0)
        unmasked_tail_steps: int = Field(0, ge=0)  # FLIP's unmasked tuning: the last N steps unmasked

    accumulates = ("image_features", "text_features")
    needs_text = True

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        c, ctx = self.cfg, ctx or BuildContext()
        steps = ctx.cfg.train.steps if ctx.cfg is not None else 0
        self.tail_from = steps - c.unmasked_tail_steps if c.unmasked_tail_steps else None
        self.labels_as_text = c.labels_as_text
        self.kind = "siglip" if c.loss == "siglip" else ("unicl" if c.labels_as_text else "clip")
        if c.loss == "siglip" and c.labels_as_text:
            raise ValueError("objectives.contrastive: labels_as_text is implemented for loss: clip only")
        self.rank = ctx.rank
        if self.kind == "siglip":
            self.loss = SigLipLoss(rank=ctx.rank, world_size=ctx.world_size)
        elif self.kind == "unicl":
            self.loss = UniCLLoss(gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)
        else:
            # gather_with_grad: gradients equal those of one process with the whole global batch.
            self.loss = ClipLoss(gather_with_grad=True, rank=ctx.rank, world_size=ctx.world_size)

    @classmethod
    def check(cls, o, cfg):
        b = cfg.data.batch
        if b.paired == 0 and not (o.labels_as_text and b.labeled > 0):
            raise ValueError("objectives.contrastive: needs data.batch.paired > 0 (or labels_as_text with labeled rows)")
        text_rows = b.paired + (b.labeled if o.labels_as_text else 0)
        if 0 < text_rows < 2:
            raise ValueError(f"objectives.contrastive: {text_rows} row with text per step gives no negatives "
                             f"(a constant loss); give data.batch.paired (+ labeled with labels_as_text) >= 2")
        if o.loss == "siglip" and o.labels_as_text:
            raise ValueError("objectives.contrastive.labels_as_text: implemented for loss: clip only")

    @classmethod
    def card_settings(cls, o, cfg):
        return {"weight": o.weight, "loss": o.loss, "labels_as_text": o.labels_as_text,
                "mask_ratio": cfg.model.mask_ratio if o.mask_ratio is None else o.mask_ratio,
                **({"unmasked_tail_steps": o.unmasked_tail_steps} if o.unmasked_tail_steps else {})}

    def text_pass_ratio(self, step: int) -> float | None:
        if self.tail_from is not None and step >= self.tail_from:
            return 0.0
        return self.cfg.mask_ratio

    def after_optimizer_step(self, model, step):
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))  # as in CLIP

    def forward(self, outputs, batch):
        img, txt, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
        if self.kind == "siglip":
            loss = self.loss(img, txt, scale, outputs["logit_bias"])
        elif self.kind == "unicl":
            loss = self.loss(img, txt, scale, row_ids(batch["label"][batch["has_text"]], self.rank))
        else:
            loss = self.loss(img, txt, scale)
        return loss, {"logit_scale": scale.detach()}
