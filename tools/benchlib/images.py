"""Synthetic JPEGs: smooth random colour fields, about a web photo's decode cost."""
from __future__ import annotations


def synthetic_jpegs(n: int, size: tuple[int, int], cells: tuple[int, int], noise: int = 0) -> list[bytes]:
    """``n`` JPEGs (quality 90) of ``size`` (width, height): random ``cells`` (width, height) colours upsampled
    bicubically, plus uniform pixel noise in ``[-noise, noise)``; seeded, the same every call."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (cells[1], cells[0], 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        if noise:
            arr = np.asarray(img, dtype=np.int16) + rng.integers(-noise, noise, (size[1], size[0], 3))
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out
