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
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import DATA_TARBALL, REPO, ensure_cifar  # noqa: E402

MODEL = "vlp-tiny-vit"
MODEL_JSON = REPO / "configs" / "models" / f"{MODEL}.json"
OLD_WDS = "0.2.86"
CONTENDERS = {
    "open_clip_train": "open_clip_train (webdataset 0.2.86)",
    "vlp_clip": "vlp CLIP-only (unmasked)",
    "vlp_mixed": "vlp mixed CLIP+MAE+sup (75% masked)",
    "vlp_flip": "vlp FLIP CLIP-only (75% masked, ref.)",
}
GOALS = {"vlp_clip": 1.05, "vlp_mixed": 1.8}
OPENCLIP_WRAPPER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]) or 0)")


def log(msg: str) -> None:
    print(f"[bench_throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- setup


def write_shards(train_root: Path, out: Path, n_images: int, seed: int = 0) -> dict:
    """The first ``n_images`` (stratified) as paired / labeled / unlabeled shards; skipped when already there."""
    marker = out / "done.json"
    params = {"n_images": n_images, "seed": seed, "version": 1}
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        return json.loads(marker.read_text())
    from vlp.shards import find_image_folder, write_class_files, write_samples

    classes, items = find_image_folder(train_root)
    by_class: dict[int, list] = {}
    for path, y in items:
        by_class.setdefault(y, []).append(path)
    rng = random.Random(seed)
    chosen = []
    for y in sorted(by_class):
        paths = sorted(by_class[y])
        rng.shuffle(paths)
        chosen += [(p, y) for p in paths[: n_images // len(by_class)]]
    rng.shuffle(chosen)
    log(f"writing {len(chosen)} images as paired / labeled / unlabeled shards to {out}")
    shutil.rmtree(out, ignore_errors=True)

    def samples(kind):
        for i, (path, y) in enumerate(chosen):
            s = {"__key__": f"{i:09d}", "jpg": Path(path).read_bytes()}
            if kind == "paired":
                caption = f"a photo of a {classes[y]}."
                s["txt"] = caption
                s["json"] = json.dumps({"caption": caption, "key": s["__key__"], "status": "success", "url": ""})
            elif kind == "labeled":
                s["cls"] = str(y)
            yield s

    info = {"params": params, "shards": {}}
    for kind in ("paired", "labeled", "unlabeled"):
        info["shards"][kind] = write_samples(samples(kind), out / kind, prefix="cifar10", maxcount=1000)
    ys = [y for _, y in chosen]
    write_class_files(out / "labeled", classes, {c: ys.count(c) for c in range(len(classes))})
    marker.write_text(json.dumps(info, indent=1) + "\n")
    return info


def ensure_old_webdataset(cache: Path) -> Path | None:
    """webdataset 0.2.86 in its own folder, for the open_clip_train subprocess only."""
    target = cache / f"webdataset-{OLD_WDS}"
    if not (target / "webdataset" / "__init__.py").is_file():
        log(f"installing webdataset=={OLD_WDS} into {target} (open_clip_train 3.3 needs it)")
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp),
                            f"webdataset=={OLD_WDS}"], capture_output=True, text=True)
        if r.returncode != 0:
            log(f"pip install webdataset=={OLD_WDS} failed: {r.stderr.strip()[-500:]}")
            return None
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    env = dict(os.environ, PYTHONPATH=_pythonpath(target))
    r = subprocess.run([sys.executable, "-c", "import webdataset; print(webdataset.__version__)"], env=env,
                       capture_output=True, text=True)
    if r.stdout.strip() != OLD_WDS:
        log(f"webdataset in {target} is {r.stdout.strip() or r.stderr.strip()[-300:]!r}, not {OLD_WDS}")
        return None
    return target


def _pythonpath(first: Path) -> str:
    rest = os.environ.get("PYTHONPATH", "")
    return str(first) + (os.pathsep + rest if rest else "")


# ---------------------------------------------------------------------------------------------- running


class TreeMemory(threading.Thread):
    """Polls the peak summed PSS (RSS where PSS is unavailable) of a process and its descendants."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            total = 0
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    mem = p.memory_full_info()
                    total += getattr(mem, "pss", 0) or mem.rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)


def run_subprocess(cmd: list[str], log_path: Path, env: dict, cwd: Path) -> dict:
    t0 = time.time()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT)
        mon = TreeMemory(proc.pid)
        mon.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        mon.stop.set()
        mon.join()
    return {"rc": proc.returncode, "wall_s": time.time() - t0, "peak_rss_mb": usage.ru_maxrss / 1024,
            "peak_tree_pss_mb": mon.peak / 2**20}


def windows_rate(windows: list[tuple[int, int, float, float]], batch: int, warmup: int):
    """``windows``: (first step, last step, step seconds, data seconds) per logged window, steps 1-based.
    Returns (samples/s, data-wait fraction, steps measured) over the windows that start after ``warmup``."""
    used = [w for w in windows if w[0] > warmup]
    steps = sum(last - first + 1 for first, last, _, _ in used)
    t = sum(s for _, _, s, _ in used)
    d = sum(dt for _, _, _, dt in used)
    if not steps or t <= 0:
        return None, None, 0
    return batch * steps / t, d / t, steps


LINE = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+ \(\s*\d+%\)\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")


def openclip_windows(log_text: str, batch: int) -> list[tuple[int, int, float, float]]:
    """Windows from open_clip_train's lines: ``[N/...]`` = N samples done; ``Data (t)`` and ``Batch (t)`` are the
    mean data-wait and step seconds over the steps since the previous line (its meters reset at each line)."""
    windows, prev = [], 0
    for m in LINE.finditer(log_text):
        done = int(m.group(1)) // batch
        n = done - prev
        if n > 0:
            windows.append((prev + 1, done, n * float(m.group(3)), n * float(m.group(2))))
        prev = done
    return windows


def vlp_windows(metrics_path: Path, batch: int) -> list[tuple[int, int, float, float]]:
    windows, prev = [], 0
    for line in metrics_path.read_text().splitlines():
        m = json.loads(line)
        if "samples_per_s" not in m:
            continue
        n = m["step"] - prev
        t = n * batch / m["samples_per_s"]
        windows.append((prev + 1, m["step"], t, t * m["data_wait_frac"]))
        prev = m["step"]
    return windows


def run_openclip(shards: Path, run_dir: Path, wds_dir: Path, args, model_json: Path = MODEL_JSON,
                 precision: str = "fp32", workers: int = 1, extra: tuple[str, ...] = ()) -> dict:
    """open_clip_train on the paired shards; ``model_json`` is registered with open_clip and trained by its stem
    name (tools/bench_gpu.py passes other models, ``amp_bf16``, more workers and e.g. ``--grad-checkpointing``)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    urls = sorted((shards / "paired").glob("*.tar"))
    spec = str(shards / "paired" / f"cifar10-{{000000..{len(urls) - 1:06d}}}.tar")
    cmd = [sys.executable, "-c", OPENCLIP_WRAPPER, str(model_json),
           "--dataset-type", "webdataset", "--train-data", spec, "--dataset-resampled",
           "--train-num-samples", str(args.steps * args.batch_size), "--model", Path(model_json).stem,
           "--precision", precision, "--batch-size", str(args.batch_size), "--workers", str(workers),
           "--epochs", "1", "--lr", "1e-3",
           "--warmup", "10", "--wd", "0.2", "--report-to", "", "--log-every-n-steps", "1",
           "--save-frequency", "0", "--seed", "0", "--logs", str(run_dir), "--name", "run", *extra]
    env = dict(os.environ, PYTHONPATH=_pythonpath(wds_dir), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    res = run_subprocess(cmd, run_dir / "stdout.log", env, REPO)
    log_file = run_dir / "run" / "out.log"
    text = log_file.read_text() if log_file.is_file() else ""
    if res["rc"] != 0 or not text:
        tail = (run_dir / "stdout.log").read_text()[-2500:]
        raise RuntimeError(f"open_clip_train failed (exit {res['rc']}):\n{tail}")
    res["windows"] = openclip_windows(text, args.batch_size)
    return res


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


def run_vlp(name: str, shards: Path, run_dir: Path, args) -> dict:
    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg = run_dir / "bench_config.yaml"
    cfg.write_text(yaml.safe_dump(vlp_config(name, shards, run_dir, args), sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    res = run_subprocess([sys.executable, "-m", "vlp.train", "--config", str(cfg)], run_dir / "stdout.log", env, REPO)
    if res["rc"] != 0 or not (run_dir / "metrics.jsonl").is_file():
        tail = (run_dir / "stdout.log").read_text()[-2500:]
        raise RuntimeError(f"vlp {name} failed (exit {res['rc']}):\n{tail}")
    res["windows"] = vlp_windows(run_dir / "metrics.jsonl", args.batch_size)
    return res


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

    cache = Path(args.cache_dir).resolve()
    train_root = ensure_cifar(cache / "cache")
    if train_root is None:
        print(f"bench_throughput: {DATA_TARBALL} not found; skipping (nothing to benchmark).")
        return 0
    shards = cache / "throughput" / "shards"
    write_shards(train_root, shards, args.images)
    wds_dir = None
    if "open_clip_train" in contenders:
        wds_dir = ensure_old_webdataset(cache / "cache")
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
                res = run_vlp(c.removeprefix("vlp_"), shards, run_dir, args)
            rate, wait, n = windows_rate(res["windows"], args.batch_size, args.warmup)
            res.update({"samples_per_s": rate, "data_wait_frac": wait, "steps_measured": n, "load_before": load})
            runs[c].append(res)
            log(f"repeat {rep + 1}/{args.repeats} {c}: {rate:.1f} samples/s over {n} steps, data wait "
                f"{100 * wait:.1f}%, peak RSS {res['peak_rss_mb']:.0f} MB, tree PSS {res['peak_tree_pss_mb']:.0f} MB, "
                f"wall {res['wall_s']:.0f} s")

    summary = {}
    for c, rs in runs.items():
        summary[c] = {
            "label": CONTENDERS[c],
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
        "runs": {c: [{k: v for k, v in r.items()} for r in rs] for c, rs in runs.items()},
    }
    out = Path(args.out) if args.out else cache / "throughput" / ("results-quick.json" if q else "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
