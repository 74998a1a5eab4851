"""Training objectives, one module each; ``build_objectives`` picks them from the run config."""
from __future__ import annotations

import torch

from vlp.objectives.base import OBJECTIVES, Objective, register
from vlp.objectives.contrastive import ContrastiveObjective, UniCLLoss
from vlp.objectives.reconstruction import MAEObjective, mae_loss
from vlp.objectives.supervised import SupervisedObjective

__all__ = ["OBJECTIVES", "Objective", "register", "build_objectives", "combine", "ContrastiveObjective",
           "UniCLLoss", "MAEObjective", "mae_loss", "SupervisedObjective"]


def build_objectives(cfg, patch: int | None, rank: int = 0, world_size: int = 1) -> dict[str, tuple[Objective, float]]:
    """name -> (objective, weight) for every objective of the run config with a positive weight."""
    return {name: (OBJECTIVES[name].from_config(o, cfg, patch=patch, rank=rank, world_size=world_size), o.weight)
            for name, o in cfg.objectives.items() if o.weight > 0}


def combine(objectives: dict, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the objectives' losses; metrics are named ``loss/<name>`` and ``<name>/<metric>``."""
    total, metrics = 0.0, {}
    for name, (obj, weight) in objectives.items():
        loss, m = obj(outputs, batch)
        total = total + weight * loss
        metrics[f"loss/{name}"] = loss.detach()
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    metrics["loss/total"] = total.detach()
    return total, metrics
