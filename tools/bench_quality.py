#!/usr/bin/env python
"""Quality at equal compute on CIFAR-10: CLIP-only vs MAE-only vs supervised-only vs mixed (vlp).

Data (``../shared/data/cifar10-train.tar.gz``, the 50,000 CIFAR-10 training JPEGs; skipped with a message when
absent). A fixed, class-stratified 5,000 images are held out as the test set; of the other 45,000 (per class,
stratified, fixed seed): 10% labeled (``cls``), 20% image-text (captions made from the label with one of
``CAPTION_TEMPLATES``, drawn at random), 70% unlabeled (labels dropped). All are written as WebDataset shards
under ``--cache-dir`` (default ``bench_out/``, git-ignored): ``quality/shards/{labeled,paired,unlabeled,test}``.

Runs (one ``python -m vlp.train`` subprocess each; base configs in ``configs/bench/quality-*.yaml``):

=============== ============================================= =====================================
run             data (rows per step)                          objectives
=============== ============================================= =====================================
clip            paired (B)                                    contrastive (CLIP)
mae             labeled + paired + unlabeled as images (B)    MAE
supervised      labeled (B)                                   cross-entropy head
mixed           paired + labeled + unlabeled (B in total)     CLIP/UniCL (labels as text) + MAE + CE
=============== ============================================= =====================================

Equal compute (``--compute-rule``):

* ``equal-masking`` (default): every run uses the same masked image pass (``--mask-ratio``, 0.75), the same
  total batch ``B`` and the same number of steps, so every run spends the same image-tower FLOPs (the text
  tower, MAE decoder and heads differ, and only the mixed run pays for all three).
* ``equal-flops``: the runs whose objective does not need masking (clip, supervised) run unmasked, with their
  step count multiplied by the token ratio ``(1 + N*(1-r)) / (1 + N)`` (N patches, r the mask ratio; ~0.26 at
  r=0.75 for 64 patches), so that their image-tower FLOPs match the masked runs'.

Evaluation on the held-out 5,000, with frozen features of each run's ``clip`` (``vlp.models.factory.load_clip``):

* kNN top-1 (``vlp.eval.probe.knn_eval``, k=20, T=0.07) and linear-probe top-1 (``vlp.eval.probe.linear_probe``,
  logistic regression on standardized features), both fit on the 10% labeled split (4,500 images; the labels
  a practitioner has), on two features: ``pooled`` (the ViT's pooled token after ``ln_post``, before the CLIP
  projection: the backbone feature, fair to MAE / supervised runs whose projection is never trained) and
  ``embed`` (the normalized CLIP image embedding, what ``encode_image`` returns). The headline is ``pooled``.
* zero-shot top-1 (``vlp.eval.zeroshot.build_classifier`` over the caption templates, and over the single
  prompt "a photo of a {c}."; argmax of the test embeddings times the classifier, as ``zeroshot_eval`` does,
  reusing the extracted features). For the MAE-only and supervised-only runs the text tower is never trained:
  their zero-shot numbers are reported but marked meaningless (chance is 10%).

The step count is chosen from ``--budget-minutes`` (default 55, so the whole run fits in an hour on 2 cores):
a 12-step calibration of each run measures its seconds per step on this machine now, and the steps are what
fits after data preparation, start-up and evaluation, with a 15% margin; ``--steps`` overrides. Should the CPU
get busier later, a run that overruns its share of the budget is stopped with SIGTERM (vlp checkpoints the
step it reached) and marked ``cut short`` in the table and the JSON.

All runs: vlp-tiny-vit, lr 1e-3 from configs/bench/quality-*.yaml (AdamW, wd 0.05, cosine; 2e-3 stalls the
mixed run's 80-row contrastive batch, README), warm-up 10% of the steps but at least 30 (CLIP from scratch
collapses to a constant embedding with a few-step warm-up), gradient clip 1, batch 128.
The MAE-only and supervised-only runs never train the CLIP projection; hence the ``pooled`` headline.

Usage::

    python tools/bench_quality.py                      # full run (< 60 min on 2 cores), table + JSON
    python tools/bench_quality.py --quick              # smoke run: 6,000 images, 10 steps per run (~2 min idle)
    python tools/bench_quality.py --prepare-only       # write the shards configs/cifar10-mixed.yaml reads
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA_TARBALL = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CAPTION_TEMPLATES = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a close-up photo of the {c}.",
    "a small picture of a {c}.",
    "an image showing a {c}.",
    "a pixelated photo of the {c}.",
    "a cropped photo of a {c}.",
    "a good photo of a {c}.",
    "a snapshot of a {c} outdoors.",
    "there is a {c} in this picture.",
    "a tiny thumbnail of a {c}.",
    "{c}",
]
SIMPLE_TEMPLATE = ["a photo of a {c}."]
RUNS = ("clip", "mae", "supervised", "mixed")
TEXT_TRAINED = {"clip": True, "mae": False, "supervised": False, "mixed": True}


def log(msg: str) -> None:
    print(f"[bench_quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- data


def ensure_cifar(cache: Path) -> Path | None:
    """Extract the CIFAR-10 tarball once into ``cache/cifar10``; returns the ImageFolder root (``.../train``)."""
    root = cache / "cifar10"
    done = root / ".extracted"
    if done.is_file():
        return root / "train"
    if not DATA_TARBALL.is_file():
        return None
    log(f"extracting {DATA_TARBALL} -> {root}")
    tmp = root.with_name("cifar10.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(DATA_TARBALL) as tf:
        tf.extractall(tmp, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    done.write_text("ok\n")
    return root / "train"


def split_cifar(train_root: Path, n_test: int, limit_per_class: int | None, seed: int):
    """Class-stratified, seeded split: (test, labeled, paired, unlabeled), each a list of (path, label)."""
    from vlp.shards import find_image_folder

    classes, items = find_image_folder(train_root)
    if classes != CLASSNAMES:
        raise SystemExit(f"unexpected CIFAR-10 classes in {train_root}: {classes}")
    by_class: dict[int, list] = {}
    for path, y in items:
        by_class.setdefault(y, []).append(path)
    rng = random.Random(seed)
    test, labeled, paired, unlabeled = [], [], [], []
    per_test = n_test // len(classes)
    for y in sorted(by_class):
        paths = sorted(by_class[y])
        rng.shuffle(paths)
        if limit_per_class:
            paths = paths[:limit_per_class]
        test += [(p, y) for p in paths[:per_test]]
        rest = paths[per_test:]
        n_lab, n_pair = round(0.10 * len(rest)), round(0.20 * len(rest))
        labeled += [(p, y) for p in rest[:n_lab]]
        paired += [(p, y) for p in rest[n_lab:n_lab + n_pair]]
        unlabeled += [(p, y) for p in rest[n_lab + n_pair:]]
    for part in (test, labeled, paired, unlabeled):
        rng.shuffle(part)  # shards mix classes
    return test, labeled, paired, unlabeled


def write_split_shards(out: Path, parts: dict[str, list], seed: int, maxcount: int = 1000) -> dict[str, int]:
    from vlp.shards import write_class_files, write_samples

    rng = random.Random(seed + 1)

    def samples(items, kind):
        for i, (path, y) in enumerate(items):
            s = {"__key__": f"{i:09d}", "jpg": Path(path).read_bytes()}  # CIFAR JPEGs keep their bytes
            if kind in ("labeled", "test"):
                s["cls"] = str(y)
            elif kind == "unlabeled":  # withheld: read only to measure pseudo-label accuracy (Batch.hidden_label)
                s["hidden.cls"] = str(y)
            elif kind == "paired":
                caption = rng.choice(CAPTION_TEMPLATES).format(c=CLASSNAMES[y])
                s["txt"] = caption
                s["json"] = json.dumps({"caption": caption, "key": s["__key__"], "status": "success",
                                        "url": f"cifar10/{Path(path).parent.name}/{Path(path).name}"})
            yield s

    counts = {}
    for kind, items in parts.items():
        write_samples(samples(items, kind), out / kind, prefix="cifar10", maxcount=maxcount)
        counts[kind] = len(items)
        if kind in ("labeled", "test"):
            ys = [y for _, y in items]
            write_class_files(out / kind, CLASSNAMES, {c: ys.count(c) for c in range(len(CLASSNAMES))})
    (out / "test" / "zeroshot_classification_templates.txt").write_text("\n".join(CAPTION_TEMPLATES) + "\n")
    (out / "paired" / "caption_templates.txt").write_text("\n".join(CAPTION_TEMPLATES) + "\n")
    return counts


def prepare(cache: Path, shards: Path, n_test: int, limit_per_class: int | None, seed: int) -> dict | None:
    """Extract CIFAR-10 and write the four shard folders (skipped when already written with these settings)."""
    params = {"n_test": n_test, "limit_per_class": limit_per_class, "seed": seed, "templates": CAPTION_TEMPLATES,
              "version": 2}
    marker = shards / "split.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("params") == params:
            log(f"shards already written in {shards} ({info['counts']})")
            return info
    train_root = ensure_cifar(cache)
    if train_root is None:
        return None
    t0 = time.time()
    test, labeled, paired, unlabeled = split_cifar(train_root, n_test, limit_per_class, seed)
    log(f"writing shards to {shards}: test {len(test)}, labeled {len(labeled)}, paired {len(paired)}, "
        f"unlabeled {len(unlabeled)}")
    shutil.rmtree(shards, ignore_errors=True)
    counts = write_split_shards(shards, {"test": test, "labeled": labeled, "paired": paired,
                                         "unlabeled": unlabeled}, seed)
    info = {"params": params, "counts": counts, "seconds": round(time.time() - t0, 1)}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    log(f"shards written in {info['seconds']} s")
    return info


# ---------------------------------------------------------------------------------------------- runs


def run_config(run: str, shards: Path, out_dir: Path, steps: int, batch_total: int, mask_ratio: float,
               model: str | None, warmup: int, log_every: int) -> dict:
    """The base config ``configs/bench/quality-RUN.yaml`` with this bench's paths, steps, batch and masking."""
    import yaml

    tree = yaml.safe_load((REPO / "configs" / "bench" / f"quality-{run}.yaml").read_text())
    tree["output_dir"] = str(out_dir)
    default = "bench_out/quality/shards"
    for src in tree["data"]["sources"]:
        specs = src["shards"] if isinstance(src["shards"], list) else [src["shards"]]
        specs = [str(shards / s[len(default) + 1:]) if s.startswith(default + "/") else s for s in specs]
        src["shards"] = specs if isinstance(src["shards"], list) else specs[0]
    batch = tree["data"]["batch"]
    base_total = sum(batch.values())
    if batch_total != base_total:  # keep the composition's proportions, exact total
        kinds = list(batch)
        scaled = {k: max(1, round(batch[k] * batch_total / base_total)) for k in kinds}
        scaled[kinds[-1]] += batch_total - sum(scaled.values())
        tree["data"]["batch"] = scaled
    tree["model"]["mask_ratio"] = mask_ratio
    if model:
        tree["model"]["name"] = model
    tree["train"]["steps"] = steps
    tree["train"]["log_every"] = log_every
    tree["optim"]["warmup_steps"] = warmup
    return tree


def launch(tree: dict, run_dir: Path, time_limit: float | None = None) -> dict:
    """Train one config in a ``python -m vlp.train`` subprocess. A run past ``time_limit`` seconds gets SIGTERM:
    vlp checkpoints the current step and exits (the run is then marked ``cut_short``)."""
    import signal

    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "bench_config.yaml"
    cfg_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    cut = False
    with open(run_dir / "train.log", "w") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config", str(cfg_path)], cwd=REPO, env=env,
                                stdout=logf, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            if time_limit is not None and not cut and time.time() - t0 > time_limit:
                log(f"{run_dir.name}: past its time limit ({time_limit:.0f} s): SIGTERM, checkpoint and stop")
                proc.send_signal(signal.SIGTERM)
                cut = True
            time.sleep(0.5)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise SystemExit(f"run {run_dir.name} failed (exit {proc.returncode}); log tail:\n{tail}")
    from vlp.checkpoint import read_run_info

    state = read_run_info(run_dir)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_s": round(wall, 1), "steps_done": state["step"], "cut_short": cut or state["step"] < tree["train"]["steps"],
            "last": state.get("metrics", {}), "metrics": metrics}


def seconds_per_step(metrics: list[dict], batch_total: int, skip_steps: int) -> float | None:
    """Mean seconds per step over the logged windows after ``skip_steps`` (each window: log_every steps)."""
    rows = [m for m in metrics if "samples_per_s" in m]
    steps_prev, t, n = 0, 0.0, 0
    for m in rows:
        window = m["step"] - steps_prev
        if steps_prev >= skip_steps:
            t += window * batch_total / m["samples_per_s"]
            n += window
        steps_prev = m["step"]
    return t / n if n else None


# ---------------------------------------------------------------------------------------------- evaluation


def extract(clip, loader):
    """(pooled [N, W], embed [N, D] normalized, labels [N]) over a labeled loader; one unmasked forward each.

    ``pooled`` is the ViT's pooled token (after ln_post, before the CLIP projection); ``embed`` is exactly
    ``clip.encode_image(x, normalize=True)`` (pooled @ proj, normalized)."""
    import torch
    import torch.nn.functional as F

    from vlp.eval.zeroshot import input_dtype

    visual = clip.visual
    proj = visual.proj
    pooled, embed, labels = [], [], []
    visual.proj = None
    try:
        with torch.no_grad():
            for images, y in loader:
                p = visual(images.to(input_dtype(clip))).float()
                pooled.append(p)
                embed.append(F.normalize(p @ proj.float() if proj is not None else p, dim=-1))
                labels.append(y)
    finally:
        visual.proj = proj
    return torch.cat(pooled), torch.cat(embed), torch.cat(labels)


def standardize(train, test):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def evaluate_run(run_dir: Path, shards: Path, batch_size: int = 256) -> dict:
    import torch
    from threadpoolctl import threadpool_limits

    from vlp.eval.data import labeled_loader
    from vlp.eval.probe import knn_eval, linear_probe
    from vlp.eval.zeroshot import build_classifier
    from vlp.models.factory import load_clip

    t0 = time.time()
    torch.manual_seed(0)
    clip, _, tokenizer, preprocess = load_clip(run_dir)
    tr_pooled, tr_embed, tr_y = extract(clip, labeled_loader(str(shards / "labeled"), preprocess, batch_size, 1))
    te_pooled, te_embed, te_y = extract(clip, labeled_loader(str(shards / "test"), preprocess, batch_size, 1))
    out: dict = {"n_probe_train": int(len(tr_y)), "n_test": int(len(te_y))}
    for name, tr, te in (("pooled", tr_pooled, te_pooled), ("embed", tr_embed, te_embed)):
        out[f"knn_top1/{name}"] = knn_eval(tr, tr_y, te, te_y, k=20, T=0.07, num_classes=len(CLASSNAMES))["top1"]
        a, b = standardize(tr, te)
        # one BLAS/OpenMP thread: on a busy 2-core machine sklearn's lbfgs spins ~100x slower with two
        with threadpool_limits(1):
            out[f"linear_top1/{name}"] = linear_probe(a, tr_y, b, te_y, C=1.0, max_iter=2000)["top1"]
    for name, templates in (("templates", CAPTION_TEMPLATES), ("photo", SIMPLE_TEMPLATE)):
        weights = build_classifier(clip, tokenizer, CLASSNAMES, templates)  # [D, C]
        pred = (te_embed @ weights).argmax(dim=1)
        out[f"zeroshot_top1/{name}"] = float((pred == te_y).float().mean())
    out["eval_s"] = round(time.time() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------------- report


def print_table(results: dict) -> None:
    cols = [("kNN pooled", "knn_top1/pooled"), ("kNN embed", "knn_top1/embed"),
            ("linear pooled", "linear_top1/pooled"), ("linear embed", "linear_top1/embed"),
            ("zero-shot tmpl", "zeroshot_top1/templates"), ("zero-shot photo", "zeroshot_top1/photo")]
    head = f"{'run':<11} {'mask':>5} {'steps':>6}  " + "  ".join(f"{c:>15}" for c, _ in cols)
    print(head)
    print("-" * len(head))
    for run, r in results.items():
        e = r["eval"]
        cells = []
        for _, key in cols:
            v = 100 * e[key]
            mark = "*" if key.startswith("zeroshot") and not TEXT_TRAINED[run] else " "
            cells.append(f"{v:>14.2f}{mark}")
        cut = " (cut short)" if r["train"]["cut_short"] else ""
        print(f"{run:<11} {r['mask_ratio']:>5.2f} {r['train']['steps_done']:>6}  " + "  ".join(cells) + cut)
    print("top-1 %, held-out test set. * text tower never trained: zero-shot is meaningless (chance 10%).")
    if "mixed" in results:
        m = results["mixed"]["eval"]
        for key in ("knn_top1/pooled", "zeroshot_top1/templates"):
            others = {r: results[r]["eval"][key] for r in results if r != "mixed"
                      and (not key.startswith("zeroshot") or TEXT_TRAINED[r])}
            if others:
                best = max(others, key=others.get)
                print(f"mixed - best single ({best}) on {key}: {100 * (m[key] - others[best]):+.2f} points")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"),
                   help="where CIFAR-10 is extracted and shards / runs are written (default: bench_out/)")
    p.add_argument("--out", default=None, help="results JSON (default: CACHE/quality[-quick]/results.json)")
    p.add_argument("--prepare-only", action="store_true", help="extract CIFAR-10, write the shards, stop")
    p.add_argument("--quick", action="store_true", help="smoke run: 6,000 images, batch 64, 10 steps per run")
    p.add_argument("--budget-minutes", type=float, default=55.0,
                   help="wall-clock budget of the whole run; sets the step count (default: 55)")
    p.add_argument("--steps", type=int, default=None, help="steps per masked run (default: from the budget)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step, every run (default: 128; quick 64)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--compute-rule", choices=("equal-masking", "equal-flops"), default="equal-masking",
                   help="equal-masking: all runs masked alike, same steps; equal-flops: clip / supervised "
                        "unmasked with proportionally fewer steps")
    p.add_argument("--model", default=None, help="model config name (default: the base configs', vlp-tiny-vit)")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--seed", type=int, default=0, help="data split seed")
    args = p.parse_args(argv)
    t_start = time.time()

    cache = Path(args.cache_dir).resolve()
    name = "quality-quick" if args.quick else "quality"
    # the full-size shards live where configs/cifar10-mixed.yaml and configs/bench/quality-*.yaml point
    shards = cache / name / "shards"
    info = prepare(cache / "cache", shards, n_test=1000 if args.quick else 5000,
                   limit_per_class=600 if args.quick else None, seed=args.seed)
    if info is None:
        print(f"bench_quality: {DATA_TARBALL} not found; skipping (nothing to benchmark).")
        return 0
    if args.prepare_only:
        print(json.dumps(info["counts"]))
        if not args.quick:
            print("shards ready; train with:  python -m vlp.train --config configs/cifar10-mixed.yaml")
        return 0

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        p.error(f"--runs: unknown {bad}; choose from {RUNS}")
    batch = args.batch_size or (64 if args.quick else 128)
    r = args.mask_ratio
    from vlp.models.factory import resolve_model_config
    import yaml

    model_name = args.model or yaml.safe_load((REPO / "configs/bench/quality-mixed.yaml").read_text())["model"]["name"]
    vcfg = resolve_model_config(model_name)["vision_cfg"]
    n_patches = (vcfg["image_size"] // vcfg["patch_size"]) ** 2
    keep = max(1, int(round(n_patches * (1 - r))))
    token_ratio = (1 + keep) / (1 + n_patches)  # masked / unmasked image-tower tokens (FLOPs ~ linear in tokens)
    runs_dir = cache / name / "runs"
    log_every = 2 if args.quick else 10

    def plan(run: str) -> tuple[float, float]:
        """(mask ratio, steps multiplier) of a run under the compute rule."""
        if args.compute_rule == "equal-flops" and run in ("clip", "supervised"):
            return 0.0, token_ratio
        return r, 1.0

    # ---- step count from the budget: calibrate every run briefly, then fill the budget
    calib = None
    if args.steps:
        steps = args.steps
    elif args.quick:
        steps = 10
    else:
        calib_steps, skip = 12, 4
        calib = {"runs": {}}
        for run in runs:
            ratio, _ = plan(run)
            tree = run_config(run, shards, runs_dir / f"calibration-{run}", calib_steps, batch, ratio, args.model, 2, 2)
            res = launch(tree, runs_dir / f"calibration-{run}")
            sps = seconds_per_step(res["metrics"], batch, skip)
            calib["runs"][run] = {"seconds_per_step": round(sps, 3),
                                  "startup_s": round(max(10.0, res["wall_s"] - calib_steps * sps), 1)}
            log(f"calibration {run}: {sps:.2f} s/step (batch {batch}, mask ratio {ratio})")
            shutil.rmtree(runs_dir / f"calibration-{run}", ignore_errors=True)
        c = calib["runs"]
        n_eval = info["counts"]["labeled"] + info["counts"]["test"]
        # an unmasked forward of B images costs about half a masked mixed/MAE training step
        sps_ref = max(v["seconds_per_step"] for v in c.values())
        eval_s = 0.6 * sps_ref * n_eval / batch + 20.0
        elapsed = time.time() - t_start
        train_s = args.budget_minutes * 60 - elapsed - sum(v["startup_s"] + eval_s for v in c.values())
        per_step = sum(c[run]["seconds_per_step"] * plan(run)[1] for run in runs)  # one masked step of every run
        steps = int(train_s / (per_step * 1.15))
        calib.update({"eval_s_estimate": round(eval_s, 1), "train_s_available": round(train_s, 1),
                      "safety_factor": 1.15})
        log(f"calibration: eval ~{eval_s:.0f} s/run, {train_s:.0f} s left for training -> {steps} steps per "
            f"(masked) run")
        if steps < 20:
            print(f"bench_quality: the budget of {args.budget_minutes} min leaves only {steps} steps per run "
                  f"(the CPU is busy?); raise --budget-minutes or pass --steps.", file=sys.stderr)
            return 1
        deadline = t_start + args.budget_minutes * 60
        expected = {run: c[run]["startup_s"] + c[run]["seconds_per_step"] * max(1, round(steps * plan(run)[1]))
                    for run in runs}
    results: dict = {}
    for run in runs:
        ratio, factor = plan(run)
        run_steps = max(1, round(steps * factor))
        # linear warm-up: 10% of the steps, at least 30 (CLIP from scratch at a high lr collapses to a constant
        # embedding with a few-step warm-up), at most half the run
        warmup = max(1, min(max(30, run_steps // 10), run_steps // 2))
        tree = run_config(run, shards, runs_dir / run, run_steps, batch, ratio, args.model, warmup, log_every)
        limit = None
        if calib is not None:  # keep the whole bench inside the budget even if the CPU gets busier: the time
            left = deadline - time.time() - (len(runs) - len(results)) * calib["eval_s_estimate"]  # left is shared
            share = expected[run] / sum(expected[x] for x in runs if x not in results)         # by expected time
            limit = max(60.0, left * share)
        log(f"training {run}: {run_steps} steps, batch {tree['data']['batch']}, mask ratio {ratio}"
            + (f", time limit {limit:.0f} s" if limit else ""))
        train = launch(tree, runs_dir / run, time_limit=limit)
        sps = seconds_per_step(train["metrics"], batch, min(10, run_steps // 4))
        log(f"{run}: {train['steps_done']} steps in {train['wall_s']} s"
            + (f" ({batch / sps:.1f} samples/s)" if sps else ""))
        ev = evaluate_run(runs_dir / run, shards)
        log(f"{run}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()))
        last = {k: v for k, v in train["last"].items() if k.startswith("loss/")}
        results[run] = {"mask_ratio": ratio, "steps": run_steps, "batch": tree["data"]["batch"],
                        "image_tower_tokens": train["steps_done"] * batch * ((1 + keep) if ratio > 0 else (1 + n_patches)),
                        "zeroshot_meaningful": TEXT_TRAINED[run],
                        "train": {"steps_done": train["steps_done"], "cut_short": train["cut_short"],
                                  "wall_s": train["wall_s"], "samples_per_s": round(batch / sps, 2) if sps else None,
                                  "final_losses": last},
                        "eval": ev}
    print()
    print_table(results)
    total = time.time() - t_start
    doc = {
        "benchmark": "bench_quality", "quick": args.quick, "model": model_name, "batch_size": batch,
        "compute_rule": args.compute_rule, "mask_ratio": r, "steps_masked": steps, "token_ratio": round(token_ratio, 4),
        "split": info["counts"], "split_seed": args.seed, "caption_templates": CAPTION_TEMPLATES,
        "probe": {"train": "the 10% labeled split", "knn": {"k": 20, "T": 0.07},
                  "linear": "sklearn logistic regression, C=1, standardized features"},
        "calibration": calib, "total_minutes": round(total / 60, 2), "runs": results,
    }
    out = Path(args.out) if args.out else cache / name / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {out}  (total {total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
