#!/usr/bin/env python
"""Training throughput on CPU: open_clip_train vs vlp, the same tiny ViT on the same CIFAR-10 shards.

Contenders (each a fresh subprocess; repeats alternate between contenders; medians are reported):

(a) ``open_clip_train``: ``python -m open_clip_train.main``-equivalent (a two-line ``python -c`` wrapper that
    first registers ``configs/models/vlp-tiny-vit.json`` with ``open_clip.add_model_config``), webdataset
    loader, ``--precision fp32 --workers 1 --epochs 1 --dataset-resampled``, batch B. open_clip_train 3.3's
    webdataset pipeline breaks on webdataset 1.0.x (``KeyError: 'fname'``), so this subprocess alone gets
    webdataset 0.2.86 from ``CACHE/cache/webdataset-0.2.86`` (``pip install --no-deps --target``, once) first on
    PYTHONPATH; vlp stays on 1.0.x.
(b) ``vlp CLIP-only``: ``configs/bench/throughput-clip.yaml``: contrastive only, unmasked, B paired rows.
(c) ``vlp mixed``: ``configs/bench/throughput-mixed.yaml``: CLIP/UniCL + MAE + supervised in one 75%-masked pass,
    B rows split paired 1/2, labeled 1/8, unlabeled 3/8.
(d) ``vlp FLIP`` (reference): ``configs/bench/throughput-flip.yaml``: CLIP-only with the 75%-masked pass.

Both stacks run the same training work where they overlap: fp32, AdamW (betas 0.9/0.98, eps 1e-6, wd 0.2), no
gradient clipping, open_clip's train transform (RandomResizedCrop scale 0.9-1), one data-loader worker.

How samples/s is measured: from each trainer's own per-window timing, the steps after ``--warmup`` only.
open_clip_train logs ``Batch (t)`` / ``Data (t)`` (mean seconds per step and data wait over the steps since its
previous log line; ``--log-every-n-steps 1``, so every step is a window and the measured steps are exactly
``warmup+1..steps``, as for vlp); vlp writes ``samples_per_s`` / ``data_wait_frac`` per ``--log-every`` window to
``metrics.jsonl``. Both windows time the whole step (waiting for data, forward, backward, optimizer)
and neither includes start-up, compilation of the first step or the final checkpoint. samples/s is
``B x steps / seconds`` over the post-warm-up windows; data-wait fraction is data-wait seconds / step seconds.

Memory: ``peak_rss_mb`` is ``ru_maxrss`` of the subprocess from ``os.wait4`` (the largest single process of its
tree: the trainer, or its data worker); ``peak_tree_pss_mb`` the highest sum of PSS over the trainer and its
data workers, polled every 0.5 s with psutil (shared pages counted once).

Shards: the first ``--images`` (10,000) CIFAR-10 training images (class-stratified, seeded), written once into
``CACHE/throughput/shards/{paired,labeled,unlabeled}``; captions "a photo of a {class}.".

Usage::

    python tools/bench_throughput.py                 # 40 steps (10 warm-up), 3 repeats, batch 128
    python tools/bench_throughput.py --quick         # smoke run: batch 64, 8 steps (3 warm-up), 1 repeat
    python tools/bench_throughput.py --out bench_out/throughput.json --repeats 5
    python tools/bench_throughput.py --contenders vlp_clip,vlp_mixed --baseline /tmp/base   # vs an older checkout
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from benchlib import REPO
from benchlib.cifar import DATA_TARBALL, ensure_cifar, subset_shards
from benchlib.cli import log, write_json
from benchlib.openclip import TINY_VIT, run_openclip
from benchlib.wds_old import OLD_WDS, ensure_old_webdataset
from benchlib.windows import timed_vlp_run, windows_rate

MODEL = TINY_VIT.stem
CONTENDERS = {
    "open_clip_train": "open_clip_train (webdataset 0.2.86)",
    "vlp_clip": "vlp CLIP-only (unmasked)",
    "vlp_mixed": "vlp mixed CLIP+MAE+sup (75% masked)",
    "vlp_flip": "vlp FLIP CLIP-only (75% masked, ref.)",
}
GOALS = {"vlp_clip": 1.05, "vlp_mixed": 1.8}


# ---------------------------------------------------------------------------------------------- running


def vlp_config(name: str, shards: Path, run_dir: Path, args) -> dict:
    import yaml

    tree = yaml.safe_load((REPO / "configs" / "bench" / f"throughput-{name}.yaml").read_text())
    tree["output_dir"] = str(run_dir)
    for src in tree["data"]["sources"]:
        kind_dir = Path(src["shards"]).parent.name
        src["shards"] = str(shards / kind_dir / "*.tar")
    b = args.batch_size
    if name == "mixed":
        tree["data"]["batch"] = {"paired": b // 2, "labeled": b // 8, "unlabeled": b - b // 2 - b // 8}
    else:
        tree["data"]["batch"] = {"paired": b}
    tree["train"]["steps"] = args.steps
    tree["train"]["log_every"] = args.log_every
    return tree


def run_vlp(name: str, shards: Path, run_dir: Path, args, root: Path = REPO) -> dict:
    """One ``python -m vlp.train`` of a throughput config; ``root``: the checkout whose ``vlp`` runs (``--baseline``)."""
    return timed_vlp_run(vlp_config(name, shards, run_dir, args), run_dir, args.batch_size, name, root)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default: 40; quick 8)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the rate (default: 10; quick 3)")
    p.add_argument("--log-every", type=int, default=None, help="timing window in steps (default: 5; quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="runs per contender, alternating (default: 3; quick 1)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step, every contender (default: 128; quick 64)")
    p.add_argument("--images", type=int, default=10000, help="CIFAR-10 images written to the shards (default: 10000)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"subset of {','.join(CONTENDERS)}")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 64, 8 steps, 3 warm-up, 1 repeat")
    p.add_argument("--baseline", default=None, metavar="CHECKOUT",
                   help="another vlp checkout (e.g. `git worktree add /tmp/base HEAD~1`): its vlp contenders run too, "
                        "alternating with this checkout's, and the table gives this / baseline")
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"), help="extraction, shards, runs (default: bench_out/)")
    p.add_argument("--out", default=None, help="results JSON (default: CACHE/throughput/results[-quick].json)")
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (8 if q else 40)
    args.warmup = args.warmup if args.warmup is not None else (3 if q else 10)
    args.log_every = args.log_every or (1 if q else 5)
    args.repeats = args.repeats or (1 if q else 3)
    args.batch_size = args.batch_size or (64 if q else 128)
    if args.steps - args.warmup < args.log_every:
        p.error("--steps must exceed --warmup by at least one --log-every window")
    if args.warmup % args.log_every:
        p.error("--warmup must be a multiple of --log-every (windows are measured whole)")
    if args.batch_size < 8:
        p.error("--batch-size must be at least 8 (the mixed batch is split 1/2, 1/8, 3/8)")
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        p.error(f"--contenders: unknown {unknown}; choose from {list(CONTENDERS)}")
    labels = dict(CONTENDERS)
    baseline = Path(args.baseline).resolve() if args.baseline else None
    if baseline is not None:
        if not (baseline / "vlp" / "train.py").is_file():
            p.error(f"--baseline: {baseline} is not a vlp checkout (no vlp/train.py)")
        for c in [c for c in contenders if c.startswith("vlp_")]:
            contenders.append(f"{c}@baseline")
            labels[f"{c}@baseline"] = f"{CONTENDERS[c].split(' (')[0]} (baseline)"

    cache = Path(args.cache_dir).resolve()
    train_root = ensure_cifar(cache / "cache")
    if train_root is None:
        print(f"bench_throughput: {DATA_TARBALL} not found; skipping (nothing to benchmark).")
        return 0
    shards = cache / "throughput" / "shards"
    subset_shards(train_root, shards, args.images)
    wds_dir = None
    if "open_clip_train" in contenders:
        wds_dir = ensure_old_webdataset(cache / "cache" / f"webdataset-{OLD_WDS}")
        if wds_dir is None:
            log("open_clip_train skipped: no webdataset 0.2.86 (ratios to it will be missing)")
            contenders.remove("open_clip_train")

    import torch

    log(f"batch {args.batch_size}, {args.steps} steps ({args.warmup} warm-up, windows of {args.log_every}), "
        f"{args.repeats} repeat(s); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    runs_dir = cache / "throughput" / "runs"
    for rep in range(args.repeats):
        order = contenders if rep % 2 == 0 else contenders[::-1]  # alternate, and balance position effects
        for c in order:
            run_dir = runs_dir / f"{c}-{rep}"
            load = os.getloadavg()[0]
            if c == "open_clip_train":
                res = run_openclip(shards, run_dir, wds_dir, args)
            else:
                name = c.removeprefix("vlp_").removesuffix("@baseline")
                res = run_vlp(name, shards, run_dir, args, baseline if c.endswith("@baseline") else REPO)
            r = windows_rate(res["windows"], args.batch_size, args.warmup) or {}
            rate, wait, n = r.get("samples_per_s"), r.get("data_wait_frac"), r.get("steps_measured", 0)
            res.update({"samples_per_s": rate, "data_wait_frac": wait, "steps_measured": n, "load_before": load})
            runs[c].append(res)
            log(f"repeat {rep + 1}/{args.repeats} {c}: {rate:.1f} samples/s over {n} steps, data wait "
                f"{100 * wait:.1f}%, peak RSS {res['peak_rss_mb']:.0f} MB, tree PSS {res['peak_tree_pss_mb']:.0f} MB, "
                f"wall {res['wall_s']:.0f} s")

    summary = {}
    for c, rs in runs.items():
        summary[c] = {
            "label": labels[c],
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rs),
            "samples_per_s_all": [round(r["samples_per_s"], 2) for r in rs],
            "data_wait_frac_median": statistics.median(r["data_wait_frac"] for r in rs),
            "peak_rss_mb_max": max(r["peak_rss_mb"] for r in rs),
            "peak_tree_pss_mb_max": max(r["peak_tree_pss_mb"] for r in rs),
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
        }
    base = summary.get("open_clip_train", {}).get("samples_per_s_median")
    for c, s in summary.items():
        s["ratio_vs_open_clip_train"] = s["samples_per_s_median"] / base if base else None
    mixed_over_clip = (summary["vlp_mixed"]["samples_per_s_median"] / summary["vlp_clip"]["samples_per_s_median"]
                       if "vlp_mixed" in summary and "vlp_clip" in summary else None)

    print()
    head = (f"{'contender':<40} {'samples/s':>10} {'(all)':>22} {'vs oc_train':>11} {'peak RSS':>9} "
            f"{'tree PSS':>9} {'data wait':>9}")
    print(head)
    print("-" * len(head))
    for c, s in summary.items():
        ratio = f"{s['ratio_vs_open_clip_train']:.2f}x" if s["ratio_vs_open_clip_train"] else "-"
        allr = "/".join(f"{v:.1f}" for v in s["samples_per_s_all"])
        print(f"{s['label']:<40} {s['samples_per_s_median']:>10.1f} {allr:>22} {ratio:>11} "
              f"{s['peak_rss_mb_max']:>7.0f}MB {s['peak_tree_pss_mb_max']:>7.0f}MB {100 * s['data_wait_frac_median']:>8.1f}%")
    print(f"medians over {args.repeats} alternating repeat(s); batch {args.batch_size}; samples/s from each trainer's "
          f"own step timing (open_clip_train's 'Batch (t)' log lines, vlp's metrics.jsonl) over steps "
          f"{args.warmup + 1}..{args.steps}, start-up and warm-up excluded.")
    if mixed_over_clip:
        print(f"vlp mixed / vlp CLIP-only: {mixed_over_clip:.2f}x")
    vs_baseline = {c: summary[c]["samples_per_s_median"] / summary[f"{c}@baseline"]["samples_per_s_median"]
                   for c in summary if f"{c}@baseline" in summary}
    for c, ratio in vs_baseline.items():
        print(f"{CONTENDERS[c]}: this checkout / baseline {baseline}: {ratio:.3f}x")
    goals = {}
    for c, goal in GOALS.items():
        if c in summary and base:
            ratio = summary[c]["ratio_vs_open_clip_train"]
            goals[c] = {"goal": goal, "ratio": ratio, "met": ratio >= goal}
            print(f"goal {CONTENDERS[c]} >= {goal}x open_clip_train: {ratio:.2f}x -> {'met' if ratio >= goal else 'NOT met'}")

    doc = {
        "benchmark": "bench_throughput", "quick": q, "model": MODEL, "batch_size": args.batch_size,
        "steps": args.steps, "warmup_steps": args.warmup, "log_every": args.log_every, "repeats": args.repeats,
        "images": args.images, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "method": "samples/s = batch x steps / summed step seconds over post-warm-up windows of each trainer's own "
                  "timing (open_clip_train: 'Batch (t)' and 'Data (t)' log lines; vlp: metrics.jsonl)",
        "summary": summary, "mixed_over_vlp_clip": mixed_over_clip, "goals": goals,
        "baseline": str(baseline) if baseline else None, "vs_baseline": vs_baseline,
        "runs": {c: [{k: v for k, v in r.items()} for r in rs] for c, rs in runs.items()},
    }
    out = Path(args.out) if args.out else cache / "throughput" / ("results-quick.json" if q else "results.json")
    print(f"wrote {write_json(out, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
