"""Classifier head on the pooled image feature (supervised objective on labeled rows)."""
from __future__ import annotations

from torch import nn


class ClassifierHead(nn.Module):
    """LayerNorm-free linear head, zero-initialised as in timm's ViT fine-tuning recipes."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x)
