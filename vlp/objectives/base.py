"""The objective interface: ``loss, metrics = objective(outputs, batch)``.

An objective is a small module that reads the model outputs it needs (declared in ``needs``) and the rows of the
batch it applies to. Objectives register themselves by name so a config key picks the implementation.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

OBJECTIVES: dict[str, Callable[..., "Objective"]] = {}


def register(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        cls.name = name
        return cls
    return wrap


class Objective(nn.Module):
    name: str = ""
    needs: tuple[str, ...] = ()  # model outputs read

    @classmethod
    def from_config(cls, o, cfg, *, patch: int | None, rank: int, world_size: int) -> "Objective":
        """Build from its ``ObjectiveConfig`` ``o`` and the run config ``cfg``."""
        raise NotImplementedError

    @classmethod
    def card_settings(cls, o, cfg) -> dict:
        """The settings the model card shows for this objective: its weight and every non-default field of ``o``."""
        settings = {"weight": o.weight}
        settings.update({k: v for k, v in o.model_dump(exclude_defaults=True).items() if k != "weight"})
        return settings

    def forward(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError
