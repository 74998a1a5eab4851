"""View recipes for objectives that need extra augmented views (torchvision transforms; the blur through PIL).

- ``plain``:  resize + center crop (what evaluation sees).
- ``weak``:   random resized crop (scale 0.8-1) + horizontal flip (FixMatch's weak view).
- ``crop``:   random resized crop with the given ``scale`` + flip (SimCLR/DINO geometry only).
- ``strong``: crop + flip + colour jitter (p 0.8) + grayscale (p 0.2) + Gaussian blur + solarize (BYOL, DINO).
- ``randaugment``: crop + flip + RandAugment (FixMatch's strong view).

Each returns a PIL -> normalized ``[3, size, size]`` tensor callable; randomness comes from torch's RNG, which the
mixer seeds per batch, so views are reproducible and resume stays exact.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

RECIPES = ("plain", "weak", "crop", "strong", "randaugment")


def view_transform(recipe: str, size: int, mean, std, scale: tuple[float, float] = (0.25, 1.0),
                   blur_p: float = 0.5, solarize_p: float = 0.2):
    if recipe not in RECIPES:
        raise ValueError(f"unknown view recipe {recipe!r} (known: {', '.join(RECIPES)})")
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if recipe == "plain":
        return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), *tail])
    crop_scale = (0.8, 1.0) if recipe == "weak" else tuple(scale)
    geometry = [T.RandomResizedCrop(size, scale=crop_scale, interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip()]
    if recipe in ("weak", "crop"):
        return T.Compose([*geometry, *tail])
    if recipe == "randaugment":
        return T.Compose([*geometry, T.RandAugment(num_ops=2, magnitude=10), *tail])
    kernel = max(3, (size // 10) | 1)  # odd, ~10% of the image as in SimCLR
    return T.Compose([
        *geometry,
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        T.RandomSolarize(128, p=solarize_p),
        *tail,
    ])


class GaussianBlur(T.GaussianBlur):
    """torchvision's ``GaussianBlur`` (the same sigma draw from torch's RNG, truncated kernel and reflect padding;
    the same pixels up to one level of rounding) through PIL's native 3x3 / 5x5 convolution: on a 32px image ~30x
    faster than torchvision's PIL -> tensor -> conv2d -> PIL round trip, which was a third of a strong view's cost.
    Other kernel sizes and inputs take torchvision's path."""

    def forward(self, img):
        k = self.kernel_size
        if not isinstance(img, Image.Image) or k[0] != k[1] or k[0] not in (3, 5) or img.mode not in ("RGB", "L"):
            return super().forward(img)
        sigma = self.get_params(self.sigma[0], self.sigma[1])
        x = torch.linspace(-(k[0] - 1) / 2, (k[0] - 1) / 2, k[0])
        g = torch.exp(-0.5 * (x / sigma) ** 2)
        g = g / g.sum()
        pad = k[0] // 2
        arr = np.asarray(img)
        padded = np.pad(arr, ((pad, pad), (pad, pad)) + ((0, 0),) * (arr.ndim - 2), mode="reflect")
        kernel = ImageFilter.Kernel(k, (g[:, None] * g[None, :]).flatten().tolist(), scale=1)
        out = Image.fromarray(padded).filter(kernel)
        return out.crop((pad, pad, pad + img.width, pad + img.height))
