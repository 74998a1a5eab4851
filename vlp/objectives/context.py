"""Context prediction (Doersch, Gupta & Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction", arXiv:1505.05192): from a center patch and one of its 8 neighbours on a 3x3 grid, classify where the
neighbour lies (8 classes).

A view of each row (``context``: a random crop at ``3 t + 2 g + 2 j`` pixels) holds a 3x3 grid of ``t``-pixel patches
``g`` pixels apart, each jittered by up to ``j`` pixels in x and y (the paper's 96px patches, a gap of half a patch,
jitter up to 7px; here by default a tile of a third of the image on the ViT's patch grid, a gap of half a tile and a
jitter of 7/96 of a tile, at least 1: on a 32px image with patch 4, ``t`` 12, ``g`` 6, ``j`` 1, a 50px view). The
center patch and a random neighbour are cut, each encoded alone by the student (as Jigsaw's tiles: the patch grid
through the interpolated positional embedding), a shared linear layer maps each pooled feature (the paper's fc6), and
an MLP over the two concatenated features (center first; fc7, fc8) gives the 8 logits; cross-entropy.

Labels, row-major over the grid without its center: 0 upper-left, 1 above, 2 upper-right, 3 left, 4 right,
5 lower-left, 6 below, 7 lower-right (:data:`NEIGHBORS`). Against chromatic aberration the paper projects out or drops
colour: ``color_drop`` (off by default) keeps one random channel of each patch and replaces the two others by Gaussian
noise of ``color_drop_noise`` (the paper's 1/100) times the kept channel's std (on normalized pixels: noise around the
mean colour); the green-magenta projection is not implemented. The paper's pre-processing (downsampling some patches
to 100 pixels total and back) is not either.

Two options that are not the paper's, for small images (README, "Colorization, context prediction and BEiT"):
``tile_norm`` normalizes each patch's channels alone (Noroozi & Favaro 2016's guard against low-level shortcuts,
as Jigsaw's), before any colour dropping; ``encode: pair`` encodes the two patches side by side as one image
(center left, neighbour right: a fixed layout, so positions say nothing of the label), each patch's feature the mean
of its tokens, as Jigsaw's ``encode: image``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import Field
from torch import nn

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.heads import Head
from vlp.objectives.jigsaw import cell_token_means, normalize_tiles

GRID = 3
CENTER = (1, 1)
NEIGHBORS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))  # label -> (row, col) on the 3x3 grid


def cut_patches(view: torch.Tensor, t: int, corners: torch.Tensor) -> torch.Tensor:
    """``view [B, C, S, S]``, ``corners [B, P, 2]`` (top-left y, x) -> patches ``[B, P, C, t, t]``."""
    B = view.shape[0]
    ar = torch.arange(t, device=view.device)
    ys, xs = corners[..., 0:1] + ar, corners[..., 1:2] + ar                  # [B, P, t]
    b = torch.arange(B, device=view.device)[:, None, None, None]
    return view.permute(0, 2, 3, 1)[b, ys[..., :, None], xs[..., None, :]].permute(0, 1, 4, 2, 3)


def drop_colors(patches: torch.Tensor, noise: float = 0.01) -> torch.Tensor:
    """Each patch ``[..., 3, t, t]`` keeps one random channel; the others become Gaussian noise of ``noise`` times the
    kept channel's std (Doersch et al. 2015, Sec. 3.1, colour dropping)."""
    keep = torch.randint(0, 3, patches.shape[:-3], device=patches.device)
    kept = patches.gather(-3, keep[..., None, None, None].expand(*patches.shape[:-3], 1, *patches.shape[-2:]))
    std = kept.flatten(-3).std(-1)[..., None, None, None]
    out = torch.randn_like(patches) * noise * std
    mask = F.one_hot(keep, 3).to(torch.bool)[..., None, None]
    return torch.where(mask, patches, out)


class ContextHead(Head):
    def __init__(self, width: int, tile: int, gap: int, jitter: int, patch_dim: int, hidden: int,
                 color_drop: bool = False, color_drop_noise: float = 0.01, tile_norm: bool = False,
                 encode: str = "tiles", patch: int = 1):
        super().__init__()
        self.tile, self.gap, self.jitter = tile, gap, jitter
        self.color_drop, self.color_drop_noise = color_drop, color_drop_noise
        self.tile_norm, self.encode, self.patch = tile_norm, encode, patch
        self.register_buffer("neighbors", torch.tensor(NEIGHBORS), persistent=False)
        self.patch_fc = nn.Linear(width, patch_dim)
        self.classifier = nn.Sequential(nn.GELU(), nn.Linear(2 * patch_dim, hidden), nn.GELU(),
                                        nn.Linear(hidden, len(NEIGHBORS)))

    def corners(self, cells: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
        """Top-left pixels of the patches at grid ``cells [..., 2]`` (row, col) moved by ``jitter [..., 2]``."""
        return self.jitter + cells * (self.tile + self.gap) + jitter

    def sample(self, view: torch.Tensor):
        """``(patches [B, 2, 3, t, t], target [B])``: each row's center patch and the neighbour ``target``."""
        B, dev = view.shape[0], view.device
        target = torch.randint(0, len(NEIGHBORS), (B,), device=dev)
        cells = torch.stack([torch.tensor(CENTER, device=dev).expand(B, 2), self.neighbors[target]], dim=1)
        jitter = torch.randint(-self.jitter, self.jitter + 1, (B, 2, 2), device=dev)
        patches = cut_patches(view, self.tile, self.corners(cells, jitter))
        if self.tile_norm:
            patches = normalize_tiles(patches)
        if self.color_drop:
            patches = drop_colors(patches, self.color_drop_noise)
        return patches, target

    def classify(self, model, patches: torch.Tensor) -> torch.Tensor:
        """The 8 logits of ``patches [B, 2, 3, t, t]`` (center, neighbour): each encoded alone (the paper's), or
        (``encode: pair``) side by side as one ``t x 2t`` image, each patch's feature the mean of its tokens."""
        if self.encode == "tiles":
            feats = model.encode_pooled(patches.flatten(0, 1)).unflatten(0, patches.shape[:2])
        else:
            tokens = model.encode_visible(torch.cat([patches[:, 0], patches[:, 1]], dim=-1), None)[1]
            feats = cell_token_means(tokens, 1, 2, self.tile // self.patch)    # [B, 2, width]
        return self.classifier(self.patch_fc(feats).flatten(1))              # [center, neighbour] concatenated

    def head_forward(self, model, outputs, batch) -> dict:
        patches, target = self.sample(batch.views["context"][0])
        return {"context/logits": self.classify(model, patches), "context/target": target}


def context_geometry(c, ctx) -> tuple[int, int, int]:
    """``(tile, gap, jitter)``: by default a third of the image on the patch grid, half a tile, 7/96 of a tile."""
    if not ctx.is_vit:
        raise ValueError("objectives.context: patches are encoded alone on their own patch grid; "
                         "needs a ViT image tower")
    tile = c.patch_size or max(ctx.patch, round(ctx.image_size / GRID / ctx.patch) * ctx.patch)
    if tile % ctx.patch:
        raise ValueError(f"objectives.context.patch_size: {tile} is not a multiple of the ViT patch size {ctx.patch}")
    gap = tile // 2 if c.gap is None else c.gap
    jitter = max(1, round(tile * 7 / 96)) if c.jitter is None else c.jitter
    return tile, gap, jitter


@register("context")
class ContextObjective(Objective):
    class Config(RowsConfig):
        patch_size: int | None = Field(None, gt=0)  # default: image / 3 on the ViT's patch grid (the paper's 96)
        gap: int | None = Field(None, ge=0)         # default: half a patch (the paper's 48)
        jitter: int | None = Field(None, ge=0)      # default: 7/96 of a patch, at least 1 (the paper's 7)
        patch_dim: int = Field(128, gt=0)           # each patch's feature (fc6)
        hidden_dim: int = Field(512, gt=0)
        crop_scale: tuple[float, float] = (0.5, 1.0)
        color_drop: bool = False                    # keep one random channel per patch, noise in the others
        color_drop_noise: float = Field(0.01, ge=0)  # the noise's std over the kept channel's (the paper's 1/100)
        tile_norm: bool = False                     # each patch's channels to zero mean, unit std (not the paper's)
        encode: Literal["tiles", "pair"] = "tiles"  # tiles: each alone (the paper's); pair: both as one image

    head_names = ("context_head",)

    def heads(self, ctx):
        c = self.cfg
        tile, gap, jitter = context_geometry(c, ctx)
        return {"context_head": ContextHead(ctx.width, tile, gap, jitter, c.patch_dim, c.hidden_dim, c.color_drop,
                                            c.color_drop_noise, c.tile_norm, c.encode, ctx.patch)}

    def view_groups(self, ctx):
        tile, gap, jitter = context_geometry(self.cfg, ctx)
        size = GRID * tile + 2 * gap + 2 * jitter
        t = view_transform("crop", size, ctx.mean, ctx.std, scale=self.cfg.crop_scale)
        return [ViewGroup("context", tuple(self.cfg.kinds), (t,), recipe=f"crop{self.cfg.crop_scale}@{size}")]

    def forward(self, outputs, batch):
        logits, target = outputs["context/logits"].float(), outputs["context/target"]
        loss = F.cross_entropy(logits, target)
        return loss, {"acc": (logits.argmax(-1) == target).float().mean().detach()}
