"""Masked Siamese Networks (Assran et al. 2022, "Masked Siamese Networks for Label-Efficient Learning",
arXiv:2204.07141): the representation of a masked view of an image is matched to that of an unmasked view of the same
image, through soft assignments to learnable prototypes; the masked student distils the momentum teacher.

- **Anchor**: the shared masked pass of each row (its patches dropped, as MSN's random masking drops tokens), the
  pooled feature through the student's projector (a 3-layer MLP), L2-normalised.
- **Target** (no grad): the momentum teacher's projection of an unmasked view of the row (``msn`` view group:
  ``target_view`` weak, the pseudo-labels' clean view, or strong, the paper's augmentations), L2-normalised, scored
  against the *student's* prototypes (the same prototypes for both sides, as the reference), sharpened at
  ``sharpen`` (T 0.25) and balanced by ``sinkhorn_iterations`` Sinkhorn-Knopp steps over the global batch.
- **Loss**: ``H(target, softmax(anchor . prototypes / temperature))``, mean over rows, plus ``me_max_weight`` times
  the mean-entropy maximisation term ``sum_k pbar_k log pbar_k + log K`` of the anchors' mean prediction over the
  global batch (``pbar``), which keeps every prototype in use.

As the reference (github.com/facebookresearch/msn, ``src/losses.py``; lightly's ``MSNLoss``): temperature 0.1,
sharpening 0.25, me-max weight 1, 3 Sinkhorn iterations. Departures: one anchor view, the shared pass (the paper
adds 10 focal crops), and the projector uses LayerNorm instead of BatchNorm, so the always-eval teacher and the
student compute the same function of their weights (as BYOL's here). On mixed data it runs on any rows (``kinds``):
on every row it is the self-distillation of masked student features that SILC (Naeem et al. 2023) and iBOT (Zhou et
al. 2022) add to contrastive or masked training.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.gather import gather_with_grad
from vlp.objectives.heads import Head, mlp
from vlp.objectives.pseudolabel import sharpen
from vlp.objectives.swav import distributed_sinkhorn


def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``normalize(z) . normalize(prototypes)^T``: each row's cosine to each prototype, ``[B, K]``."""
    return F.normalize(z, dim=-1) @ F.normalize(prototypes, dim=-1).T


@torch.no_grad()
def msn_targets(target: torch.Tensor, prototypes: torch.Tensor, temperature: float, T: float,
                sinkhorn_iterations: int) -> torch.Tensor:
    """The targets ``[B, K]``: the teacher's assignments, sharpened at ``T``, Sinkhorn-balanced over the global batch
    (the reference's ``sinkhorn`` on probabilities is ``distributed_sinkhorn`` of their log at epsilon 1)."""
    probs = sharpen((prototype_scores(target, prototypes) / temperature).softmax(-1), T)
    if sinkhorn_iterations:
        probs = distributed_sinkhorn(probs.clamp_min(1e-30).log(), epsilon=1.0, iterations=sinkhorn_iterations)
    return probs


def me_max(mean_probs: torch.Tensor) -> torch.Tensor:
    """MSN's mean-entropy maximisation term ``sum_k pbar_k log pbar_k + log K`` (0 when ``pbar`` is uniform)."""
    return (mean_probs * mean_probs.clamp_min(1e-12).log()).sum() + math.log(mean_probs.numel())


class MSNHead(Head):
    def __init__(self, width: int, hidden: int, dim: int, n_prototypes: int, kinds: tuple[str, ...]):
        super().__init__()
        self.projector = mlp(width, hidden, dim, layers=3)
        bound = dim ** -0.5  # the reference's uniform(-1/sqrt(d), 1/sqrt(d))
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, dim).uniform_(-bound, bound))
        self.kinds = kinds  # the rows whose shared-pass features are the anchors

    def head_forward(self, model, outputs, batch) -> dict:
        pooled = outputs["pooled"][batch.rows_of(self.kinds)]  # the shared masked pass: the anchors
        # the scores, not the prototypes, leave the forward (DDP sees the parameter used once); the targets read a
        # detached copy
        return {"msn/scores": prototype_scores(self.projector(pooled), self.prototypes),
                "msn/prototypes": self.prototypes.detach()}


@register("msn")
class MSNObjective(Objective):
    class Config(RowsConfig):
        n_prototypes: int = Field(1024, gt=1)         # the reference's 1024 (ViT-S/B on ImageNet)
        hidden_dim: int = Field(1024, gt=0)           # the projector's (3 layers)
        proj_dim: int = Field(256, gt=0)
        temperature: float = Field(0.1, gt=0)        # the assignments' (anchor and target)
        sharpen: float = Field(0.25, gt=0, le=1)     # the targets' sharpening T
        sinkhorn_iterations: int = Field(3, ge=0)     # on the targets, over the global batch (0: off)
        me_max_weight: float = Field(1.0, ge=0)       # mean-entropy maximisation (against collapse)
        target_view: Literal["weak", "strong"] = "strong"  # the teacher's: weak crop + flip, or the paper's augment
        crop_scale: tuple[float, float] = (0.3, 1.0)  # the strong target view's (the reference's 0.3-1.0)

    uses_teacher = True
    head_names = teacher_heads = ("msn_head",)

    def heads(self, ctx):
        c = self.cfg
        return {"msn_head": MSNHead(ctx.width, c.hidden_dim, c.proj_dim, c.n_prototypes, tuple(c.kinds))}

    def view_groups(self, ctx):
        c = self.cfg
        t = view_transform(c.target_view, ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale)
        recipe = "weak" if c.target_view == "weak" else f"strong{c.crop_scale}"
        return [ViewGroup("msn", tuple(c.kinds), (t,), recipe=recipe)]

    def teacher_forward(self, teacher, batch, step):
        z = teacher.head("msn_head").projector(teacher.model.encode_pooled(batch.views["msn"][0]))
        return {"teacher/msn/z": z}

    def forward(self, outputs, batch):
        c = self.cfg
        log_anchor = (outputs["msn/scores"].float() / c.temperature).log_softmax(-1)
        anchor = log_anchor.exp()
        target = msn_targets(outputs["teacher/msn/z"].float(), outputs["msn/prototypes"].float(), c.temperature,
                             c.sharpen, c.sinkhorn_iterations)
        ce = -(target * log_anchor).sum(-1).mean()
        reg = me_max(gather_with_grad(anchor).mean(0))
        metrics = {"ce": ce.detach(), "me_max": reg.detach(),
                   "agree": (anchor.argmax(-1) == target.argmax(-1)).float().mean(),
                   "target_max": target.max(-1)[0].mean()}
        return ce + c.me_max_weight * reg, metrics
