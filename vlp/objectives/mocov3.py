"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers"): the student
(backbone, 3-layer projector, 2-layer predictor) predicts, for each of two strong views, the momentum teacher's
(backbone, projector) embedding of the *other* view, by InfoNCE against every rank's teacher keys (gathered, no
gradient): ``ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k) = CE(q k^T / T, own index) * 2T`` (github.com/
facebookresearch/moco-v3, ``MoCo.contrastive_loss``; T = 0.2 for ViTs). The teacher tracks the image tower and the
projector (``teacher.tau`` 0.99 -> 1 along a cosine, as the paper). MLPs use LayerNorm instead of BatchNorm, so the
always-eval teacher and the student compute the same function of their weights (as BYOL here).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.gather import gather_nograd, rank_and_world
from vlp.objectives.heads import Head, mlp


def moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's ``contrastive_loss``: ``q [n, D]`` this rank's queries, ``k [n, D]`` this rank's keys (targets, no
    gradient; every rank's are the negatives); cross-entropy with the own key as label, scaled by ``2T``."""
    q, k = F.normalize(q, dim=-1), F.normalize(k.detach(), dim=-1)
    keys = gather_nograd(k)
    logits = q @ keys.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank_and_world()[0] * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


class MoCoV3Head(Head):
    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__()
        self.projector = mlp(width, hidden, dim, layers=3)
        self.predictor = mlp(dim, hidden, dim, layers=2)

    def head_forward(self, model, outputs, batch) -> dict:
        views = batch.views["mocov3"]                                # [2, B, 3, H, W]
        q = self.predictor(self.projector(model.encode_pooled(views.flatten(0, 1))))
        return {"mocov3/q": q.unflatten(0, views.shape[:2])}


@register("mocov3")
class MoCoV3Objective(Objective):
    class Config(RowsConfig):
        hidden_dim: int = Field(1024, gt=0)      # 4096 in the paper (ImageNet)
        proj_dim: int = Field(256, gt=0)
        temperature: float = Field(0.2, gt=0)
        crop_scale: tuple[float, float] = (0.2, 1.0)

    uses_teacher = True
    head_names = teacher_heads = ("mocov3_head",)

    def heads(self, ctx):
        return {"mocov3_head": MoCoV3Head(ctx.width, self.cfg.hidden_dim, self.cfg.proj_dim)}

    def view_groups(self, ctx):
        # BYOL's asymmetric augmentations, as MoCo v3: blur 1.0 / 0.1, solarize 0 / 0.2
        c = self.cfg
        views = (view_transform("strong", ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale, blur_p=1.0,
                                solarize_p=0.0),
                 view_transform("strong", ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale, blur_p=0.1,
                                solarize_p=0.2))
        return [ViewGroup("mocov3", tuple(c.kinds), views, recipe=f"byol-asym{c.crop_scale}")]

    @torch.no_grad()
    def teacher_forward(self, teacher, batch, step):
        views = batch.views["mocov3"]
        k = teacher.head("mocov3_head").projector(teacher.model.encode_pooled(views.flatten(0, 1)))
        return {"teacher/mocov3/k": k.unflatten(0, views.shape[:2])}

    def forward(self, outputs, batch):
        q = outputs["mocov3/q"]
        with torch.autocast(q.device.type, enabled=False):
            q, k = q.float(), outputs["teacher/mocov3/k"].detach().float()
            t = self.cfg.temperature
            loss = moco_infonce(q[0], k[1], t) + moco_infonce(q[1], k[0], t)
        with torch.no_grad():
            cos = F.cosine_similarity(q[0], k[1], dim=-1).mean()
        return loss, {"cos": cos}
