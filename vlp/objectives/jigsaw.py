"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles"): a view of each row is cut into a 3x3 grid of cells; from each cell a ``tile_size`` tile is cut at a random
offset (the ``gap`` between tiles keeps edges from giving the answer away, as the paper's 64px tiles in 75px cells);
each tile's channels are normalized alone (``tile_norm``, the paper's guard against low-level shortcuts); the tiles
are shuffled by one of ``n_permutations`` fixed permutations and the student encodes each tile alone (its
patch grid through the interpolated positional embedding), a shared linear layer maps each tile's pooled feature
(the paper's fc6), and an MLP over the 9 concatenated features (fc7, fc8) classifies which permutation was applied.
``encode: image`` (not the paper's) encodes the 9 shuffled tiles side by side as one image instead, each position's
feature the mean of its patch tokens: the encoder then sees whole-image grids, as the kNN and linear probes do.

The permutation set follows the paper's "maximal Hamming distance" selection: from a seeded random first
permutation, repeatedly add the permutation of 9 elements farthest (in Hamming distance) from those chosen;
deterministic for a given ``n_permutations`` and ``permutation_seed`` (:func:`max_hamming_permutations`).
"""
from __future__ import annotations

import functools
import itertools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.heads import Head

GRID = 3


@functools.lru_cache(maxsize=8)
def max_hamming_permutations(k: int, seed: int = 0) -> torch.Tensor:
    """``[k, 9]``: ``k`` permutations of the 9 tiles, chosen greedily (Noroozi & Favaro 2016's maximal-distance
    selection): from a seeded random first one, each next one is the permutation farthest from those chosen, by
    the minimum Hamming distance to them, ties broken by the largest mean distance (the paper's code uses the mean
    alone, which lets near-duplicates in: minimum distance 2 for k = 64)."""
    n = GRID * GRID
    candidates = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(n))),
                             dtype=np.int8).reshape(-1, n)
    if not 1 <= k <= len(candidates):
        raise ValueError(f"objectives.jigsaw.n_permutations: needs 1 <= n <= {len(candidates)}")
    j = int(np.random.default_rng(seed).integers(len(candidates)))
    chosen = []
    nearest = np.full(len(candidates), n + 1, dtype=np.int64)   # min distance to the chosen set
    total = np.zeros(len(candidates), dtype=np.int64)           # summed distance to the chosen set
    for _ in range(k):
        chosen.append(j)
        d = (candidates != candidates[j]).sum(1)
        nearest, total = np.minimum(nearest, d), total + d
        j = int((nearest * (n * k + 1) + total).argmax())  # chosen ones have nearest 0: never picked again
    return torch.from_numpy(candidates[chosen].astype(np.int64))


def cut_tiles(view: torch.Tensor, tile: int, offsets: torch.Tensor) -> torch.Tensor:
    """``view [B, 3, S, S]`` (``S = 3 * cell``) -> tiles ``[B, 9, 3, tile, tile]`` in row-major cell order, tile
    ``t`` cut from cell ``t`` at ``offsets [B, 9, 2]`` (y, x; each in ``0..cell - tile``)."""
    B, C, S, _ = view.shape
    cell = S // GRID
    cells = view.reshape(B, C, GRID, cell, GRID, cell).permute(0, 2, 4, 3, 5, 1).reshape(B, GRID * GRID, cell, cell, C)
    ar = torch.arange(tile, device=view.device)
    ys, xs = offsets[..., 0:1] + ar, offsets[..., 1:2] + ar                 # [B, 9, tile]
    b = torch.arange(B, device=view.device)[:, None, None, None]
    t = torch.arange(GRID * GRID, device=view.device)[None, :, None, None]
    return cells[b, t, ys[..., :, None], xs[..., None, :]].permute(0, 1, 4, 2, 3)


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each tile's channels ``[..., C, t, t]`` to zero mean and unit std, independently (Noroozi & Favaro 2016, Sec.
    3.2: so that low-level statistics shared by neighbouring tiles are no shortcut); as the authors' code, a constant
    channel keeps std 1."""
    flat = tiles.flatten(-2)
    mean, std = flat.mean(-1, keepdim=True), flat.std(-1, keepdim=True)
    return ((flat - mean) / torch.where(std == 0, torch.ones_like(std), std)).unflatten(-1, tiles.shape[-2:])


def assemble(tiles: torch.Tensor) -> torch.Tensor:
    """``tiles [B, 9, C, t, t]`` (row-major positions) -> one image ``[B, C, 3t, 3t]`` with tile ``i`` at position ``i``."""
    B, _, C, t, _ = tiles.shape
    return tiles.reshape(B, GRID, GRID, C, t, t).permute(0, 3, 1, 4, 2, 5).reshape(B, C, GRID * t, GRID * t)


def cell_token_means(tokens: torch.Tensor, rows: int, cols: int, n: int) -> torch.Tensor:
    """``tokens [B, rows*n * cols*n, width]`` (row-major) of an image made of ``rows x cols`` cells of ``n x n``
    tokens -> ``[B, rows*cols, width]``: each cell's token mean, cells row-major."""
    grid = tokens.unflatten(1, (rows, n, cols, n))                     # [B, gy, y, gx, x, width]
    return grid.mean(dim=(2, 4)).flatten(1, 2)


def tile_token_means(model, tiles: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, 9, width]``: the shuffled ``tiles`` encoded together as one image (``assemble``), each position's
    feature the mean of the patch tokens that fall in its tile."""
    tokens = model.encode_visible(assemble(tiles), None)[1]          # [B, (3t/p)^2, width]
    return cell_token_means(tokens, GRID, GRID, tiles.shape[-1] // patch)


class JigsawHead(Head):
    def __init__(self, width: int, tile: int, gap: int, n_permutations: int, seed: int, tile_dim: int,
                 hidden: int, tile_norm: bool = True, encode: str = "tiles", patch: int = 1):
        super().__init__()
        self.tile, self.gap, self.tile_norm, self.encode, self.patch = tile, gap, tile_norm, encode, patch
        self.register_buffer("permutations", max_hamming_permutations(n_permutations, seed), persistent=False)
        self.tile_fc = nn.Linear(width, tile_dim)
        self.classifier = nn.Sequential(nn.GELU(), nn.Linear(GRID * GRID * tile_dim, hidden), nn.GELU(),
                                        nn.Linear(hidden, n_permutations))

    def puzzle(self, view: torch.Tensor):
        """Random tiles of ``view [B, 3, S, S]`` (each normalized alone with ``tile_norm``) shuffled by random
        permutations: ``(tiles [B, 9, ...], target [B])``; position ``i`` of row ``b`` holds tile
        ``permutations[target[b], i]``."""
        B, dev = view.shape[0], view.device
        offsets = torch.randint(0, self.gap + 1, (B, GRID * GRID, 2), device=dev)
        tiles = cut_tiles(view, self.tile, offsets)
        if self.tile_norm:
            tiles = normalize_tiles(tiles)
        target = torch.randint(0, self.permutations.shape[0], (B,), device=dev)
        return tiles[torch.arange(B, device=dev)[:, None], self.permutations[target]], target

    def classify(self, model, tiles: torch.Tensor) -> torch.Tensor:
        """Logits over the permutations for shuffled ``tiles [B, 9, 3, t, t]``: each tile encoded alone (the paper's
        context-free network), or (``encode: image``) the shuffled tiles side by side as one image, each tile's
        feature the mean of its patch tokens."""
        if self.encode == "tiles":
            feats = self.tile_fc(model.encode_pooled(tiles.flatten(0, 1))).unflatten(0, tiles.shape[:2])
        else:
            feats = self.tile_fc(tile_token_means(model, tiles, self.patch))
        return self.classifier(feats.flatten(1))

    def head_forward(self, model, outputs, batch) -> dict:
        tiles, target = self.puzzle(batch.views["jigsaw"][0])
        return {"jigsaw/logits": self.classify(model, tiles), "jigsaw/target": target}


def tile_geometry(c, ctx) -> tuple[int, int]:
    """``(tile, gap)``: by default a third of the image on the patch grid, and one patch of gap."""
    if not ctx.is_vit:
        raise ValueError("objectives.jigsaw: tiles are encoded alone on their own patch grid; needs a ViT image tower")
    tile = c.tile_size or max(ctx.patch, round(ctx.image_size / GRID / ctx.patch) * ctx.patch)
    if tile % ctx.patch:
        raise ValueError(f"objectives.jigsaw.tile_size: {tile} is not a multiple of the patch size {ctx.patch}")
    return tile, ctx.patch if c.gap is None else c.gap


@register("jigsaw")
class JigsawObjective(Objective):
    class Config(RowsConfig):
        n_permutations: int = Field(64, ge=2)    # 100 / 1000 in the paper
        permutation_seed: int = 0
        tile_size: int | None = Field(None, gt=0)  # default: image / 3 on the patch grid
        gap: int | None = Field(None, ge=0)         # default: one patch
        tile_dim: int = Field(128, gt=0)
        hidden_dim: int = Field(512, gt=0)
        crop_scale: tuple[float, float] = (0.5, 1.0)
        tile_norm: bool = True                   # each tile's channels to zero mean, unit std (the paper's)
        encode: Literal["tiles", "image"] = "tiles"  # tiles: each alone (the paper's); image: all 9 as one image

    head_names = ("jigsaw_head",)

    def heads(self, ctx):
        c = self.cfg
        tile, gap = tile_geometry(c, ctx)
        return {"jigsaw_head": JigsawHead(ctx.width, tile, gap, c.n_permutations, c.permutation_seed, c.tile_dim,
                                          c.hidden_dim, c.tile_norm, c.encode, ctx.patch)}

    def view_groups(self, ctx):
        tile, gap = tile_geometry(self.cfg, ctx)
        size = GRID * (tile + gap)
        t = view_transform("crop", size, ctx.mean, ctx.std, scale=self.cfg.crop_scale)
        return [ViewGroup("jigsaw", tuple(self.cfg.kinds), (t,), recipe=f"crop{self.cfg.crop_scale}@{size}")]

    def forward(self, outputs, batch):
        logits, target = outputs["jigsaw/logits"].float(), outputs["jigsaw/target"]
        loss = F.cross_entropy(logits, target)
        return loss, {"acc": (logits.argmax(-1) == target).float().mean().detach()}
