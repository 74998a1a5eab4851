#!/usr/bin/env python
"""GPU training step and end-to-end training of vlp's recipes against open_clip's: samples/s, step breakdown, peak
memory, MFU, the data-loader wait, and the CPU cores the loader needs to keep up.

Recipes (``configs/bench/throughput-{clip,flip,mixed}.yaml``, with ``--model`` and ``--batch-size``): CLIP-only
unmasked, FLIP (CLIP on the 75%-masked pass) and the mixed recipe (CLIP/UniCL + MAE + supervised, one 75%-masked
pass; batch split paired 1/2, labeled 1/8, unlabeled 3/8).

**Step rows** (``--rows clip,flip,mixed,open_clip``), in this process on one device, each on a synthetic batch of
the recipe's exact composition (``vlp.flops.synthetic_batch``: real tokenized text, labels, every view group), timed
in four parts with ``torch.cuda.synchronize()`` between them (on CPU: plain wall time): ``data`` (the pinned host
batch copied to the device), ``forward``, ``backward``, ``optimizer``; median over the steps after ``--warmup``.

- vlp: ``task.training_forward`` under autocast, backward and the task's after-backward hooks, fused AdamW with
  vlp's parameter groups and the task's after-step hooks (logit-scale clamp, teacher EMA). ``--compile``: vlp's
  ``train.compile`` (each transformer block compiled, ``vlp.task.compile_blocks``); ``--grad-checkpointing``:
  open_clip's ``set_grad_checkpointing``.
- ``open_clip``: open_clip_train's own step, in process (``benchlib.openclip.OpenClipStep``): the model, ClipLoss,
  AdamW (no decay on gains and biases, not fused, as open_clip_train builds it), cosine schedule, autocast and input
  dtype that ``open_clip_train.main`` builds from the command line the end-to-end run gets (``--precision amp_bf16``
  on GPU: no GradScaler; ``--torchcompile`` with ``--compile``), and ``train_one_epoch``'s step body, on the CLIP-only
  recipe's batch (the same images and tokens). open_clip_train's TF32 and cuDNN settings apply to this row only.
  This replaces the earlier row read from open_clip_train's log as ``Batch (t) - Data (t)``: open_clip_train never
  synchronizes inside a step, so that difference left out the GPU work that overlaps its next data wait (on one
  H200 it read 43% MFU against the 22% of the same step synchronized). It is not a compute time and is not shown.

MFU = FLOPs per step / step seconds / device peak. FLOPs: one step counted by ``FlopCounterMode`` (vlp:
``vlp.flops.count_training_flops``, forward, teacher, backward, hooks; open_clip: forward, loss, backward), matmuls
and attention, on the same model and batch: the CLIP-only and open_clip rows count the same FLOPs
(``tests/test_bench_gpu.py``). Peak: dense bf16 tensor-core TFLOP/s from ``PEAK_BF16`` (H100 SXM 989, H200 989,
A100 312, L4 121, ...); on CPU, against a measured fp32 matmul rate (``cpu matmul``), marked as such.

**End to end** (``--e2e vlp_mixed,vlp_clip,open_clip_train``): both trainers as subprocesses on the same real
shards: CIFAR-10 JPEGs (``../shared/data/cifar10-train.tar.gz``) resized to the model's input size and re-encoded
(``--e2e-images`` of them, written once as paired / labeled / unlabeled shards), with the same ``--workers`` data
workers, the same machine and cores, run one after the other. ``python -m vlp.train`` with the throughput config
(bf16 on GPU, ``train.compile`` with ``--compile``), and ``python -m open_clip_train.main`` through
``benchlib.openclip.run_openclip`` (webdataset 0.2.86, ``amp_bf16``, ``--torchcompile`` with ``--compile``). Each
for ``--e2e-steps`` steps, logging every ``--e2e-log-every``; samples/s over the windows after ``--e2e-warmup``
from each trainer's own log (vlp's ``metrics.jsonl``, open_clip_train's ``Batch (t)`` lines: wall time between step
ends, so honest end to end). Columns: the loader wait each trainer logs (vlp: seconds waiting for the next batch,
after a step that synchronized; open_clip_train: its ``Data (t)``, which also holds the GPU catching up on the step
it queued, so an upper bound), ``outside step``, the same estimate for both: 1 - the in-process step's seconds /
the end-to-end step's seconds (loader wait, syncs, logging, launch gaps; on a GPU, its idle share), MFU from the
same FLOP counts, and each row's samples/s over open_clip_train's.

**Loader** (``--no-loader`` to skip): the real ``MixedBatches`` (decode + open_clip's train transform +
tokenization, one process, one thread) over JPEG shards written once (``--loader-images`` images of 320x240,
smooth random content) at ``--loader-size`` px, with each recipe's composition and view groups: images/s per core,
and the cores needed to feed the measured vlp step (samples/s / images/s per core).

The results JSON is rewritten after every row, so a run stopped part-way keeps what finished; ``--report-only
A.json [B.json ...]`` prints the tables of one or more results files (e.g. the eager and the compiled run).

Usage::

    python tools/bench_gpu.py --quick                            # CPU smoke: tiny model, a few steps, every part
    python tools/bench_gpu.py --model ViT-B-16 --image-size 224 --batch-size 256 --steps 30 --warmup 10 \\
        --workers 12 [--compile] [--grad-checkpointing]          # a GPU (configs/laion-vitb16-mixed.yaml's model)
    bash tools/gpu_bench.sh run                                  # all of it on a lent GPU machine, one call
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from benchlib import REPO
from benchlib.cifar import CLASSNAMES, DATA_TARBALL, ensure_cifar, stratified_subset
from benchlib.cli import log, parse_list, write_json
from benchlib.images import synthetic_jpegs
from benchlib.openclip import OpenClipStep, run_openclip
from benchlib.shards import cached, class_files
from benchlib.wds_old import OLD_WDS, ensure_old_webdataset
from benchlib.windows import timed_vlp_run, windows_rate

RECIPES = {"clip": "CLIP-only (unmasked)", "flip": "FLIP (75% masked)", "mixed": "mixed CLIP+MAE+sup (75% masked)"}
STEP_ROWS = {**{r: f"vlp {label}" for r, label in RECIPES.items()},
             "open_clip": "open_clip step (synchronized)"}
# end-to-end contenders: (recipe whose FLOPs and in-process step they match, label)
E2E = {"vlp_mixed": ("mixed", "vlp mixed CLIP+MAE+sup (75% masked)"),
       "vlp_clip": ("clip", "vlp CLIP-only (unmasked)"),
       "vlp_flip": ("flip", "vlp FLIP (75% masked)"),
       "open_clip_train": ("open_clip", "open_clip_train")}
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
    """The model config as a JSON file (image size overridden), so vlp and open_clip build the same model."""
    from vlp.models.factory import resolve_model_config

    cfg = copy.deepcopy(resolve_model_config(name))
    if image_size:
        cfg["vision_cfg"]["image_size"] = image_size
    stem = Path(name).stem + (f"-{image_size}px" if image_size else "")
    path = out_dir / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path


def image_size_of(mjson: Path) -> int:
    size = json.loads(mjson.read_text())["vision_cfg"]["image_size"]
    return size if isinstance(size, int) else size[0]


def recipe_tree(recipe: str, model: Path, batch: int, steps: int) -> dict:
    import yaml

    tree = yaml.safe_load((REPO / "configs" / "bench" / f"throughput-{recipe}.yaml").read_text())
    tree["model"]["name"] = str(model)
    tree["data"]["batch"] = ({"paired": batch // 2, "labeled": batch // 8, "unlabeled": batch - batch // 2 - batch // 8}
                             if recipe == "mixed" else {"paired": batch})
    tree["train"]["steps"] = steps
    return tree


def recipe_config(recipe: str, model: Path, batch: int, steps: int):
    from vlp.config import config_from_dict

    return config_from_dict(recipe_tree(recipe, model, batch, steps), check_files=False)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(label: str, batch: int, parts: dict[str, list[float]], flops: float, peak: float | None, device,
         **extra) -> dict:
    med = {k: statistics.median(v) for k, v in parts.items()}
    step_s = sum(med.values())
    return {"label": label, "batch": batch, "samples_per_s": batch / step_s, "step_s": step_s, "parts_s": med,
            "gflop_per_step": flops / 1e9, "mfu": flops / step_s / peak if peak else None,
            "peak_mem_mb": _peak_mem(device), **extra}


def vlp_task(recipe: str, cfg, device: torch.device, args):
    """The recipe's task on ``device`` (teacher and objectives too) and its synthetic batch (on the host)."""
    from vlp.flops import synthetic_batch
    from vlp.task import PretrainTask

    torch.manual_seed(0)
    classnames = CLASSNAMES if recipe == "mixed" else None
    task = PretrainTask(cfg, 0, 1, classnames)
    task.student.to(device)
    if task.teacher is not None:
        task.teacher.to(device)
    for obj, _ in task.objectives.values():
        obj.to(device)
    if args.grad_checkpointing:
        task.student.clip.set_grad_checkpointing(True)
    return task, synthetic_batch(task, classnames)


def _pinned(x, device):
    return x.pin_memory() if device.type == "cuda" and hasattr(x, "pin_memory") else x


def bench_vlp(recipe: str, cfg, device: torch.device, args, peak: float | None) -> tuple[dict, object]:
    """vlp's training step of one recipe: per-part seconds (median over the timed steps), FLOPs, MFU, memory.
    Returns the row and the host batch it ran on."""
    from vlp.flops import count_training_flops
    try:
        from vlp.optim import param_groups
    except ImportError:  # before vlp.optim
        from vlp.train import param_groups

    task, host = vlp_task(recipe, cfg, device, args)
    host = _pinned(host, device)
    flops = count_training_flops(task, host.to(device), steps=1)
    if args.compile:  # what train.compile does (vlp.task.PretrainTask.prepare)
        from vlp.task import compile_blocks

        compile_blocks(task.student)
        if task.teacher is not None:
            compile_blocks(task.teacher)
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
    row = _row(STEP_ROWS[recipe] + (", compiled" if args.compile else ""), len(host), parts, flops, peak, device,
               view_groups=[g.name for g in task.view_groups])
    return row, host


def bench_open_clip(mjson: Path, host, device: torch.device, args, peak: float | None) -> dict:
    """open_clip_train's step in process (``benchlib.openclip.OpenClipStep``) on ``host``'s images and tokens,
    timed as vlp's rows are; open_clip_train's TF32 / cuDNN settings (its main sets them) for this row only."""
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    extra = (("--grad-checkpointing",) if args.grad_checkpointing else ()) + (("--torchcompile",) if args.compile else ())
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = True, True
    try:
        oc = OpenClipStep(mjson, device, args.steps, len(host), precision, extra)
        images, texts = _pinned(host.image, device), _pinned(host.text, device)
        flops = oc.count_flops(images, texts)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        parts = {"data": [], "forward": [], "backward": [], "optimizer": []}
        for step in range(args.steps):
            secs, loss = oc.step(step, images, texts, lambda: _sync(device))
            if step >= args.warmup:
                for k, v in zip(parts, secs):
                    parts[k].append(v)
            if not torch.isfinite(loss):
                raise RuntimeError(f"open_clip: non-finite loss at step {step}")
        label = STEP_ROWS["open_clip"] + (", torch.compile" if args.compile else "")
        return _row(label, len(host), parts, flops, peak, device, precision=precision,
                    command_line=" ".join(oc.argv))
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = saved


# ---------------------------------------------------------------------------------------------- end to end


def _resized_jpeg(job: tuple[str, int]) -> bytes:
    from PIL import Image

    path, size = job
    with Image.open(path) as im:
        out = io.BytesIO()
        im.convert("RGB").resize((size, size), Image.BICUBIC).save(out, format="JPEG", quality=90)
    return out.getvalue()


def e2e_shards(train_root: Path, out: Path, n_images: int, size: int, seed: int = 0) -> Path:
    """The first ``n_images`` CIFAR-10 images (stratified, seeded) at ``size`` px (bicubic, JPEG quality 90; the
    original bytes at 32 px) as paired / labeled / unlabeled shards, written once (benchlib.shards.cached)."""
    from multiprocessing import Pool

    from vlp.shards import write_samples

    def write(folder: Path) -> dict:
        classes, chosen = stratified_subset(train_root, n_images, seed)
        t0 = time.time()
        if size == 32:
            jpgs = [Path(p).read_bytes() for p, _ in chosen]
        else:
            with Pool(min(16, os.cpu_count() or 1)) as pool:
                jpgs = pool.map(_resized_jpeg, [(str(p), size) for p, _ in chosen], chunksize=64)
        log(f"{len(chosen)} CIFAR-10 images at {size} px ({sum(map(len, jpgs)) / len(jpgs) / 1024:.1f} KiB each, "
            f"{time.time() - t0:.0f} s) -> paired / labeled / unlabeled shards in {folder}")

        def samples(kind):
            for i, ((_, y), jpg) in enumerate(zip(chosen, jpgs)):
                s = {"__key__": f"{i:09d}", "jpg": jpg}
                if kind == "paired":
                    s["txt"] = f"a photo of a {classes[y]}."
                elif kind == "labeled":
                    s["cls"] = str(y)
                yield s

        for kind in ("paired", "labeled", "unlabeled"):  # 48 shards a kind: more than any bench's data workers
            write_samples(samples(kind), folder / kind, prefix="cifar10", maxcount=max(1, -(-len(chosen) // 48)))
        class_files(folder / "labeled", classes, [y for _, y in chosen])
        return {"images": len(chosen), "size": size}

    cached(out, {"n_images": n_images, "size": size, "seed": seed, "version": 2}, write)
    return out


def run_vlp_e2e(recipe: str, mjson: Path, shards: Path, run_dir: Path, device, args) -> dict:
    """``python -m vlp.train`` on the shards with the recipe's throughput config."""
    tree = recipe_tree(recipe, mjson, args.batch_size, args.e2e_steps)
    tree["output_dir"] = str(run_dir)
    for src in tree["data"]["sources"]:
        src["shards"] = str(shards / src["kind"] / "*.tar")
    tree["data"].update(workers=args.workers, resampled=True)  # vlp's default; open_clip_train gets --dataset-resampled
    tree["train"].update(log_every=args.e2e_log_every, precision="bf16" if device.type == "cuda" else "no",
                         compile=bool(args.compile))
    tree["model"]["grad_checkpointing"] = bool(args.grad_checkpointing)
    return timed_vlp_run(tree, run_dir, args.batch_size, recipe)


def e2e_row(name: str, res: dict, args, step_rows: dict, peak: float | None) -> dict | None:
    """One end-to-end row: the trainer's rate after warm-up, its logged loader wait, the GPU idle share estimated
    against the in-process step of the same work (``step_rows``), MFU from that step's FLOPs."""
    rate = windows_rate(res["windows"], args.batch_size, args.e2e_warmup)
    if rate is None:
        return None
    rate["loader_wait_frac"] = rate.pop("data_wait_frac")
    ref = step_rows.get(E2E[name][0]) or {}
    gflop, step_s = ref.get("gflop_per_step"), ref.get("step_s")
    return {"label": E2E[name][1], **rate, "gflop_per_step": gflop,
            "mfu": gflop * 1e9 / rate["step_s"] / peak if gflop and peak else None,
            "in_process_step_s": step_s, "idle_frac": 1 - step_s / rate["step_s"] if step_s else None,
            "wall_s": res["wall_s"], "peak_rss_mb": res["peak_rss_mb"], "peak_tree_pss_mb": res["peak_tree_pss_mb"],
            "workers": args.workers}


def e2e_ratios(e2e: dict) -> dict:
    """Each row's samples/s over open_clip_train's (None without an open_clip_train row), set in place."""
    base = e2e.get("open_clip_train", {}).get("samples_per_s")
    for row in e2e.values():
        row["ratio_vs_open_clip_train"] = row["samples_per_s"] / base if base else None
    return e2e


# ---------------------------------------------------------------------------------------------- loader


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

    from vlp.config import config_from_dict
    from vlp.data.mixing import MixedBatches
    from vlp.data.transforms import resolve_templates
    from vlp.task import PretrainTask

    tree = cfg.model_dump(mode="json")
    for src in tree["data"]["sources"]:
        src["shards"] = str(shards / src["kind"] / "*.tar")
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


# ---------------------------------------------------------------------------------------------- report


def _pct(x) -> str:
    return f"{100 * x:>5.1f}%" if x is not None else f"{'n/a':>6}"


def step_table(docs: list[dict]) -> list[str]:
    cpu = any(d["device"] == "cpu" for d in docs)
    mfu_head = "MFU*" if cpu else "MFU"
    head = (f"{'step (in process, synchronized)':<48} {'samples/s':>10} {'step ms':>8} {'data':>6} {'fwd':>6} "
            f"{'bwd':>6} {'opt':>6} {'GFLOP':>9} {mfu_head:>6} {'peak MB':>8}")
    lines = [head, "-" * len(head)]
    for d in docs:
        for s in d.get("steps", {}).values():
            p = s["parts_s"]
            cols = " ".join(f"{1000 * p[k]:>6.1f}" for k in ("data", "forward", "backward", "optimizer"))
            lines.append(f"{s['label']:<48} {s['samples_per_s']:>10.1f} {1000 * s['step_s']:>8.1f} {cols} "
                         f"{s['gflop_per_step']:>9.1f} {_pct(s['mfu'])} {s['peak_mem_mb']:>8.0f}")
    d = docs[0]
    a = d["args"]
    lines.append(f"device: {d['peak']}; model {d['model']}, batch {a['batch_size']}; median step over steps "
                 f"{a['warmup'] + 1}..{a['steps']}; peak MB: "
                 f"{'process max RSS (cumulative)' if cpu else 'max allocated'}")
    if cpu:
        lines.append("* CPU: fp32, MFU against the measured fp32 matmul rate above, not a spec peak")
    return lines


def e2e_table(doc: dict) -> list[str]:
    e2e, a = doc.get("e2e", {}), doc["args"]
    if not e2e:
        return []
    workers = f"{a['workers']} worker{'s' if a['workers'] != 1 else ''}"
    head = (f"{'end to end (' + workers + ', same shards)':<40} {'samples/s':>10} {'step ms':>8} "
            f"{'loader wait':>11} {'outside step':>12} {'MFU':>6} {'vs open_clip_train':>18}")
    lines = [head, "-" * len(head)]
    for name, r in e2e.items():
        ratio = f"{r['ratio_vs_open_clip_train']:.2f}x" if r.get("ratio_vs_open_clip_train") else "-"
        wait = _pct(r["loader_wait_frac"]) + ("^" if name == "open_clip_train" else " ")
        lines.append(f"{r['label']:<40} {r['samples_per_s']:>10.1f} {1000 * r['step_s']:>8.1f} {wait:>11} "
                     f"{_pct(r['idle_frac']):>12} {_pct(r['mfu'])} {ratio:>18}")
    lines.append(f"{doc['model']}, batch {a['batch_size']}, steps {a['e2e_warmup'] + 1}..{a['e2e_steps']} of "
                 f"{a['e2e_steps']} (log every {a['e2e_log_every']}), {doc.get('e2e_images')} CIFAR-10 images at "
                 f"{doc.get('e2e_size')} px; each trainer's own log")
    lines.append("outside step = 1 - in-process step / end-to-end step: loader wait, syncs, logging, launch gaps "
                 f"(on a GPU: the GPU's idle share){'; steps from ' + doc['steps_from'] if doc.get('steps_from') else ''}")
    if "open_clip_train" in e2e:
        lines.append("^ open_clip_train's Data (t): the wait for its loader plus the GPU finishing the step it queued "
                     "(it syncs at .item() after the timer restarts): an upper bound")
    return lines


def loader_lines(doc: dict) -> list[str]:
    loader = doc.get("loader", {})
    if not loader:
        return []
    first = next(iter(loader.values()))
    lines = [f"loader (real MixedBatches, 1 process, 1 thread, {first['image_size']} px, 320x240 JPEGs): "
             "decode + augment + tokenize"]
    for r, s in loader.items():
        feed = f" -> {s['cores_needed']:>6.1f} cores to feed {s['fed_samples_per_s']:.0f} samples/s" \
            if s.get("cores_needed") else ""
        lines.append(f"  {RECIPES[r]:<34} {s['images_per_s_per_core']:>8.1f} images/s per core{feed}")
    return lines


def report(docs: list[dict]) -> str:
    out = []
    if any(d.get("steps") for d in docs):
        out += step_table(docs) + [""]
    for d in docs:
        for part in (loader_lines(d), e2e_table(d)):
            if part:
                out += part + [""]
        for what, err in d.get("errors", {}).items():
            out.append(f"FAILED {what}{' (compiled)' if d['args'].get('compile') else ''}: {err.splitlines()[0][:300]}")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="open_clip name or JSON (default: vlp-tiny-vit on CPU, ViT-B-16 on GPU)")
    p.add_argument("--image-size", type=int, default=None, help="model image size (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 CPU, 256 GPU)")
    p.add_argument("--steps", type=int, default=None, help="steps per step row (default: 8 CPU, 30 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 3 CPU, 10 GPU)")
    p.add_argument("--rows", default=",".join(STEP_ROWS), help=f"step rows, subset of {','.join(STEP_ROWS)} ('' none)")
    p.add_argument("--compile", action="store_true", help="vlp's train.compile; open_clip_train's --torchcompile")
    p.add_argument("--grad-checkpointing", action="store_true", help="open_clip's set_grad_checkpointing (both)")
    p.add_argument("--e2e", default="vlp_mixed,vlp_clip,open_clip_train",
                   help=f"end-to-end runs, subset of {','.join(E2E)} ('' none)")
    p.add_argument("--workers", type=int, default=None, help="data workers of both trainers (default: 1 CPU, 12 GPU)")
    p.add_argument("--e2e-steps", type=int, default=None, help="steps per end-to-end run (default: 8 CPU, 40 GPU)")
    p.add_argument("--e2e-warmup", type=int, default=None, help="end-to-end steps left out (default: 3 CPU, 10 GPU)")
    p.add_argument("--e2e-log-every", type=int, default=None, help="log window, both trainers (default: 1 CPU, 5 GPU)")
    p.add_argument("--e2e-images", type=int, default=None, help="CIFAR-10 images in the shards (default: 1000 CPU, 5000 GPU)")
    p.add_argument("--steps-from", default=None, metavar="JSON",
                   help="a results file whose step rows give the end-to-end rows' FLOPs and in-process step")
    p.add_argument("--no-loader", action="store_true", help="skip the loader section")
    p.add_argument("--loader-size", type=int, default=224, help="loader bench image size (default: 224)")
    p.add_argument("--loader-images", type=int, default=400, help="JPEGs written for the loader bench")
    p.add_argument("--loader-batches", type=int, default=4, help="batches timed per recipe in the loader bench")
    p.add_argument("--quick", action="store_true", help="CPU smoke: batch 32, 4 steps (2 warm-up), 6 end-to-end "
                   "steps (2 warm-up), 300 images, a small loader bench")
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"), help="shards, runs (default: bench_out/)")
    p.add_argument("--out", default=None, help="results JSON (default: CACHE/gpu/results.json)")
    p.add_argument("--report-only", nargs="+", metavar="JSON", help="print the tables of these results files")
    args = p.parse_args(argv)
    if args.report_only:
        print(report([json.loads(Path(f).read_text()) for f in args.report_only]))
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    q = args.quick
    args.model = args.model or ("ViT-B-16" if cuda else "vlp-tiny-vit")
    args.batch_size = args.batch_size or (256 if cuda else 32 if q else 64)
    args.steps = args.steps or (30 if cuda else 4 if q else 8)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2 if q else 3)
    args.workers = args.workers or (12 if cuda else 1)
    args.e2e_steps = args.e2e_steps or (40 if cuda else 6 if q else 8)
    args.e2e_warmup = args.e2e_warmup if args.e2e_warmup is not None else (10 if cuda else 2 if q else 3)
    args.e2e_log_every = args.e2e_log_every or (5 if cuda else 1)
    args.e2e_images = args.e2e_images or (5000 if cuda else 300 if q else 1000)
    if q:
        args.loader_images, args.loader_batches = min(args.loader_images, 100), min(args.loader_batches, 1)
    rows = parse_list(args.rows)
    e2e_names = parse_list(args.e2e)
    for name, known, given in (("--rows", STEP_ROWS, rows), ("--e2e", E2E, e2e_names)):
        if set(given) - set(known):
            p.error(f"{name}: unknown {sorted(set(given) - set(known))}; choose from {','.join(known)}")
    if rows and args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if e2e_names and (args.e2e_steps - args.e2e_warmup < args.e2e_log_every or args.e2e_warmup % args.e2e_log_every):
        p.error("--e2e-warmup must be a multiple of --e2e-log-every, and --e2e-steps exceed it by a window")
    if args.batch_size < 8:
        p.error("--batch-size must be at least 8 (the mixed batch is split 1/2, 1/8, 3/8)")
    if args.compile and not cuda:
        log("--compile on CPU: compiling takes minutes here")
    cache = Path(args.cache_dir).resolve()
    mjson = model_json(args.model, args.image_size, cache / "gpu" / "models")
    peak, peak_desc = device_peak(device)
    log(f"{device} ({peak_desc}); model {mjson.stem}, batch {args.batch_size}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
        f"compile={args.compile}, grad_checkpointing={args.grad_checkpointing}")
    out = Path(args.out) if args.out else cache / "gpu" / "results.json"
    doc = {"benchmark": "bench_gpu", "device": str(device), "peak": peak_desc, "model": mjson.stem,
           "args": vars(args), "torch": torch.__version__, "steps": {}, "loader": {}, "e2e": {}}

    def save():
        doc["load_average"] = os.getloadavg()[0]
        write_json(out, doc, default=str)

    def failed(what: str, err: Exception) -> None:  # one row's failure (an OOM, a compile error) ends only that row
        import traceback

        log(f"{what} FAILED: {type(err).__name__}: {str(err)[-2000:]}\n{traceback.format_exc()[-3000:]}")
        doc.setdefault("errors", {})[what] = f"{type(err).__name__}: {str(err)[-500:]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()

    hosts = {}
    for r in rows:  # in the order given: a run cut short keeps the rows asked for first
        try:
            if r == "open_clip":  # on the CLIP-only recipe's batch (built here when that row has not run)
                host = hosts.get("clip") or vlp_task("clip", recipe_config("clip", mjson, args.batch_size, args.steps),
                                                    torch.device("cpu"), args)[1]
                doc["steps"][r] = row = bench_open_clip(mjson, host, device, args, peak)
            else:
                row, hosts[r] = bench_vlp(r, recipe_config(r, mjson, args.batch_size, args.steps), device, args, peak)
                doc["steps"][r] = row
        except Exception as err:  # noqa: BLE001
            failed(f"step {r}", err)
            continue
        log(f"{row['label']}: {row['samples_per_s']:.1f} samples/s, {row['gflop_per_step']:.1f} GFLOP/step")
        save()

    if not args.no_loader and any(r in RECIPES for r in rows):
        loader_shards = write_loader_shards(cache / "gpu" / "loader_shards", args.loader_images)
        for r in (r for r in rows if r in RECIPES):
            s = bench_loader(r, recipe_config(r, mjson, args.batch_size, args.steps), loader_shards,
                             args.loader_size, args.loader_batches)
            fed = doc["steps"][r]["samples_per_s"]
            doc["loader"][r] = {**s, "fed_samples_per_s": fed, "cores_needed": fed / s["images_per_s_per_core"]}
            save()

    if e2e_names:
        step_rows = dict(doc["steps"])
        if args.steps_from:
            step_rows = {**json.loads(Path(args.steps_from).read_text())["steps"], **step_rows}
            doc["steps_from"] = args.steps_from
        for name in e2e_names:  # FLOPs of a recipe no step row measured: counted here, on the device
            recipe = E2E[name][0]
            if recipe == "open_clip" and recipe not in step_rows:  # the same count as CLIP-only's (tests)
                recipe = "clip"
            if recipe not in step_rows:
                task, host = vlp_task(recipe, recipe_config(recipe, mjson, args.batch_size, 1), device, args)
                from vlp.flops import count_training_flops

                step_rows[recipe] = {"gflop_per_step": count_training_flops(task, host.to(device), steps=1) / 1e9,
                                     "step_s": None}
        if "open_clip" not in step_rows and "clip" in step_rows:  # the same count (tests/test_bench_gpu.py)
            step_rows["open_clip"] = {**step_rows["clip"], "step_s": None}
        train_root = ensure_cifar(cache / "cache")
        if train_root is None:
            log(f"end-to-end runs skipped: {DATA_TARBALL} not found")
        else:
            size = image_size_of(mjson)
            shards = e2e_shards(train_root, cache / "gpu" / f"e2e-shards-{size}px-{args.e2e_images}",
                                args.e2e_images, size)
            doc.update(e2e_images=args.e2e_images, e2e_size=size)
            runs = cache / "gpu" / "e2e-runs"
            for name in e2e_names:
                t0 = time.time()
                try:
                    if name == "open_clip_train":
                        wds_dir = ensure_old_webdataset(cache / "cache" / f"webdataset-{OLD_WDS}")
                        if wds_dir is None:
                            log("open_clip_train skipped: no webdataset 0.2.86")
                            continue
                        extra = (("--grad-checkpointing",) if args.grad_checkpointing else ()) + \
                            (("--torchcompile",) if args.compile else ())
                        res = run_openclip(shards, runs / name, wds_dir, args, model_json=mjson,
                                           precision="amp_bf16" if cuda else "fp32", workers=args.workers,
                                           extra=extra, log_every=args.e2e_log_every, steps=args.e2e_steps)
                    else:
                        res = run_vlp_e2e(E2E[name][0], mjson, shards, runs / name, device, args)
                except RuntimeError as err:  # the trainer failed: its log's tail is in the message
                    failed(f"e2e {name}", err)
                    continue
                row = e2e_row(name, res, args, step_rows, peak)
                if row is None:
                    log(f"{name}: no timed window after warm-up")
                    continue
                doc["e2e"][name] = row
                e2e_ratios(doc["e2e"])
                log(f"{name}: {row['samples_per_s']:.1f} samples/s end to end, loader wait "
                    f"{100 * row['loader_wait_frac']:.0f}% ({time.time() - t0:.0f} s)")
                save()

    print()
    print(report([doc]))
    save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
