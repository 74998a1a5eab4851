#!/usr/bin/env python
"""GPU training step of vlp's recipes against open_clip_train's: samples/s, step breakdown, peak memory, MFU, and
the CPU cores the data loader needs to keep up.

Recipes (``configs/bench/throughput-{clip,flip,mixed}.yaml``, with ``--model`` and ``--batch-size``): CLIP-only
unmasked, FLIP (CLIP on the 75%-masked pass) and the mixed recipe (CLIP/UniCL + MAE + supervised, one 75%-masked
pass; batch split paired 1/2, labeled 1/8, unlabeled 3/8).

vlp's step runs in this process on one device, on a synthetic batch of the recipe's exact composition
(``vlp.flops.synthetic_batch``: real tokenized text, labels, every view group), timed in four parts with
``torch.cuda.synchronize()`` between them: ``data`` (the host batch, pinned, copied to the device), ``forward``
(``task.training_forward`` under autocast), ``backward`` (plus the task's after-backward hooks), ``optimizer``
(AdamW step, zero_grad, the task's after-step hooks: logit-scale clamp, teacher EMA). On a GPU: bf16 autocast,
fused AdamW, optional ``--compile`` (``torch.compile`` of the student) and ``--grad-checkpointing`` (open_clip's
``set_grad_checkpointing``); attention is open_clip's ``nn.MultiheadAttention(need_weights=False)``, which runs
``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). On CPU: fp32, fused AdamW (torch's
CPU kernel), the tiny model.

MFU = FLOPs per step / step seconds / device peak. FLOPs: one step counted by ``FlopCounterMode``
(``vlp.flops.count_training_flops``: forward, teacher, backward, hooks; matmuls and attention) on the same model
and batch. Peak: dense bf16 tensor-core TFLOP/s from ``PEAK_BF16`` (H100 SXM 989, H200 989, A100 312, L4 121, ...);
on CPU, against a measured fp32 matmul rate (``cpu matmul``), marked as such.

open_clip_train: the real trainer (``python -m open_clip_train.main`` through ``benchlib.openclip.run_openclip``,
as in ``tools/bench_throughput.py``: webdataset 0.2.86, CIFAR-10 shards from ``../shared/data/cifar10-train.tar.gz``)
on the same model, batch and precision (``amp_bf16`` on GPU, ``--grad-checkpointing`` / ``--torchcompile`` when
asked), in the same run. Its samples/s comes from its own ``Batch (t)`` log lines after ``--warmup``; ``compute``
leaves out its ``Data (t)`` wait, which is what vlp's in-process step (no loader) compares with. Skipped when the
tarball is missing or with ``--no-open-clip-train``.

Loader: the real ``MixedBatches`` (decode + open_clip's train transform + tokenization, one process, one thread)
over JPEG shards written once (``--loader-images`` images of 320x240, smooth random content) at ``--image-size``
px, with each recipe's composition and view groups: images/s per core, and the cores needed to feed the measured
vlp step (samples/s / images/s per core).

Usage::

    python tools/bench_gpu.py                                    # CPU: tiny model, batch 64, a few steps
    python tools/bench_gpu.py --model ViT-B-16 --image-size 224 --batch-size 256 --steps 30 --warmup 10 \\
        --workers 12 [--compile] [--grad-checkpointing]          # a GPU (configs/laion-vitb16-mixed.yaml's model)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from benchlib import REPO
from benchlib.cifar import CLASSNAMES, DATA_TARBALL, ensure_cifar, subset_shards
from benchlib.cli import log, write_json
from benchlib.images import synthetic_jpegs
from benchlib.openclip import run_openclip
from benchlib.shards import cached
from benchlib.wds_old import OLD_WDS, ensure_old_webdataset

RECIPES = {"clip": "CLIP-only (unmasked)", "flip": "FLIP (75% masked)", "mixed": "mixed CLIP+MAE+sup (75% masked)"}
# dense bf16 tensor-core peak, TFLOP/s (vendor spec sheets, no sparsity); first match on the device name wins
PEAK_BF16 = [("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
             ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 70), ("A10", 125),
             ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125), ("T4", 65)]


def device_peak(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, what it is): the bf16 table on CUDA; a measured fp32 matmul rate on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16:
            if key in name:
                return tflops * 1e12, f"{name}: {tflops} TFLOP/s dense bf16 (spec)"
        return None, f"{name}: not in PEAK_BF16 (MFU n/a)"
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    rate = n * 2 * 1024**3 / (time.perf_counter() - t0)
    return rate, f"cpu matmul: {rate / 1e9:.0f} GFLOP/s measured fp32 1024^3, {torch.get_num_threads()} threads"


def model_json(name: str, image_size: int | None, out_dir: Path) -> Path:
    """The model config as a JSON file (image size overridden), so vlp and open_clip_train build the same model."""
    from vlp.models.factory import resolve_model_config

    cfg = copy.deepcopy(resolve_model_config(name))
    if image_size:
        cfg["vision_cfg"]["image_size"] = image_size
    stem = Path(name).stem + (f"-{image_size}px" if image_size else "")
    path = out_dir / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def recipe_config(recipe: str, model: Path, batch: int, steps: int):
    from vlp.config import config_from_dict
    import yaml

    tree = yaml.safe_load((REPO / "configs" / "bench" / f"throughput-{recipe}.yaml").read_text())
    tree["model"]["name"] = str(model)
    tree["data"]["batch"] = ({"paired": batch // 2, "labeled": batch // 8, "unlabeled": batch - batch // 2 - batch // 8}
                             if recipe == "mixed" else {"paired": batch})
    tree["train"]["steps"] = steps
    return config_from_dict(tree, check_files=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_vlp(recipe: str, cfg, device: torch.device, args, peak: float | None) -> dict:
    """vlp's training step of one recipe: per-part seconds (median over the timed steps), FLOPs, MFU, memory."""
    from vlp.flops import count_training_flops, synthetic_batch
    from vlp.task import PretrainTask
    from vlp.optim import param_groups

    torch.manual_seed(0)
    task = PretrainTask(cfg, 0, 1, CLASSNAMES if recipe == "mixed" else None)
    task.student.to(device)
    if task.teacher is not None:
        task.teacher.to(device)
    for obj, _ in task.objectives.values():
        obj.to(device)
    if args.grad_checkpointing:
        task.student.clip.set_grad_checkpointing(True)
    host = synthetic_batch(task, CLASSNAMES if recipe == "mixed" else None)
    if device.type == "cuda":
        host = host.pin_memory() if hasattr(host, "pin_memory") else host
    flops = count_training_flops(task, host.to(device), steps=1)
    if args.compile:
        task.model = torch.compile(task.student)
    task.on_train_start()
    o = cfg.optim
    try:
        opt = torch.optim.AdamW(param_groups(task.student, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(param_groups(task.student, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    parts = {"data": [], "forward": [], "backward": [], "optimizer": []}
    task.student.train()
    for step in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        batch = host.to(device, non_blocking=True)
        _sync(device)
        t1 = time.perf_counter()
        with amp:
            loss, _ = task.training_forward(batch, step)
        _sync(device)
        t2 = time.perf_counter()
        loss.backward()
        task.after_backward(step)
        _sync(device)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_optimizer_step(step)
        _sync(device)
        t4 = time.perf_counter()
        if step >= args.warmup:
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[k].append(v)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{recipe}: non-finite loss at step {step}")
    med = {k: statistics.median(v) for k, v in parts.items()}
    step_s = sum(med.values())
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"label": f"vlp {RECIPES[recipe]}", "batch": len(host), "samples_per_s": len(host) / step_s,
            "step_s": step_s, "parts_s": med, "gflop_per_step": flops / 1e9,
            "mfu": flops / step_s / peak if peak else None, "peak_mem_mb": mem,
            "view_groups": [g.name for g in task.view_groups]}


def bench_open_clip_train(mjson: Path, device: torch.device, args, cache: Path, flops: float | None,
                          peak: float | None) -> dict | None:
    train_root = ensure_cifar(cache / "cache")
    if train_root is None:
        log(f"open_clip_train skipped: {DATA_TARBALL} not found")
        return None
    shards = cache / "throughput" / "shards"
    subset_shards(train_root, shards, args.oc_images)
    wds_dir = ensure_old_webdataset(cache / "cache" / f"webdataset-{OLD_WDS}")
    if wds_dir is None:
        log("open_clip_train skipped: no webdataset 0.2.86")
        return None
    extra = (("--grad-checkpointing",) if args.grad_checkpointing else ()) + (("--torchcompile",) if args.compile else ())
    res = run_openclip(shards, cache / "gpu" / "open_clip_train", wds_dir, args, model_json=mjson,
                       precision="amp_bf16" if device.type == "cuda" else "fp32", workers=args.workers, extra=extra)
    used = [w for w in res["windows"] if w[0] > args.warmup]
    steps = sum(last - first + 1 for first, last, _, _ in used)
    total, data = sum(w[2] for w in used), sum(w[3] for w in used)
    if not steps:
        return None
    step_s = (total - data) / steps
    return {"label": "open_clip_train (same model, CLIP)", "batch": args.batch_size,
            "samples_per_s": args.batch_size / step_s, "step_s": step_s,
            "with_data_samples_per_s": args.batch_size * steps / total, "data_wait_frac": data / total,
            "gflop_per_step": flops / 1e9 if flops else None,
            "mfu": flops / step_s / peak if flops and peak else None, "peak_mem_mb": None,
            "peak_rss_mb": res["peak_rss_mb"]}


def write_loader_shards(out: Path, n: int) -> Path:
    """``n`` 320x240 JPEGs (smooth random colour fields, ~web-photo decode cost) as paired / labeled / unlabeled."""
    from vlp.shards import write_class_files, write_samples

    def write(folder: Path) -> dict:
        jpgs = synthetic_jpegs(n, (320, 240), (16, 12))

        def samples(kind):
            for i, jpg in enumerate(jpgs):
                s = {"__key__": f"{i:09d}", "jpg": jpg}
                if kind == "paired":
                    s["txt"] = f"a photo of a {CLASSNAMES[i % 10]}."
                elif kind == "labeled":
                    s["cls"] = str(i % 10)
                yield s

        for kind in ("paired", "labeled", "unlabeled"):
            write_samples(samples(kind), folder / kind, prefix="img", maxcount=max(1, n // 4))
        write_class_files(folder / "labeled", CLASSNAMES, {c: n // 10 for c in range(10)})
        return {}

    cached(out, {"n": n}, write)
    return out


def bench_loader(recipe: str, cfg, shards: Path, image_size: int, batches: int) -> dict:
    """Images/s of the real MixedBatches in this process on one thread: decode, train transform, tokenization."""
    import open_clip

    from vlp.data.mixing import MixedBatches
    from vlp.data.transforms import resolve_templates
    from vlp.task import PretrainTask

    tree = cfg.model_dump(mode="json")
    for src in tree["data"]["sources"]:
        src["shards"] = str(shards / src["kind"] / "*.tar")
    from vlp.config import config_from_dict

    cfg = config_from_dict(tree)
    task = PretrainTask(cfg, 0, 1, CLASSNAMES if recipe == "mixed" else None)
    v = task.student.clip.visual
    transform = open_clip.image_transform(image_size, is_train=True, mean=v.image_mean, std=v.image_std,
                                          aug_cfg=open_clip.transform.AugmentationCfg(scale=tuple(cfg.data.scale)))
    ds = MixedBatches(cfg.data, transform, task.tokenizer, 0, 0, 1, resolve_templates(cfg.data.templates),
                      labels_as_text=task.labels_as_text, view_groups=task.view_groups)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        it = iter(ds)
        next(it)  # opens the shards, fills shuffle buffers
        t0 = time.perf_counter()
        n = 0
        for _ in range(batches):
            batch, _ = next(it)
            n += len(batch)
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"images_per_s_per_core": n / dt, "image_size": image_size, "batch": ds.batch_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="open_clip name or JSON (default: vlp-tiny-vit on CPU, ViT-B-16 on GPU)")
    p.add_argument("--image-size", type=int, default=None, help="model image size (default: the model's)")
    p.add_argument("--loader-size", type=int, default=224, help="loader bench image size (default: 224)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 CPU, 256 GPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per recipe (default: 8 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 3 CPU, 10 GPU)")
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"subset of {','.join(RECIPES)}")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (and open_clip_train's model)")
    p.add_argument("--grad-checkpointing", action="store_true", help="open_clip's set_grad_checkpointing (both)")
    p.add_argument("--workers", type=int, default=None, help="open_clip_train data workers (default: 1 CPU, 8 GPU)")
    p.add_argument("--no-open-clip-train", action="store_true", help="skip the open_clip_train run")
    p.add_argument("--oc-images", type=int, default=2000, help="CIFAR-10 images in open_clip_train's shards")
    p.add_argument("--loader-images", type=int, default=400, help="JPEGs written for the loader bench")
    p.add_argument("--loader-batches", type=int, default=4, help="batches timed per recipe in the loader bench")
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"), help="shards, runs (default: bench_out/)")
    p.add_argument("--out", default=None, help="results JSON (default: CACHE/gpu/results.json)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    args.model = args.model or ("ViT-B-16" if cuda else "vlp-tiny-vit")
    args.batch_size = args.batch_size or (256 if cuda else 64)
    args.steps = args.steps or (30 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    args.workers = args.workers or (8 if cuda else 1)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if args.compile and not cuda:
        log("--compile on CPU: compiling a whole training step takes minutes here")
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    cache = Path(args.cache_dir).resolve()
    mjson = model_json(args.model, args.image_size, cache / "gpu" / "models")
    peak, peak_desc = device_peak(device)
    log(f"{device} ({peak_desc}); model {mjson.stem}, batch {args.batch_size}, {args.steps} steps "
        f"({args.warmup} warm-up); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; compile={args.compile}, "
        f"grad_checkpointing={args.grad_checkpointing}")

    rows = {}
    for r in recipes:
        cfg = recipe_config(r, mjson, args.batch_size, args.steps)
        rows[r] = bench_vlp(r, cfg, device, args, peak)
        log(f"vlp {r}: {rows[r]['samples_per_s']:.1f} samples/s, {rows[r]['gflop_per_step']:.1f} GFLOP/step")
    if not args.no_open_clip_train:
        flops = rows["clip"]["gflop_per_step"] * 1e9 if "clip" in rows else None
        oc = bench_open_clip_train(mjson, device, args, cache, flops, peak)
        if oc:
            rows["open_clip_train"] = oc
            log(f"open_clip_train: {oc['samples_per_s']:.1f} samples/s computing, "
                f"{oc['with_data_samples_per_s']:.1f} with its data wait ({100 * oc['data_wait_frac']:.0f}%)")
    loader_shards = write_loader_shards(cache / "gpu" / "loader_shards", args.loader_images)
    loader = {}
    for r in recipes:
        loader[r] = bench_loader(r, recipe_config(r, mjson, args.batch_size, args.steps), loader_shards,
                                 args.loader_size, args.loader_batches)
        loader[r]["cores_needed"] = rows[r]["samples_per_s"] / loader[r]["images_per_s_per_core"]

    print()
    mfu_head = "MFU" if device.type == "cuda" else "MFU*"
    head = (f"{'step':<40} {'samples/s':>10} {'step ms':>8} {'data':>6} {'fwd':>6} {'bwd':>6} {'opt':>6} "
            f"{'GFLOP':>8} {mfu_head:>6} {'peak MB':>8}")
    print(head)
    print("-" * len(head))
    for r, s in rows.items():
        parts = s.get("parts_s")
        cols = " ".join(f"{1000 * parts[k]:>6.1f}" for k in ("data", "forward", "backward", "optimizer")) if parts \
            else f"{'(its own loop)':>27}"
        mfu = f"{100 * s['mfu']:>5.1f}%" if s["mfu"] is not None else f"{'n/a':>6}"
        mem = f"{s['peak_mem_mb']:>8.0f}" if s["peak_mem_mb"] is not None else f"{'-':>8}"
        gf = f"{s['gflop_per_step']:>8.1f}" if s["gflop_per_step"] else f"{'-':>8}"
        print(f"{s['label']:<40} {s['samples_per_s']:>10.1f} {1000 * s['step_s']:>8.1f} {cols} {gf} {mfu} {mem}")
    if "open_clip_train" in rows:
        oc = rows["open_clip_train"]
        print(f"open_clip_train with its data wait ({args.workers} workers): {oc['with_data_samples_per_s']:.1f} "
              f"samples/s ({100 * oc['data_wait_frac']:.0f}% waiting); its row above excludes the wait")
    print(f"device: {peak_desc}; median step over steps {args.warmup + 1}..{args.steps}; batch {args.batch_size}; "
          f"peak MB: {'max allocated' if cuda else 'process max RSS (cumulative)'}")
    if device.type != "cuda":
        print("* CPU: fp32, MFU against the measured fp32 matmul rate above, not a spec peak")
    print()
    print(f"loader (real MixedBatches, 1 process, 1 thread, {args.loader_size} px, 320x240 JPEGs): decode + augment + tokenize")
    for r, s in loader.items():
        print(f"  {RECIPES[r]:<34} {s['images_per_s_per_core']:>8.1f} images/s per core -> "
              f"{s['cores_needed']:>6.1f} cores to feed {rows[r]['samples_per_s']:.0f} samples/s")
    doc = {"benchmark": "bench_gpu", "device": str(device), "peak": peak_desc, "model": mjson.stem,
           "args": vars(args), "rows": rows, "loader": loader, "torch": torch.__version__,
           "load_average": os.getloadavg()[0]}
    out = Path(args.out) if args.out else cache / "gpu" / "results.json"
    print(f"wrote {write_json(out, doc, default=str)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
