"""Training objectives, one file each, registered by name (``objectives.<name>`` in a run config).

Every ``*.py`` file in this package is imported, so adding an objective is adding its file (see ``base.py``); an
objective is imported from its own module (``vlp.objectives.contrastive``...), not from here.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch

from vlp.objectives.base import OBJECTIVES, BuildContext, Objective, ObjectiveConfig, ViewGroup, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["OBJECTIVES", "BuildContext", "Objective", "ObjectiveConfig", "ViewGroup", "register",
           "build_objectives", "combine"]


def build_objectives(cfg, ctx: BuildContext) -> dict[str, tuple[Objective, float]]:
    """name -> (objective, weight) for every objective of the run config with a positive weight."""
    return {name: (OBJECTIVES[name](o, ctx), o.weight)
            for name, o in cfg.objectives.items() if o.weight > 0}


def combine(objectives: dict, outputs: dict, batch) -> tuple[torch.Tensor, dict]:
    """Weighted sum of the objectives' losses; metrics are named ``loss/<name>`` and ``<name>/<metric>``."""
    total, metrics = 0.0, {}
    for name, (obj, weight) in objectives.items():
        loss, m = obj(outputs, batch)
        total = total + weight * loss
        metrics[f"loss/{name}"] = loss.detach()
        metrics.update({f"{name}/{k}": v for k, v in m.items()})
    metrics["loss/total"] = total.detach()
    return total, metrics
