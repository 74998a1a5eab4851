#!/usr/bin/env python
"""Data-pipeline throughput: vlp's MixedBatches against open_clip_train's own WebDataset pipeline.

Both read the same shards (CIFAR-10 JPEGs from ``../shared/data/cifar10-train.tar.gz``, or synthetic JPEGs
with ``--synthetic``), decode, augment with the same open_clip train transform (32 px model,
``configs/models/vlp-tiny-vit.json``), tokenize the caption with the model's tokenizer and batch, in one
DataLoader worker each. The figure is images/s delivered over a fixed number of batches after a warm-up
(worker start, shuffle buffer fill), i.e. what one worker decodes and augments per second.

Each measurement runs in a fresh subprocess; repeats alternate the order of the two pipelines and the
medians are compared. open_clip_train 3.3's loader does not run on webdataset 1.x (``KeyError: 'fname'``),
so its side runs with webdataset 0.2.86 installed once into a separate folder (``--wds-dir``, first on its
PYTHONPATH); vlp's side runs on the machine's webdataset 1.x. A third, in-process row ("decode+augment
only") times the same decode, transform and tokenization with no pipeline and no worker: the ceiling
both pipelines approach.

    python tools/bench_data.py --samples 4000 --batches 20 --repeats 3 --out bench_out/bench_data.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import REPO
from benchlib.cifar import tar_jpegs
from benchlib.cli import write_json
from benchlib.images import synthetic_jpegs
from benchlib.shards import cached
from benchlib.wds_old import OLD_WDS, ensure_old_webdataset, pythonpath

DEFAULT_CIFAR = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
DEFAULT_WDS_DIR = Path.home() / ".cache" / "vlp-bench" / "wds0286"
SIDES = ("vlp", "open_clip")
LABELS = {
    "vlp": "vlp MixedBatches",
    "open_clip": "open_clip_train get_wds_dataset",
    "bare": "decode+augment only (no pipeline)",
}


# --------------------------------------------------------------------------------------------- shards


def make_shards(a) -> tuple[str, int, str]:
    """Write (or reuse) the benchmark shards; return (brace spec, samples, description)."""
    from vlp.shards import write_samples

    if a.synthetic:
        name, what = f"synthetic-{a.synthetic_size}px-{a.samples}-{a.shard_size}", f"synthetic {a.synthetic_size}px JPEGs"
    else:
        name, what = f"cifar10-{a.samples}-{a.shard_size}", f"CIFAR-10 train JPEGs from {a.cifar}"

    def write(out: Path) -> dict:
        if a.synthetic:  # smooth-ish content compresses like photos
            jpgs = synthetic_jpegs(a.samples, (a.synthetic_size, a.synthetic_size), (4, 4), noise=12)
            images = [(jpg, f"class{i % 10}") for i, jpg in enumerate(jpgs)]
        else:
            images = tar_jpegs(Path(a.cifar), a.samples)
        random.Random(0).shuffle(images)
        shards = write_samples(
            ({"__key__": f"{i:07d}", "jpg": jpg, "txt": f"a photo of a {c}."} for i, (jpg, c) in enumerate(images)),
            out, prefix="bench", maxcount=a.shard_size)
        return {"spec": str(out / f"bench-{{000000..{len(shards) - 1:06d}}}.tar"), "samples": len(images)}

    info = cached(Path(a.work_dir) / name, {"images": what, "samples": a.samples, "shard_size": a.shard_size}, write)
    return info["spec"], info["samples"], what


# --------------------------------------------------------------------------------------------- one measurement (child)


def _vlp_loader(a, spec, transform, tokenizer):
    from vlp.config import DataConfig
    from vlp.data.mixing import MixedBatches, make_loader

    cfg = DataConfig.model_validate({
        "sources": [{"name": "bench", "kind": "paired", "shards": spec}],
        "batch": {"paired": a.batch_size}, "workers": a.workers, "shuffle_buffer": a.shuffle, "resampled": True})
    ds = MixedBatches(cfg, transform, tokenizer, seed=0)
    return make_loader(ds, a.workers), lambda b: b[0].image


def _open_clip_loader(a, spec, transform, tokenizer, samples):
    import open_clip_train.data as ocd
    from open_clip_train.data import get_wds_dataset

    # the sample shuffle buffer is a module constant (5000 in 3.3): use the size both sides are given
    ocd._SAMPLE_SHUFFLE_SIZE = a.shuffle
    ocd._SAMPLE_SHUFFLE_INITIAL = min(ocd._SAMPLE_SHUFFLE_INITIAL, a.shuffle)

    n_batches = a.warmup + a.batches
    args = argparse.Namespace(
        train_data=spec, val_data=None, dataset_resampled=True, train_data_upsampling_factors=None,
        train_num_samples=max(samples, 4 * n_batches * a.batch_size * max(1, a.workers)),  # no epoch end inside the run
        batch_size=a.batch_size, workers=a.workers, world_size=1, seed=0)
    info = get_wds_dataset(args, transform, is_train=True, epoch=0, tokenizer=tokenizer)
    return info.dataloader, lambda b: b[0]


def _bare(a, spec, transform, tokenizer) -> dict:
    """Decode + transform + tokenize + stack in this process, no pipeline: the per-image work itself."""
    import torch
    import webdataset as wds

    from vlp.data.format import decode_image, expand_shards
    from vlp.data.transforms import decode_side

    samples = []
    for url in expand_shards(spec):
        samples += [s for s in wds.tariterators.tarfile_samples([{"url": url}])]
        if len(samples) >= a.batch_size * 4:
            break
    samples = samples[:a.batch_size * 4]
    torch.set_num_threads(1)  # like a DataLoader worker

    def batch(chunk, side):
        images = torch.stack([transform(decode_image(s["jpg"], side)) for s in chunk])
        tokens = tokenizer([s["txt"].decode() for s in chunk])
        return images, tokens

    def rate(side):
        for i in range(a.warmup):
            batch(samples[(i % 4) * a.batch_size:][:a.batch_size], side)
        t0 = time.perf_counter()
        n = 0
        for i in range(a.batches):
            images, _ = batch(samples[(i % 4) * a.batch_size:][:a.batch_size], side)
            n += images.shape[0]
        return n, time.perf_counter() - t0, images

    side = decode_side([transform])  # what vlp's mixer decodes at (data.draft_decode)
    n, dt, images = rate(None)
    n_r, dt_r, _ = rate(side)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "image_shape": list(images.shape[1:]),
            "decode_side": side, "reduced_images_per_s": n_r / dt_r}


def child(a) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import webdataset

    from vlp.data.transforms import train_transform
    from vlp.models.factory import create_clip

    spec, samples = a.spec, a.n
    model, _, tokenizer = create_clip(a.model)
    transform = train_transform(model, scale=tuple(a.scale))
    result = {"side": a.child, "webdataset": webdataset.__version__, "pid": os.getpid()}
    if a.child == "bare":
        result.update(_bare(a, spec, transform, tokenizer))
    else:
        if a.child == "vlp":
            loader, images_of = _vlp_loader(a, spec, transform, tokenizer)
        else:
            loader, images_of = _open_clip_loader(a, spec, transform, tokenizer, samples)
        t_start = time.perf_counter()
        it = iter(loader)
        for _ in range(a.warmup):
            images = images_of(next(it))
        t0 = time.perf_counter()
        n = 0
        for _ in range(a.batches):
            images = images_of(next(it))
            n += images.shape[0]
        dt = time.perf_counter() - t0
        result.update({"images": n, "seconds": dt, "images_per_s": n / dt, "warmup_s": t0 - t_start,
                       "image_shape": list(images.shape[1:])})
        del it, loader
    print("RESULT " + json.dumps(result), flush=True)


def run_child(side: str, a, spec: str, samples: int) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if side == "open_clip":
        env["PYTHONPATH"] = pythonpath(a.wds_dir)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--spec", spec, "--n", str(samples),
           "--model", a.model, "--batch-size", str(a.batch_size), "--batches", str(a.batches),
           "--warmup", str(a.warmup), "--workers", str(a.workers), "--shuffle", str(a.shuffle),
           "--scale", str(a.scale[0]), str(a.scale[1])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=a.timeout, check=False)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"{side} run failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", default=str(DEFAULT_CIFAR), help="ImageFolder tar.gz (train/<class>/*.jpg)")
    p.add_argument("--synthetic", action="store_true", help="synthetic JPEGs instead of CIFAR-10")
    p.add_argument("--synthetic-size", type=int, default=32, help="synthetic image side in pixels")
    p.add_argument("--samples", type=int, default=4000, help="images written to the benchmark shards")
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--model", default="configs/models/vlp-tiny-vit.json", help="model config (image size, tokenizer)")
    p.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.0), help="RandomResizedCrop scale (both sides)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=30, help="timed batches per run")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (worker start, shuffle buffer fill); default: enough to fill the buffer")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shuffle", type=int, default=1000,
                   help="sample shuffle buffer, both sides (open_clip_train's constant 5000 is patched to it)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline")
    p.add_argument("--no-bare", action="store_true", help="skip the in-process decode+augment ceiling")
    p.add_argument("--work-dir", default=str(REPO / "bench_out" / "bench_data"), help="shards are cached here")
    p.add_argument("--wds-dir", type=Path, default=DEFAULT_WDS_DIR, help=f"webdataset {OLD_WDS} install (--target)")
    p.add_argument("--out", default=str(REPO / "bench_out" / "bench_data.json"), help="JSON results")
    p.add_argument("--timeout", type=int, default=600, help="seconds per run")
    p.add_argument("--child", choices=SIDES + ("bare",), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.warmup is None:  # while the buffer fills, each image out costs two samples read: not steady state
        a.warmup = -(-a.shuffle // a.batch_size) + 2
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.child:
        child(a)
        return 0
    if not a.synthetic and not Path(a.cifar).is_file():
        print(f"no CIFAR-10 archive at {a.cifar}: nothing to benchmark (use --synthetic, or --cifar PATH)")
        return 0
    os.chdir(REPO)
    t = time.perf_counter()
    spec, samples, what = make_shards(a)
    print(f"shards: {spec} ({samples} samples, {what}; {time.perf_counter() - t:.1f}s)", flush=True)
    if ensure_old_webdataset(a.wds_dir) is None:
        sys.exit(f"no webdataset=={OLD_WDS} in {a.wds_dir} (open_clip_train's loader needs it); pass --wds-dir to a "
                 f"folder that holds it")

    runs: dict[str, list[dict]] = {s: [] for s in SIDES + ("bare",)}
    for r in range(a.repeats):
        order = SIDES if r % 2 == 0 else SIDES[::-1]
        for side in order:
            res = run_child(side, a, spec, samples)
            runs[side].append(res)
            print(f"  repeat {r + 1}/{a.repeats}  {side:<9} {res['images_per_s']:8.0f} img/s "
                  f"(webdataset {res['webdataset']}, warm-up {res['warmup_s']:.1f}s)", flush=True)
        if not a.no_bare:
            runs["bare"].append(run_child("bare", a, spec, samples))
    for s in SIDES:
        shapes = {tuple(x["image_shape"]) for x in runs[s]}
        assert len(shapes) == 1, shapes
    assert runs["vlp"][0]["image_shape"] == runs["open_clip"][0]["image_shape"]

    med = {s: statistics.median(x["images_per_s"] for x in v) for s, v in runs.items() if v}
    ratio = med["vlp"] / med["open_clip"]
    try:
        load = os.getloadavg()
    except OSError:
        load = None

    rows = [(LABELS[s], runs[s][0]["webdataset"], med[s], [x["images_per_s"] for x in runs[s]])
            for s in SIDES + ("bare",) if runs[s]]
    print()
    print(f"images/s, {a.workers} DataLoader worker(s), batch {a.batch_size}, {a.batches} timed batches after "
          f"{a.warmup} warm-up, image {runs['vlp'][0]['image_shape']}, {a.repeats} alternating repeats (median)")
    print(f"{'pipeline':<36} {'webdataset':<11} {'median':>8}   runs")
    for label, ver, m, xs in rows:
        print(f"{label:<36} {ver:<11} {m:8.0f}   " + " ".join(f"{x:.0f}" for x in xs))
    print(f"ratio vlp/open_clip: {ratio:.3f}" + (f"   (load average at end: {load[0]:.2f} on {os.cpu_count()} cpus)"
                                                  if load else ""))
    if runs["bare"]:
        reduced = statistics.median(x["reduced_images_per_s"] for x in runs["bare"])
        print(f"decode+augment only, JPEG decoded at short side >= {runs['bare'][0]['decode_side']} (Pillow draft, "
              f"vlp's data.draft_decode): {reduced:.0f} img/s, {reduced / med['bare']:.2f}x the full decode")
        med["bare_reduced_decode"] = reduced

    import open_clip
    import torch
    import webdataset

    report = {
        "command": " ".join([Path(sys.executable).name, "tools/bench_data.py"] + (argv if argv is not None else sys.argv[1:])),
        "data": {"spec": spec, "samples": samples, "source": what},
        "settings": {k: getattr(a, k) for k in ("model", "batch_size", "batches", "warmup", "workers", "shuffle",
                                                 "repeats")} | {"scale": list(a.scale)},
        "median_images_per_s": med,
        "ratio_vlp_over_open_clip": ratio,
        "runs": runs,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "open_clip": open_clip.__version__, "webdataset_vlp": webdataset.__version__,
                        "webdataset_open_clip": runs["open_clip"][0]["webdataset"], "cpus": os.cpu_count(),
                        "loadavg_end": load, "machine": platform.machine()},
    }
    print(f"wrote {write_json(Path(a.out), report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
