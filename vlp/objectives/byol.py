"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): the student's prediction of one view regresses the
momentum teacher's projection of the other view, ``2 - 2 cos(q(z_s(v1)), z_t(v2))``, symmetrized over the two views;
no negatives. Two strong views per row (``byol`` view group, from the shared decode); the teacher tracks the image
tower and the projector (cosine tau, ``teacher.tau`` 0.996 -> 1 by default as in the paper). MLPs use LayerNorm
instead of BatchNorm, so the always-eval teacher and the student compute the same function of their weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.heads import Head, mlp


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``2 - 2 cos(p, z)`` (the paper's normalized MSE); ``z`` is a target (no grad)."""
    if p.shape != z.shape:
        raise ValueError(f"BYOL: prediction {tuple(p.shape)} and target {tuple(z.shape)} differ")
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOLHead(Head):
    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__()
        self.projector = mlp(width, hidden, dim)
        self.predictor = mlp(dim, hidden, dim)

    def head_forward(self, model, outputs, batch) -> dict:
        views = batch.views["byol"]                                  # [2, B, 3, H, W]
        pooled = model.encode_pooled(views.flatten(0, 1))
        return {"byol/p": self.predictor(self.projector(pooled)).unflatten(0, views.shape[:2])}


@register("byol")
class BYOLObjective(Objective):
    class Config(RowsConfig):
        hidden_dim: int = Field(1024, gt=0)
        proj_dim: int = Field(256, gt=0)
        crop_scale: tuple[float, float] = (0.2, 1.0)

    uses_teacher = True
    head_names = teacher_heads = ("byol_head",)

    def heads(self, ctx):
        return {"byol_head": BYOLHead(ctx.width, self.cfg.hidden_dim, self.cfg.proj_dim)}

    def view_groups(self, ctx):
        c = self.cfg
        t = view_transform("strong", ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale)
        return [ViewGroup("byol", tuple(c.kinds), (t, t), recipe=f"strong{c.crop_scale}")]

    def teacher_forward(self, teacher, batch, step):
        views = batch.views["byol"]
        z = teacher.head("byol_head").projector(teacher.model.encode_pooled(views.flatten(0, 1)))
        return {"teacher/byol/z": z.unflatten(0, views.shape[:2])}

    def forward(self, outputs, batch):
        p, z = outputs["byol/p"].float(), outputs["teacher/byol/z"].float()
        loss = (byol_loss(p[0], z[1]) + byol_loss(p[1], z[0])) / 2
        return loss, {"cos": F.cosine_similarity(p[0], z[1], dim=-1).mean().detach()}
