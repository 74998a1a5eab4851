"""Rotation prediction (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image
Rotations"): each image of the chosen rows is shown at 0, 90, 180 and 270 degrees and a 4-way head on the pooled
feature predicts which. One view group (``rotation``: a random crop per row, cut from the shared decode) is
rotated four ways on the device; the student runs unmasked on the 4 x rows, and the loss is the cross-entropy
over all of them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.heads import Head


class RotationHead(Head):
    """Rotates the ``rotation`` view 4 ways, encodes it with the student, predicts the rotation."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, 4)

    def head_forward(self, model, outputs, batch) -> dict:
        views = batch.views["rotation"][0]  # [B_rows, 3, H, W]
        rotated = torch.cat([torch.rot90(views, k, dims=(2, 3)) for k in range(4)])
        target = torch.arange(4, device=views.device).repeat_interleave(views.shape[0])
        return {"rotation_logits": self.fc(model.encode_pooled(rotated)), "rotation_target": target}


@register("rotation")
class RotationObjective(Objective):
    class Config(RowsConfig):
        crop_scale: tuple[float, float] = (0.5, 1.0)

    head_names = ("rotation_head",)

    def heads(self, ctx):
        return {"rotation_head": RotationHead(ctx.width)}

    def view_groups(self, ctx):
        c = self.cfg
        t = view_transform("crop", ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale)
        return [ViewGroup("rotation", tuple(c.kinds), (t,), recipe=f"crop{c.crop_scale}")]

    def forward(self, outputs, batch):
        logits, target = outputs["rotation_logits"].float(), outputs["rotation_target"]
        loss = F.cross_entropy(logits, target)
        return loss, {"acc": (logits.argmax(-1) == target).float().mean().detach()}
