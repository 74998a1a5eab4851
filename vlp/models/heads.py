"""Small heads objectives add to the student (each a :class:`vlp.models.model.Head`)."""
from __future__ import annotations

from torch import nn



class Head(nn.Module):
    """A module an objective adds to the student; ``head_forward(model, outputs, batch) -> dict`` runs inside the
    student's forward after the shared pass (so DDP sees its parameters) and adds the outputs it names."""

    def head_forward(self, model, outputs: dict, batch) -> dict:
        raise NotImplementedError


class ClassifierHead(Head):
    """LayerNorm-free linear head, zero-initialised as in timm's ViT fine-tuning recipes. Reads ``pooled``
    (the shared pass) and writes ``<output>`` (default ``class_logits``)."""

    def __init__(self, width: int, num_classes: int, output: str = "class_logits"):
        super().__init__()
        self.fc = nn.Linear(width, num_classes)
        self.output = output
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return self.fc(x)

    def head_forward(self, model, outputs, batch) -> dict:
        return {self.output: self(outputs["pooled"])}
