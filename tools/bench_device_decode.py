#!/usr/bin/env python
"""data.decode: device against cpu, per core: what a data worker does per image on each path, and the device's half.

One process, one torch thread (a DataLoader worker's setting), synthetic square JPEGs (``benchlib.images``, as
``tools/bench_data.py --synthetic``), open_clip's train transform at ``--image-size`` (scale 0.5-1, OpenAI mean/std):

* ``cpu full`` / ``cpu draft``: :func:`vlp.data.format.decode_image` (whole, or at ``decode_side``: data.draft_decode,
  the default) + the transform + stacking: the CPU path's per-image work.
* ``device: worker side``: :meth:`DevicePlanner.plan` (JPEG header, end marker, RandomResizedCrop's box) +
  :meth:`PendingImages.pack`: what a worker still does per image with ``data.decode: device``.
* ``device: device side``: :func:`decode_pending` on ``--device`` (decode_jpeg + crop + resize + normalize); on CPU
  only for reference, on CUDA the GPU's images/s (synchronized).
* ``mixer cpu`` / ``mixer device``: the real ``MixedBatches`` (shards, shuffle, tokenization) in this process, the
  images/s one worker delivers (device: before the device's half).

    python tools/bench_device_decode.py --sizes 512,1024 --repeats 3 --out bench_out/device_decode.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib.cli import write_json
from benchlib.images import synthetic_jpegs

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def timed(fns: dict, n_images: int, repeats: int) -> dict[str, list[float]]:
    """images/s of each function, repeats interleaved (a load that comes and goes hits every row alike)."""
    for fn in fns.values():
        fn()  # warm-up
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[name].append(n_images / (time.perf_counter() - t0))
    return out


def bench_size(a, px: int, transform, tokenizer) -> dict:
    import torch

    from vlp.config import DataConfig
    from vlp.data.device_decode import DeviceDecoder, DevicePlanner, DeviceRecipe, PendingImages, decode_pending
    from vlp.data.format import decode_image
    from vlp.data.mixing import MixedBatches, make_loader
    from vlp.data.transforms import decode_side
    from vlp.shards import write_samples

    jpegs = synthetic_jpegs(a.batch, (px, px), (4, 4), noise=12)
    side = decode_side([transform])
    planner = DevicePlanner(DeviceRecipe.from_transform(transform))
    n = a.batch * a.batches
    torch.manual_seed(0)

    def cpu(min_side):
        def run():
            for _ in range(a.batches):
                torch.stack([transform(decode_image(j, min_side)) for j in jpegs])
        return run

    def worker_side():
        for _ in range(a.batches):
            PendingImages.pack(planner.recipe, [(planner.plan(j), 0, "k") for j in jpegs])

    pending = PendingImages.pack(planner.recipe, [(planner.plan(j), 0, "k") for j in jpegs])

    def device_side():
        for _ in range(a.batches):
            decode_pending(pending, a.device)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:  # the real mixer, one worker's work in this process
        write_samples(({"__key__": f"{i:05d}", "jpg": j, "txt": f"a photo of thing {i}"}
                       for i, j in enumerate(jpegs * 4)), Path(tmp), maxcount=64)
        mixers = {}
        for decode in ("cpu", "device"):
            cfg = DataConfig.model_validate({"sources": [{"name": "p", "kind": "paired", "shards": f"{tmp}/*.tar"}],
                                             "batch": {"paired": a.batch}, "shuffle_buffer": 64, "decode": decode})
            mixers[decode] = iter(make_loader(MixedBatches(cfg, transform, tokenizer, seed=0), 0))
        rows = timed({"cpu full": cpu(None), "cpu draft": cpu(side), "device: worker side": worker_side,
                      f"device: device side ({a.device})": device_side,
                      "mixer cpu": lambda: [next(mixers["cpu"]) for _ in range(a.batches)],
                      "mixer device": lambda: [next(mixers["device"]) for _ in range(a.batches)]}, n, a.repeats)
        decoder, (batch, meta) = DeviceDecoder(), next(mixers["device"])
        assert decoder(batch, meta, a.device).image.shape == (a.batch, 3, a.image_size, a.image_size)
    return {"jpeg_px": px, "decode_side": side, "rows": {k: {"median": statistics.median(v), "runs": v}
                                                         for k, v in rows.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="512,1024", help="JPEG sides (square synthetic JPEGs), comma-separated")
    p.add_argument("--image-size", type=int, default=224, help="the model's input (open_clip's train transform)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches per timed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="where the device side runs (cuda on a GPU machine)")
    p.add_argument("--out", default=None, help="results JSON")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip
    import torch
    from open_clip.transform import AugmentationCfg

    torch.set_num_threads(1)  # a DataLoader worker's setting
    transform = open_clip.image_transform(a.image_size, is_train=True, mean=MEAN, std=STD,
                                          aug_cfg=AugmentationCfg(scale=(0.5, 1.0)))
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    results = [bench_size(a, int(px), transform, tokenizer) for px in a.sizes.split(",")]
    print(f"images/s per core, {a.image_size} px output, batch {a.batch}, median of {a.repeats} "
          f"(load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus)")
    names = list(results[0]["rows"])
    print(f"{'':34s}" + "".join(f"{r['jpeg_px']:>8d} px" for r in results))
    for name in names:
        print(f"{name:34s}" + "".join(f"{r['rows'][name]['median']:11.0f}" for r in results))
    for r in results:
        rows = r["rows"]
        print(f"{r['jpeg_px']} px: worker side {rows['device: worker side']['median'] / rows['cpu draft']['median']:.0f}x"
              f" the CPU path's per-image work; mixer {rows['mixer device']['median'] / rows['mixer cpu']['median']:.1f}x")
    if a.out:
        write_json(Path(a.out), {"image_size": a.image_size, "batch": a.batch, "load_average": os.getloadavg(),
                           "device": a.device, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
