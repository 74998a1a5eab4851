"""What several objectives share besides the contract (``base.py``), as lightly's ``heads.py``: the head base class,
the classifier head, the projection / prediction MLP and the multi-crop view helpers.

A head is an ``nn.Module`` an objective adds to the student (``Objective.heads``); its ``head_forward(model,
outputs, batch) -> dict`` runs inside the student's forward after the shared pass (so DDP sees its parameters) and
adds the outputs it names.
"""
from __future__ import annotations

import torch
from torch import nn

from vlp.data.batch import ViewGroup
from vlp.data.views import view_transform
from vlp.objectives.gather import GlobalBatchNorm1d

CLASSIFIER = "classifier"  # the student attribute of the classifier head (supervised, multilabel; pseudolabel reads it)


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


def mlp(dim_in: int, hidden: int, dim_out: int, layers: int = 2, norm: str = "layer") -> nn.Sequential:
    """The projection / prediction MLP of the self-supervised heads: ``layers`` linear layers, a norm and GELU
    after each but the last (BYOL's, Grill et al. 2020, and SwAV's, Caron et al. 2020, projector: 2 layers; MoCo
    v3's ``_build_mlp``, Chen, Xie & He 2021: a 3-layer projector, a 2-layer predictor). ``norm``: "layer"
    (LayerNorm, so an always-eval teacher and the student compute the same function of their weights) or "batch"
    (BatchNorm over the global batch, the references' SyncBN, after bias-free linear layers: BatchNorm removes any
    bias, as MoCo v3's ``_build_mlp``)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        last = i == layers - 1
        d_in, d_out = dim_in if i == 0 else hidden, dim_out if last else hidden
        mods.append(nn.Linear(d_in, d_out, bias=last or norm != "batch"))
        if not last:
            mods += [{"layer": nn.LayerNorm, "batch": GlobalBatchNorm1d}[norm](d_out), nn.GELU()]
    return nn.Sequential(*mods)


def local_crop_size(c, ctx, name: str = "dino") -> int:
    """``local_size``, by default half the image size rounded to a multiple of the patch (``objectives.<name>``'s
    multi-crop: DINO's, SwAV's)."""
    if not ctx.is_vit:
        raise ValueError(f"objectives.{name}.n_local: local crops need a ViT image tower (positional-embedding "
                         "interpolation); set n_local: 0")
    size = c.local_size or max(ctx.patch, round(ctx.image_size / 2 / ctx.patch) * ctx.patch)
    if size % ctx.patch:
        raise ValueError(f"objectives.{name}.local_size: {size} is not a multiple of the patch size {ctx.patch}")
    return size


def multicrop_groups(name: str, c, ctx, global_views: tuple[dict, ...], local_view: dict) -> list[ViewGroup]:
    """Multi-crop view groups (DINO's, SwAV's): ``<name>_global``, one strong view per entry of ``global_views``
    (``view_transform`` settings: ``blur_p``, ``solarize_p``) at the image size and ``c.global_scale``, and, with
    ``c.n_local``, ``<name>_local``: ``c.n_local`` strong views of ``local_view``'s settings at
    :func:`local_crop_size` and ``c.local_scale``."""
    kinds = tuple(c.kinds)

    def strong(size, scale, settings):
        return view_transform("strong", size, ctx.mean, ctx.std, scale=scale, **settings)
    views = tuple(strong(ctx.image_size, c.global_scale, v) for v in global_views)
    groups = [ViewGroup(f"{name}_global", kinds, views, recipe=f"{name}-global{c.global_scale}")]
    if c.n_local:
        size = local_crop_size(c, ctx, name)
        groups.append(ViewGroup(f"{name}_local", kinds, (strong(size, c.local_scale, local_view),) * c.n_local,
                                recipe=f"{name}-local{c.local_scale}@{size}"))
    return groups


def multicrop_pooled(model, batch, name: str, n_local: int) -> list[torch.Tensor]:
    """The student's pooled features of the ``<name>_global`` views and (``n_local``) the ``<name>_local`` ones, one
    pass per resolution: ``[[2 * B, W], [n_local * B, W]]``."""
    crops = [batch.views[f"{name}_global"]] + ([batch.views[f"{name}_local"]] if n_local else [])
    return [model.encode_pooled(c.flatten(0, 1)) for c in crops]
