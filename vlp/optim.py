"""The optimizer's parameter groups and the learning-rate schedule (AdamW with decay on weight matrices only;
linear warmup, then cosine decay)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlp.config import OptimConfig

NO_DECAY_NAMES = ("bias", "embedding", "logit_scale", "logit_bias", "mask_token", "pos_embed")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on biases, norms, embeddings, logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup from ~0, then cosine decay to ``min_ratio`` at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(model: torch.nn.Module, o: OptimConfig, steps: int):
    """AdamW over :func:`param_groups` (``optim.*``), and its :func:`warmup_cosine` schedule to ``steps``."""
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps,
                                  fused=o.fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(o.warmup_steps, steps, o.min_lr_ratio))
    return optimizer, scheduler
