"""Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization", arXiv:1603.08511): from the lightness
``L`` of a CIE Lab image, predict a distribution over quantized ``ab`` colours at every pixel.

A view group (``colorization``: a random crop per row, kept as raw sRGB in [0, 1]) is converted on the device to Lab
(D65, as skimage's ``rgb2lab``, the paper's); the student encodes the ``L`` channel alone, shown as the neutral-grey
sRGB image of that lightness replicated to 3 channels and normalized as any input; a head maps each patch token to
``Q`` logits at each of ``(patch / stride)^2`` cells (``stride`` 4 by default: the paper's predictions at a quarter of
the input resolution, 56 of 224; on a 32px image with patch 4, one prediction per token). The loss is the paper's
(Eq. 2, 4) multinomial cross-entropy ``-sum_q Z_q log Z^_q`` weighted by ``v = w[argmax_q Z]``, where

- ``Z`` soft-encodes the pixel's ``ab``: its ``k = 5`` nearest bins, weights ``exp(-d^2 / 2 sigma^2)`` (sigma 5),
  normalized to sum 1;
- the bins: centers on a 10-wide ab grid; ``bins: gamut`` (default) keeps those some 8-bit sRGB colour quantizes to
  (derived in code from the sRGB cube: Q = 261; the paper's 313 ``pts_in_hull`` counts a looser hull of the same grid
  range), ``bins: grid`` every point of the grid over [-110, 110]^2 (Q = 529);
- ``w ∝ ((1 - lambda) p~ + lambda / Q)^-1``, lambda 0.5, normalized so ``E_p~[w] = 1``; ``p~`` the empirical
  distribution of the pixels' nearest bins smoothed by a Gaussian (sigma 5) over ab.

Departures: ``p~`` is estimated online (the running mean of every batch's histogram, all-reduced across ranks,
buffers saved in checkpoints; the current batch counts before its weights are taken) instead of precomputed over
ImageNet; each pixel of the crop is a target, against the prediction of the cell that holds it (nearest
upsampling; the paper subsamples the targets to the prediction grid), and the loss is the mean over pixels (the
paper's sum, divided by their number). The annealed-mean decoding (T = 0.38) is inference-only and not here.
"""
from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.gather import all_reduce_sum
from vlp.objectives.heads import Head

GRID_STEP = 10.0     # ab bin width (the paper's)
GRID_LIMIT = 110.0   # the grid's centers span [-110, 110] on a and b
WHITE = (0.95047, 1.0, 1.08883)  # D65, as skimage.color
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
              (0.212671, 0.715160, 0.072169),
              (0.019334, 0.119193, 0.950227))


def srgb_to_linear(rgb: torch.Tensor) -> torch.Tensor:
    return torch.where(rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0.0031308, 1.055 * x.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, 12.92 * x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB ``[..., 3, H, W]`` in [0, 1] (clamped) -> CIE Lab ``[..., 3, H, W]`` (L in [0, 100]), D65 white."""
    lin = srgb_to_linear(rgb.clamp(0, 1))
    m = torch.tensor(RGB_TO_XYZ, dtype=lin.dtype, device=lin.device)
    xyz = torch.einsum("ij,...jhw->...ihw", m, lin)
    xyz = xyz / torch.tensor(WHITE, dtype=lin.dtype, device=lin.device)[:, None, None]
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lightness_image(rgb: torch.Tensor) -> torch.Tensor:
    """The L channel of ``rgb [..., 3, H, W]`` as an sRGB image: the neutral grey (a = b = 0) of the same lightness,
    on all 3 channels (for a = b = 0, Lab -> XYZ gives the white point times Y, i.e. linear RGB (Y, Y, Y))."""
    y = torch.einsum("j,...jhw->...hw", torch.tensor(RGB_TO_XYZ[1], dtype=rgb.dtype, device=rgb.device),
                     srgb_to_linear(rgb.clamp(0, 1)))
    return linear_to_srgb(y).unsqueeze(-3).expand(*y.shape[:-2], 3, *y.shape[-2:])


@functools.lru_cache(maxsize=2)
def ab_bins(kind: str = "gamut") -> torch.Tensor:
    """``[Q, 2]`` bin centers (a, b) on the 10-wide grid. ``gamut``: the centers some 8-bit sRGB colour rounds to
    (the six faces of the RGB cube at every 8-bit level hold the ab gamut's boundary; Q = 261); ``grid``: all of
    [-110, 110]^2 (Q = 529)."""
    if kind == "grid":
        r = torch.arange(-GRID_LIMIT, GRID_LIMIT + 1, GRID_STEP)
        return torch.cartesian_prod(r, r)
    v = torch.arange(256, dtype=torch.float64) / 255
    a, b = torch.cartesian_prod(v, v).unbind(1)
    faces = []
    for ch in range(3):
        for value in (0.0, 1.0):
            other = [c for c in range(3) if c != ch]
            face = torch.empty(a.numel(), 3, dtype=torch.float64)
            face[:, ch], face[:, other[0]], face[:, other[1]] = value, a, b
            faces.append(face)
    rgb = torch.cat(faces).T[:, :, None]                     # [3, N, 1]: an image of N x 1 pixels
    ab = rgb_to_lab(rgb)[1:, :, 0].T                         # [N, 2]
    centers = np.unique(torch.round(ab / GRID_STEP).numpy().astype(np.int64), axis=0) * GRID_STEP
    return torch.from_numpy(centers).float()


@torch.no_grad()
def soft_encode(ab: torch.Tensor, centers: torch.Tensor, k: int = 5, sigma: float = 5.0,
                chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``ab [..., 2]`` -> ``(idx [..., k], z [..., k])``: each point's ``k`` nearest bins (nearest first) and their
    Gaussian weights ``exp(-d^2 / 2 sigma^2)``, normalized to sum 1 (Zhang et al. 2016, Sec. 2.1)."""
    flat = ab.reshape(-1, 2).float()
    idx, d2 = [], []
    for part in flat.split(chunk):
        d = torch.cdist(part, centers.float()) ** 2
        dk, ik = d.topk(k, dim=1, largest=False)
        idx.append(ik)
        d2.append(dk)
    idx, d2 = torch.cat(idx), torch.cat(d2)
    z = torch.exp(-(d2 - d2[:, :1]) / (2 * sigma ** 2))  # shifted by the nearest: the same after normalizing
    z = z / z.sum(1, keepdim=True)
    return idx.reshape(*ab.shape[:-1], k), z.reshape(*ab.shape[:-1], k)


def rebalance_weights(p: torch.Tensor, centers: torch.Tensor, lam: float = 0.5, sigma: float = 5.0) -> torch.Tensor:
    """``w [Q]`` from the empirical bin distribution ``p [Q]`` (Zhang et al. 2016, Eq. 4): ``p~`` = ``p`` smoothed by a
    Gaussian over ab (sigma), ``w ∝ ((1 - lam) p~ + lam / Q)^-1``, scaled so that ``sum_q p~_q w_q = 1``."""
    q = centers.shape[0]
    kernel = torch.exp(-torch.cdist(centers.float(), centers.float()) ** 2 / (2 * sigma ** 2))
    smooth = kernel @ p.float()
    smooth = smooth / smooth.sum()
    w = 1.0 / ((1 - lam) * smooth + lam / q)
    return w / (smooth * w).sum()


def colorization_loss(logits: torch.Tensor, idx: torch.Tensor, z: torch.Tensor,
                      weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over pixels of ``-v(Z) sum_q Z_q log softmax(logits)_q`` (Zhang et al. 2016, Eq. 2). ``logits [B, h, w,
    Q]`` on the prediction grid; ``idx, z [B, H, W, k]``: the pixels' soft-encoded targets (``H = r h``), each pixel
    read against the prediction of the cell holding it; ``v = weights[idx[..., 0]]`` (the nearest bin, ``Z``'s
    argmax), or 1 without rebalancing."""
    B, h, w, _ = logits.shape
    H, W = idx.shape[1:3]
    logp = F.log_softmax(logits.float(), dim=-1)
    ys = (torch.arange(H, device=idx.device) * h // H)[None, :, None, None]
    xs = (torch.arange(W, device=idx.device) * w // W)[None, None, :, None]
    b = torch.arange(B, device=idx.device)[:, None, None, None]
    ce = -(z * logp[b, ys, xs, idx]).sum(-1)                     # [B, H, W]
    if weights is not None:
        ce = ce * weights[idx[..., 0]]
    return ce.mean()


class ColorizationHead(Head):
    """Encodes the L channel of the ``colorization`` view with the student; each patch token -> ``cells^2 x Q``
    logits."""

    def __init__(self, width: int, patch: int, stride: int, n_bins: int, hidden: int, mean, std):
        super().__init__()
        self.patch, self.cells, self.n_bins = patch, patch // stride, n_bins
        out = self.cells ** 2 * n_bins
        self.mlp = (nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out)) if hidden
                    else nn.Linear(width, out))
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def head_forward(self, model, outputs, batch) -> dict:
        rgb = batch.views["colorization"][0].float()              # [B, 3, H, W], raw sRGB in [0, 1]
        with torch.no_grad():
            ab = rgb_to_lab(rgb)[:, 1:]
            gray = (lightness_image(rgb) - self.mean) / self.std
        tokens = model.encode_visible(gray.to(rgb.dtype), None)[1]  # [B, gh * gw, width]
        gh, gw = rgb.shape[-2] // self.patch, rgb.shape[-1] // self.patch
        c = self.cells
        logits = self.mlp(tokens).view(-1, gh, gw, c, c, self.n_bins)
        logits = logits.permute(0, 1, 3, 2, 4, 5).reshape(-1, gh * c, gw * c, self.n_bins)
        return {"colorization/logits": logits, "colorization/ab": ab}


@register("colorization")
class ColorizationObjective(Objective):
    class Config(RowsConfig):
        bins: Literal["gamut", "grid"] = "gamut"   # gamut: the ab bins of the sRGB gamut (261); grid: all 529
        neighbors: int = Field(5, gt=0)            # soft-encoding: nearest bins per pixel (the paper's 5)
        sigma: float = Field(5.0, gt=0)            # soft-encoding Gaussian (the paper's 5)
        rebalance: bool = True                     # class rebalancing (the paper's); off: plain cross-entropy
        rebalance_lambda: float = Field(0.5, ge=0, le=1)  # mix with the uniform (the paper's 0.5)
        prior_sigma: float = Field(5.0, gt=0)      # Gaussian smoothing of the empirical distribution (the paper's 5)
        stride: int | None = Field(None, gt=0)     # pixels per prediction; default 4 where it divides the patch
        hidden_dim: int = Field(256, ge=0)         # head MLP width (0: linear)
        crop_scale: tuple[float, float] = (0.5, 1.0)

    head_names = ("colorization_head",)

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        centers = ab_bins(self.cfg.bins)
        self.register_buffer("centers", centers.clone(), persistent=False)
        # running mean of the batches' nearest-bin histograms (the empirical p), and how many batches it holds
        self.register_buffer("bin_freq", torch.zeros(centers.shape[0]))
        self.register_buffer("batches", torch.zeros(()))

    @staticmethod
    def stride_for(c, ctx) -> int:
        if not ctx.is_vit:
            raise ValueError("objectives.colorization: predicts from patch tokens; needs a ViT image tower")
        stride = c.stride or (4 if ctx.patch % 4 == 0 else ctx.patch)
        if ctx.patch % stride:
            raise ValueError(f"objectives.colorization.stride: {stride} does not divide the patch size {ctx.patch}")
        return stride

    def heads(self, ctx):
        c = self.cfg
        return {"colorization_head": ColorizationHead(ctx.width, ctx.patch, self.stride_for(c, ctx),
                                                      self.centers.shape[0], c.hidden_dim, ctx.mean, ctx.std)}

    def view_groups(self, ctx):
        t = view_transform("crop", ctx.image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), scale=self.cfg.crop_scale)
        return [ViewGroup("colorization", tuple(self.cfg.kinds), (t,), recipe=f"crop{self.cfg.crop_scale}-rgb01")]

    @torch.no_grad()
    def update_prior(self, nearest: torch.Tensor) -> None:
        """Adds this batch's histogram of nearest bins (every rank's pixels) to the running mean ``bin_freq``."""
        counts = all_reduce_sum(torch.bincount(nearest.flatten(), minlength=self.centers.shape[0]).float())
        self.batches += 1
        self.bin_freq += (counts / counts.sum() - self.bin_freq) / self.batches

    def weights(self) -> torch.Tensor:
        c = self.cfg
        return rebalance_weights(self.bin_freq, self.centers, c.rebalance_lambda, c.prior_sigma)

    def forward(self, outputs, batch):
        c = self.cfg
        logits, ab = outputs["colorization/logits"], outputs["colorization/ab"].float()
        idx, z = soft_encode(ab.permute(0, 2, 3, 1), self.centers, c.neighbors, c.sigma)
        weights = None
        if c.rebalance:
            self.update_prior(idx[..., 0])
            weights = self.weights()
        with torch.autocast(logits.device.type, enabled=False):
            loss = colorization_loss(logits.float(), idx, z, weights)
        with torch.no_grad():
            cells = logits.argmax(-1)                                           # [B, h, w]
            r = idx.shape[1] // logits.shape[1]
            nearest = idx[:, ::r, ::r, 0]                                       # a pixel of each cell
            acc = (cells == nearest).float().mean()
        return loss, {"acc": acc}
