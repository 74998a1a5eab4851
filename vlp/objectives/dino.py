"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers"): self-distillation with
no labels. The momentum teacher sees the 2 global crops of a row, the student sees those and ``n_local`` small
local crops (multi-crop; local-to-global correspondence, as SILC, Naeem et al. 2023, adds to image-text training).
The student's softmax at ``student_temp`` matches the teacher's centered, sharpened softmax
``softmax((t - center) / teacher_temp)`` by cross-entropy over every (teacher global, other student view) pair;
the center is an EMA of the teacher's batch mean (all-reduced across ranks), a buffer saved in checkpoints.

As the reference (github.com/facebookresearch/dino): DINOHead is a GELU MLP (no norm, ``use_bn=False``) to an
L2-normalised bottleneck and a weight-normalised prototype layer (its scale fixed at 1 with ``norm_last_layer``);
the student encodes the crops of each resolution in one batch (MultiCropWrapper), local crops through the
positional embedding interpolated to their grid; the teacher temperature warms up linearly from
``warmup_teacher_temp`` over ``warmup_teacher_temp_steps`` (default: 10% of ``train.steps``); the prototype layer's
gradient is dropped for the first ``freeze_last_layer_steps`` steps. Views follow DataAugmentationDINO (global crops:
blur p 1.0 / p 0.1 + solarize p 0.2; local crops: blur p 0.5). Optional KoLeo regulariser (Sablayrolles et al.
2019, as DINOv2, Oquab et al. 2023) on the student's L2-normalised global features, summed over the 2 global crops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlp.objectives.base import BuildContext, Objective, RowsConfig, register
from vlp.objectives.gather import all_reduce_sum, rank_and_world
from vlp.objectives.heads import Head, multicrop_groups, multicrop_pooled


def dino_loss(student: torch.Tensor, q: torch.Tensor, student_temp: float) -> torch.Tensor:
    """DINO's cross-entropy: ``student [V, B, K]`` logits (views 0, 1 are the global crops), ``q [2, B, K]`` the
    teacher's probabilities; ``-sum_k q log softmax(s / student_temp)``, mean over rows, then over the pairs
    (teacher global ``i``, student view ``v != i``)."""
    logp = F.log_softmax(student / student_temp, dim=-1)
    ce = -torch.einsum("ibk,vbk->iv", q, logp) / q.shape[1]
    return ce[~torch.eye(2, student.shape[0], dtype=torch.bool, device=ce.device)].mean()


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Sablayrolles et al. 2019; DINOv2's KoLeoLoss): ``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised
    rows, ``nn(i)`` the nearest other row (by inner product)."""
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        nearest = (x @ x.T).fill_diagonal_(-2).argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


class WeightNormLinear(nn.Module):
    """``nn.utils.weight_norm(nn.Linear(d_in, d_out, bias=False))``: ``w = g v / ||v||`` per output, with ``g``
    fixed at 1 (no parameter) when ``fix_norm`` (DINO's ``norm_last_layer``)."""

    def __init__(self, d_in: int, d_out: int, fix_norm: bool = True):
        super().__init__()
        self.weight = nn.Parameter(nn.Linear(d_in, d_out, bias=False).weight.detach())
        self.g = None if fix_norm else nn.Parameter(torch.ones(d_out, 1))

    def forward(self, x):
        w = self.weight / self.weight.norm(dim=1, keepdim=True)
        return F.linear(x, w if self.g is None else self.g * w)


class DINOHead(Head):
    def __init__(self, width: int, hidden: int, bottleneck: int, out_dim: int, norm_last_layer: bool = True,
                 n_local: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, out_dim, norm_last_layer)
        self.n_local = n_local

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    def head_forward(self, model, outputs, batch) -> dict:
        pooled = multicrop_pooled(model, batch, "dino", self.n_local)
        rows = batch.views["dino_global"].shape[1]
        return {"dino/student": self(torch.cat(pooled)).unflatten(0, (-1, rows)),        # [2 + n_local, B, K]
                "dino/pooled": pooled[0].unflatten(0, (2, rows))}                           # global features


@register("dino")
class DINOObjective(Objective):
    class Config(RowsConfig):
        out_dim: int = Field(1024, gt=0)                 # prototypes (the paper's 65536 is for ImageNet)
        hidden_dim: int = Field(512, gt=0)
        bottleneck_dim: int = Field(128, gt=0)
        n_local: int = Field(4, ge=0)
        global_scale: tuple[float, float] = (0.4, 1.0)
        local_scale: tuple[float, float] = (0.1, 0.4)
        local_size: int | None = Field(None, gt=0)       # default: half the image size, a multiple of the patch
        student_temp: float = Field(0.1, gt=0)
        teacher_temp: float = Field(0.04, gt=0)
        warmup_teacher_temp: float = Field(0.04, gt=0)
        warmup_teacher_temp_steps: int | None = Field(None, ge=0)  # default: 10% of train.steps
        center_momentum: float = Field(0.9, ge=0, le=1)
        koleo_weight: float = Field(0.0, ge=0)
        freeze_last_layer_steps: int = Field(0, ge=0)
        norm_last_layer: bool = True

    uses_teacher = True
    head_names = teacher_heads = ("dino_head",)

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        ctx = ctx or BuildContext()
        if self.cfg.warmup_teacher_temp_steps is None:
            self.cfg.warmup_teacher_temp_steps = ctx.cfg.train.steps // 10 if ctx.cfg is not None else 0
        self.register_buffer("center", torch.zeros(1, self.cfg.out_dim))

    @classmethod
    def check(cls, o, cfg):
        super().check(o, cfg)
        for key in ("global_scale", "local_scale"):
            lo, hi = getattr(o, key)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"objectives.dino.{key}: needs 0 < min <= max <= 1 (got {[lo, hi]})")

    def heads(self, ctx):
        c = self.cfg
        return {"dino_head": DINOHead(ctx.width, c.hidden_dim, c.bottleneck_dim, c.out_dim, c.norm_last_layer,
                                      c.n_local)}

    def view_groups(self, ctx):
        # DataAugmentationDINO: global crops blur p 1.0 / p 0.1 + solarize p 0.2; local crops blur p 0.5
        return multicrop_groups("dino", self.cfg, ctx, ({"blur_p": 1.0, "solarize_p": 0.0},
                                                        {"blur_p": 0.1, "solarize_p": 0.2}),
                                {"blur_p": 0.5, "solarize_p": 0.0})

    def teacher_temp(self, step: int) -> float:
        """Linear from ``warmup_teacher_temp`` (step 0) to ``teacher_temp`` (last warm-up step), then constant."""
        c = self.cfg
        warm = c.warmup_teacher_temp_steps or 0
        if step >= warm:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / max(warm - 1, 1)

    @torch.no_grad()
    def teacher_forward(self, teacher, batch, step):
        views = batch.views["dino_global"]  # the teacher sees the global crops only
        pooled = teacher.model.encode_pooled(views.flatten(0, 1))
        logits = teacher.head("dino_head")(pooled).unflatten(0, views.shape[:2])
        return {"teacher/dino/logits": logits, "teacher/dino/temp": self.teacher_temp(step)}

    def forward(self, outputs, batch):
        c = self.cfg
        t, temp = outputs["teacher/dino/logits"].detach().float(), outputs["teacher/dino/temp"]
        with torch.autocast(t.device.type, enabled=False):  # in fp32, as DINO's (autocast) softmaxes and products
            q = F.softmax((t - self.center) / temp, dim=-1)                       # [2, B, K]
            loss = dino_loss(outputs["dino/student"].float(), q, c.student_temp)
            with torch.no_grad():
                mean_q = q.flatten(0, 1).mean(0)
                metrics = {"teacher_entropy": torch.special.entr(q).sum(-1).mean(),  # -> log K: uniform collapse
                           "mean_entropy": torch.special.entr(mean_q).sum(),         # -> 0: one-prototype collapse
                           "teacher_temp": torch.tensor(float(temp))}
            if c.koleo_weight > 0:
                koleo = sum(koleo_loss(x) for x in outputs["dino/pooled"].float())
                loss = loss + c.koleo_weight * koleo
                metrics["koleo"] = koleo.detach()
        self.update_center(t)  # after the loss, as DINOLoss: this step's loss uses the previous center
        return loss, metrics

    @torch.no_grad()
    def update_center(self, t: torch.Tensor) -> None:
        """``center = m center + (1 - m) mean(teacher logits)``, the mean over every rank's rows."""
        t = t.flatten(0, 1)
        total, n = all_reduce_sum(t.sum(0, keepdim=True)), t.shape[0] * rank_and_world()[1]
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(total / n, alpha=1 - m)

    def after_backward(self, model, step):
        if step < self.cfg.freeze_last_layer_steps:  # DINO's cancel_gradients_last_layer
            for p in model.dino_head.last_layer.parameters():
                p.grad = None
