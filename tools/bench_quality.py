#!/usr/bin/env python
"""Quality at equal training FLOPs on CIFAR-10: every ``configs/bench/quality-<run>.yaml`` (clip, mae, supervised,
mixed), with seeds, a per-run learning-rate sweep selected on a validation split, and ablations (vlp).

Data (``../shared/data/cifar10-train.tar.gz``, the 50,000 CIFAR-10 training JPEGs; skipped with a message when
absent). A fixed, class-stratified 5,000 images are held out as the test set; of the other 45,000 (per class,
stratified, fixed seed): 10% labeled (``cls``), 20% image-text (captions made from the label with one of
``CAPTION_TEMPLATES``, drawn at random), 70% unlabeled (labels dropped). All are written as WebDataset shards
under ``--cache-dir`` (default ``bench_out/``, git-ignored): ``quality/shards/{labeled,paired,unlabeled,test}``.
The validation split (``OUT/val``, 2,000 images, 200 per class, seeded) is a slice of the *unlabeled* training
pool written again with its labels: its images are in the training stream (without labels) of the runs that read
unlabeled rows, but it is disjoint from the test set and from the probes' labeled split, and the learning-rate
sweep selects on it only. The test set is never used for a choice.

Runs: a run is a config file ``configs/bench/quality-<run>.yaml`` (one ``python -m vlp.train`` subprocess per
training; the bench sets shard paths, output_dir, seed, lr, steps and warm-up, and scales ``data.batch`` to
``--batch-size`` keeping its proportions). The existing ones:

=============== ============================================= =====================================
run             data (rows per step)                          objectives
=============== ============================================= =====================================
clip            paired (B)                                    contrastive (CLIP), 50% masking
mae             labeled + paired + unlabeled as images (B)    MAE
supervised      labeled (B)                                   cross-entropy head, 50% masking
ssl             labeled + paired + unlabeled as images (B)    DINO, 2 global + 2 local crops
mixed-v1        paired + labeled + unlabeled (B in total)     CLIP/UniCL + MAE + CE, 75% masking
mixed           paired + labeled + unlabeled (B in total)     UniCL + teacher pseudo-labels + CE, 50%
=============== ============================================= =====================================

A run trains its text tower iff an active objective reads text (the contrastive one) and the text tower is not
locked; zero-shot numbers of the others are printed but marked meaningless (chance is 10%).

Equal FLOPs. The training FLOPs per step of each run config are counted in-process by ``vlp.flops``
(``torch.utils.flop_counter.FlopCounterMode`` over ``--flop-steps`` steps of forward + every teacher forward +
backward + the objectives' after-step hooks, on a synthetic batch of the run's exact composition, text and views).
The reference run (``--reference``, default mixed) trains ``S`` steps; every other run trains
``round(S * flops(reference) / flops(run))`` steps, so every run spends the same total training FLOPs. Warm-up is
10% of each run's steps, at least 30, at most half (CLIP from scratch collapses to a constant embedding with a
few-step warm-up). ``--equal-steps`` adds a table with every run at ``S`` steps (one seed).

Protocol, in this order:

1. Learning-rate sweep (``--lrs``, default 5e-4,1e-3,2e-3) for each run at the first seed, at
   ``--sweep-fraction`` of its steps (warm-up 10% of those; 1.0: full length, and then the sweep run with the
   chosen lr *is* the first seed's run and is not trained again). The lr with the best validation kNN top-1 (pooled) is chosen.
   A best lr at the edge of those swept is not known to be the best: one more lr, a grid step beyond it, is swept
   (``--sweep-extend``, default once per run). ``--lr RUN=LR,...`` fixes a run's lr and skips its sweep
   (``RUN=@OTHER``: the lr chosen for OTHER); a single ``--lrs`` value skips all sweeps.
2. Seeds (``--seeds``, default 0,1,2; the run config's ``seed``: model init, data order, masking): every run at
   its chosen lr and equal-FLOPs steps. The headline table gives mean ± std (sample std over the seeds).
3. Ablations (``--ablate RUN``): one config per active objective of RUN with that objective removed, and one with
   ``contrastive.labels_as_text: false`` where it is true; each re-measured for FLOPs and trained at equal FLOPs to
   the reference, first seed, RUN's chosen lr. The table gives each one's delta to RUN at the same seed.

Evaluation, with frozen features of each run's ``clip`` (``vlp.models.factory.load_clip``); probes are fit on the
10% labeled split (4,500 images; the labels a practitioner has):

* kNN top-1 (``vlp.eval.probe.knn_eval``, k=20, T=0.07) and linear-probe top-1 (``vlp.eval.probe.linear_probe``,
  logistic regression on standardized features), on two features: ``pooled`` (the ViT's pooled token after
  ``ln_post``, before the CLIP projection: the backbone feature, fair to MAE / supervised runs whose projection is
  never trained) and ``embed`` (the normalized CLIP image embedding, what ``encode_image`` returns). The headline
  is ``pooled``.
* zero-shot top-1 (``vlp.eval.zeroshot.build_classifier`` over the caption templates, and over the single prompt
  "a photo of a {c}."; argmax of the test embeddings times the classifier, reusing the extracted features).
* on the validation split: kNN (both features) and zero-shot (templates) only.

Budget (``--budget-minutes``, default 55, used when ``--steps`` is not given): a 12-step calibration of each run
measures its seconds per step on this machine now (an ablation's is the run's scaled by their FLOPs ratio), and
``S`` is the largest step count for which the whole plan (sweep, seeds, ablations, equal-steps, each at its
steps, plus start-up and evaluation) fits in what is left, with a 15% margin. The plan is printed with its
estimated minutes before any training. Should the CPU get busier later, a training that overruns its share of
what is left is stopped with SIGTERM (vlp checkpoints the step it reached) and marked ``cut short``.

Fixed recipe from the configs: vlp-tiny-vit, AdamW wd 0.05, cosine, gradient clip 1, 75% masked image pass,
batch 128 (``--batch-size``).

Output: ``OUT/results.json`` (``--out``; layout in :func:`results_doc`) and a report to paste into README
(headline, sweep, ablation and equal-steps tables; "RUN - best single-objective run" lines, single-objective runs
being configs with exactly one active objective). ``--report-only results.json`` reprints the report.

The curve: ``--steps 250,1000,2500`` runs the whole bench once per budget (``OUT/steps-S/``, one validation split
for all), prints each budget's tables, then the gap per budget (every multi-objective run minus the best
single-objective run, kNN and zero-shot) and draws ``OUT/gap_vs_budget.png`` (kNN and zero-shot of every run
against its training TFLOP; ``tools/quality_curve.py``). ``--report-only A.json B.json ...`` redraws them.
``--parallel N`` trains N jobs side by side (the cores split between them; a job waits only for the sweep that
chooses its lr), for a machine with cores to spare, such as a GPU node (``tools/gpu_quality.sh``).

Usage::

    python tools/bench_quality.py --ablate mixed            # full bench in --budget-minutes (55), table + JSON
    python tools/bench_quality.py --steps 1141 --seeds 0,1,2 --lrs 5e-4,1e-3,2e-3 --ablate mixed
    python tools/bench_quality.py --quick --runs clip,supervised,mixed   # smoke run: small shards, few steps
    python tools/bench_quality.py --ablate mixed --plan-only  # FLOPs, calibration and the plan, no training
    python tools/bench_quality.py --report-only bench_out/quality/results.json
    python tools/bench_quality.py --steps 250,1000,2500 --runs clip,mixed --parallel 4   # the curve
    python tools/bench_quality.py --prepare-only            # write the shards configs/cifar10-mixed.yaml reads
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import quality_curve as curve  # tools/: the curve across budgets (gap table, gap_vs_budget.png)

REPO = Path(__file__).resolve().parents[1]
DATA_TARBALL = Path(os.environ.get("VLP_CIFAR_TARBALL") or REPO.parent / "shared" / "data" / "cifar10-train.tar.gz")
CONFIGS = REPO / "configs" / "bench"
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
SELECT_KEY = "knn_top1/pooled"  # the sweep's selection metric, on the validation split
SAFETY = 1.15


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
    """Extract CIFAR-10 and write the four shard folders (skipped when already written with these settings).

    Existing shards are never replaced: shards of the same split written by another version of this tool (a
    later one adds fields this bench does not read) are used as they are; a different split is an error."""
    params = {"n_test": n_test, "limit_per_class": limit_per_class, "seed": seed, "templates": CAPTION_TEMPLATES,
              "version": 2}
    marker = shards / "split.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        same = lambda a, b: {k: v for k, v in a.items() if k != "version"} == \
            {k: v for k, v in b.items() if k != "version"}  # noqa: E731
        if same(info.get("params", {}), params):
            log(f"shards already written in {shards} ({info['counts']}, version {info['params'].get('version')})")
            return info
        raise SystemExit(f"{shards} holds shards of another split ({info.get('params')}); delete that folder "
                         f"or pass another --cache-dir")
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


def prepare_val(cache: Path, out: Path, split: dict, n_val: int) -> int | None:
    """The validation split: ``n_val`` images (class-stratified, seeded) of the unlabeled training pool, written
    with their labels to ``out`` (labeled WebDataset shards). Returns the count, or None without the images."""
    from vlp.shards import write_class_files, write_samples

    params = {"split": split["params"], "n_val": n_val, "version": 1}
    marker = out / "val.json"
    if marker.is_file() and json.loads(marker.read_text()).get("params") == params:
        return n_val
    train_root = ensure_cifar(cache)
    if train_root is None:
        return None
    p = split["params"]
    _, _, _, unlabeled = split_cifar(train_root, p["n_test"], p["limit_per_class"], p["seed"])
    if len(unlabeled) != split["counts"]["unlabeled"]:
        raise SystemExit(f"the recomputed unlabeled split ({len(unlabeled)}) does not match the shards' "
                         f"({split['counts']['unlabeled']})")
    rng = random.Random(p["seed"] + 2)
    per_class = n_val // len(CLASSNAMES)
    val = []
    for y in range(len(CLASSNAMES)):
        items = sorted(it for it in unlabeled if it[1] == y)
        val += rng.sample(items, per_class)
    rng.shuffle(val)
    shutil.rmtree(out, ignore_errors=True)
    samples = ({"__key__": f"{i:09d}", "jpg": Path(path).read_bytes(), "cls": str(y)} for i, (path, y) in enumerate(val))
    write_samples(samples, out, prefix="cifar10-val", maxcount=1000)
    ys = [y for _, y in val]
    write_class_files(out, CLASSNAMES, {c: ys.count(c) for c in range(len(CLASSNAMES))})
    marker.write_text(json.dumps({"params": params, "count": len(val)}, indent=1) + "\n")
    log(f"validation split written to {out}: {len(val)} images of the unlabeled pool")
    return len(val)


# ---------------------------------------------------------------------------------------------- runs


def available_runs() -> list[str]:
    return sorted(p.stem[len("quality-"):] for p in CONFIGS.glob("quality-*.yaml"))


def base_tree(run: str) -> dict:
    import yaml

    path = CONFIGS / f"quality-{run}.yaml"
    if not path.is_file():
        raise SystemExit(f"no config {path} (runs: {', '.join(available_runs())})")
    return yaml.safe_load(path.read_text())


def active_objectives(tree: dict) -> list[str]:
    """Objectives with a weight > 0, as the config parses them (a bare number is a weight)."""
    cfg = validated(tree)
    return [name for name, o in cfg.objectives.items() if o.weight > 0]


def text_trained(tree: dict) -> bool:
    """The run trains its text tower: an active objective reads text (contrastive) and the tower is not locked."""
    from vlp.objectives import OBJECTIVES

    cfg = validated(tree)
    return any(OBJECTIVES[n].needs_text for n in active_objectives(tree)) and not cfg.model.text.lock


def validated(tree: dict):
    from vlp.config import config_from_dict

    return config_from_dict(tree, check_files=False)


def ablation_trees(run: str, tree: dict) -> dict[str, tuple[dict, str]]:
    """name -> (config, what changed): each active objective removed; labels-as-text off where it is on."""
    from vlp.config import ConfigError

    out = {}
    active = active_objectives(tree)
    if len(active) > 1:
        for name in active:
            t = copy.deepcopy(tree)
            del t["objectives"][name]
            out[f"{run}-no-{name}"] = (t, f"without {name}")
    c = tree["objectives"].get("contrastive")
    if isinstance(c, dict) and c.get("labels_as_text") and "contrastive" in active:
        t = copy.deepcopy(tree)
        t["objectives"]["contrastive"]["labels_as_text"] = False
        out[f"{run}-no-labels-as-text"] = (t, "contrastive.labels_as_text false")
    for name, (t, _) in list(out.items()):
        try:
            validated(t)
        except ConfigError as err:
            log(f"ablation {name} skipped: {err}")
            del out[name]
    return out


def adapt_tree(tree: dict, shards: Path, batch_total: int, mask_ratio: float | None, model: str | None,
               workers: int | None = None) -> dict:
    """A base config with this bench's shard paths, total batch (proportions kept), masking, model and workers."""
    tree = copy.deepcopy(tree)
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
    if mask_ratio is not None:
        tree["model"]["mask_ratio"] = mask_ratio
    if model:
        tree["model"]["name"] = model
    if workers is not None:
        tree["data"]["workers"] = workers
    return tree


def warmup_for(steps: int) -> int:
    """10% of the steps, at least 30, at most half the run."""
    return max(1, min(max(30, steps // 10), steps // 2))


def job_tree(tree: dict, out_dir: Path, steps: int, lr: float, seed: int, log_every: int) -> dict:
    tree = copy.deepcopy(tree)
    tree["output_dir"] = str(out_dir)
    tree["seed"] = seed
    tree["optim"]["lr"] = lr
    tree["optim"]["warmup_steps"] = warmup_for(steps)
    tree["train"]["steps"] = steps
    tree["train"]["log_every"] = max(1, min(log_every, steps))
    return tree


def launch(tree: dict, run_dir: Path, time_limit: float | None = None, env_extra: dict | None = None) -> dict:
    """Train one config in a ``python -m vlp.train`` subprocess (``env_extra``: e.g. its CPU threads when runs share
    the machine). A run past ``time_limit`` seconds gets SIGTERM: vlp checkpoints the current step and exits (the
    run is then marked ``cut_short``)."""
    import signal

    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "bench_config.yaml"
    cfg_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
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
    if proc.returncode != 0 and not (cut and proc.returncode == 128 + signal.SIGTERM):  # vlp.train: 128 + signal
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
    device = next(visual.parameters()).device
    pooled, embed, labels = [], [], []
    visual.proj = None
    try:
        with torch.no_grad():
            for images, y in loader:
                p = visual(images.to(device, input_dtype(clip))).float()
                pooled.append(p.cpu())
                embed.append(F.normalize(p @ proj.float() if proj is not None else p, dim=-1).cpu())
                labels.append(y)
    finally:
        visual.proj = proj
    return torch.cat(pooled), torch.cat(embed), torch.cat(labels)


def standardize(train, test):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def evaluate_run(run_dir: Path, shards: Path, val: Path | None = None, batch_size: int = 256) -> dict:
    """``{"test": {...}, "val": {...}}``: probes fit on the labeled split; see the module docstring."""
    import torch

    from vlp.models.factory import load_clip

    t0 = time.time()
    torch.manual_seed(0)
    clip, _, tokenizer, preprocess = load_clip(run_dir)
    out = evaluate_clip(clip, tokenizer, preprocess, shards, val, batch_size)
    out["eval_s"] = round(time.time() - t0, 1)
    return out


def evaluate_clip(clip, tokenizer, preprocess, shards: Path, val: Path | None = None, batch_size: int = 256) -> dict:
    """:func:`evaluate_run` on a CLIP model in memory (``tools/bench_ssl.py``'s random-init row)."""
    import torch
    from threadpoolctl import threadpool_limits

    from vlp.eval.data import labeled_loader
    from vlp.eval.probe import knn_eval, linear_probe
    from vlp.eval.zeroshot import build_classifier

    if torch.cuda.is_available():  # features on the GPU; the probes run on the CPU copies
        clip = clip.cuda()
    feats = {split: extract(clip, labeled_loader(str(folder), preprocess, batch_size, 1))
             for split, folder in (("train", shards / "labeled"), ("test", shards / "test"), ("val", val)) if folder}
    tr_pooled, tr_embed, tr_y = feats["train"]
    device = next(clip.parameters()).device
    classifiers = {name: build_classifier(clip, tokenizer, CLASSNAMES, templates, device=device).cpu()  # [D, C]
                   for name, templates in (("templates", CAPTION_TEMPLATES), ("photo", SIMPLE_TEMPLATE))}
    out: dict = {}
    for split in ("test", "val"):
        if split not in feats:
            continue
        te_pooled, te_embed, te_y = feats[split]
        res: dict = {"n_probe_train": int(len(tr_y)), "n": int(len(te_y))}
        for name, tr, te in (("pooled", tr_pooled, te_pooled), ("embed", tr_embed, te_embed)):
            res[f"knn_top1/{name}"] = knn_eval(tr, tr_y, te, te_y, k=20, T=0.07, num_classes=len(CLASSNAMES))["top1"]
            if split == "test":
                a, b = standardize(tr, te)
                # one BLAS/OpenMP thread: on a busy 2-core machine sklearn's lbfgs spins ~100x slower with two
                with threadpool_limits(1):
                    res[f"linear_top1/{name}"] = linear_probe(a, tr_y, b, te_y, C=1.0, max_iter=2000)["top1"]
        for name, weights in classifiers.items():
            if split == "test" or name == "templates":
                res[f"zeroshot_top1/{name}"] = float(((te_embed @ weights).argmax(dim=1) == te_y).float().mean())
        out[split] = res
    return out


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class Job:
    """One training + evaluation. ``lr`` None: the lr chosen for ``lr_of`` (known after the sweep)."""

    name: str
    config: str
    seed: int
    lr: float | None
    steps: int
    phases: list[str] = field(default_factory=list)
    lr_of: str = ""

    def key(self, lr: float | None = None):
        """Jobs with equal keys train the same thing: the later one reuses the earlier one's result."""
        return self.config, self.seed, self.lr if lr is None else lr, self.steps


def equal_flops_steps(steps: int, ref_flops: float, flops: float) -> int:
    return max(1, round(steps * ref_flops / flops))


def plan_jobs(steps: int, runs: list[str], reference: str, configs: dict, sweep: dict[str, list[float]],
              chosen: dict[str, float], seeds: list[int], fraction: float, ablations: list[str],
              equal_steps: bool, one_seed: tuple[str, ...] = (), follow: dict[str, str] | None = None) -> list[Job]:
    """Every job of the bench in execution order: sweep, seeds, ablations, equal-steps (see the docstring).
    ``follow``: run -> the run whose chosen lr it trains at (``--lr RUN=@OTHER``)."""
    follow = follow or {}
    ref = configs[reference]["gflops_per_step"]
    eq = {c: equal_flops_steps(steps, ref, v["gflops_per_step"]) for c, v in configs.items()}
    s0 = seeds[0]
    jobs = []
    for run, lrs in sweep.items():
        n = max(1, round(eq[run] * fraction))
        jobs += [Job(f"sweep-{run}-lr{lr:g}", run, s0, lr, n, ["sweep"]) for lr in lrs]
    for run in runs:
        lr_of = follow.get(run, run)
        jobs += [Job(f"{run}-seed{seed}", run, seed, chosen.get(lr_of), eq[run], ["seed"], lr_of)
                 for seed in (seeds[:1] if run in one_seed else seeds)]
    for name in ablations:
        run = configs[name]["run"]
        jobs.append(Job(f"{name}-seed{s0}", name, s0, chosen.get(run), eq[name], ["ablation"], run))
    if equal_steps:
        jobs += [Job(f"{run}-steps{steps}", run, s0, chosen.get(run), steps, ["equal-steps"], run) for run in runs]
    return jobs


def best_swept(swept: list[dict]) -> dict:
    """The sweep run with the best validation kNN (pooled)."""
    return max(swept, key=lambda j: j["eval"]["val"][SELECT_KEY])


def beyond_edge(swept: list[dict]) -> float | None:
    """The next lr to sweep when the best validation lr is the smallest or largest swept: one step of the grid's
    ratio beyond it (3 significant digits). None when the best lies inside the swept range."""
    lrs = sorted({j["lr"] for j in swept})
    if len(lrs) < 2:
        return None
    best = best_swept(swept)["lr"]
    if best == lrs[0]:
        return float(f"{best * lrs[0] / lrs[1]:.3g}")
    if best == lrs[-1]:
        return float(f"{best * lrs[-1] / lrs[-2]:.3g}")
    return None


def reused(jobs: list[Job], sweep: dict) -> list[bool]:
    """Whether each job will reuse an earlier job's run (same config, seed, lr and steps; a job whose lr comes from
    a sweep of the same length reuses the sweep run at the chosen lr)."""
    seen, out = set(), []
    for j in jobs:
        own = j.key() if j.lr is not None else j.key(("chosen", j.lr_of))
        keys = {own} | ({j.key(lr) for lr in sweep.get(j.lr_of, [])} if j.lr is None else set())
        out.append(bool(keys & seen))
        seen.add(own)
    return out


def job_costs(jobs: list[Job], sweep: dict, cost) -> list[float]:
    """Expected seconds of each job, ``cost(config, steps)``; 0 for one that reuses an earlier run."""
    return [0.0 if r else cost(j.config, j.steps) for j, r in zip(jobs, reused(jobs, sweep))]


def print_plan(jobs: list[Job], reuse: list[bool], costs: list[float] | None, configs: dict) -> None:
    print(f"{'job':<34} {'config':<24} {'seed':>4} {'lr':>8} {'steps':>6} {'TFLOP':>8} {'est. min':>8}")
    for i, j in enumerate(jobs):
        lr = f"{j.lr:g}" if j.lr is not None else "chosen"
        tf = configs[j.config]["gflops_per_step"] * j.steps / 1e3
        est = "reused" if reuse[i] else (f"{costs[i] / 60:.1f}" if costs else "")
        print(f"{j.name:<34} {j.config:<24} {j.seed:>4} {lr:>8} {j.steps:>6} {tf:>8.2f} {est:>8}")
    n = reuse.count(False)
    print(f"{n} trainings + evaluations" + (f", estimated {sum(costs) / 60:.1f} min" if costs else ""), flush=True)


# ---------------------------------------------------------------------------------------------- report

COLUMNS = [("kNN pooled", "knn_top1/pooled"), ("kNN embed", "knn_top1/embed"),
           ("linear pooled", "linear_top1/pooled"), ("linear embed", "linear_top1/embed"),
           ("zero-shot tmpl", "zeroshot_top1/templates"), ("zero-shot photo", "zeroshot_top1/photo")]


def jobs_in(doc: dict, phase: str, config: str | None = None) -> list[dict]:
    return [j for j in doc["jobs"] if phase in j["phases"] and (config is None or j["config"] == config)]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float], mark: str = " ", width: int = 15) -> str:
    m, s = mean_std([100 * v for v in values])
    text = f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
    return f"{text:>{width - 1}}{mark}"


def name_width(doc: dict) -> int:
    """The run-name column's width: the longest run name, at least 11."""
    return max([11] + [len(r) for r in doc["runs"]])


def results_table(doc: dict, phase: str, title: str) -> list[str]:
    """One row per run: FLOPs, steps, lr, then every test metric (mean ± std over the phase's seeds)."""
    w = name_width(doc)
    head = f"{'run':<{w}} {'GFLOP/step':>10} {'steps':>6} {'TFLOP':>7} {'lr':>7} {'seeds':>5}  " + \
        "  ".join(f"{c:>15}" for c, _ in COLUMNS)
    lines = [title, head, "-" * len(head)]
    for run in doc["runs"]:
        jobs = jobs_in(doc, phase, run)
        if not jobs:
            continue
        c = doc["configs"][run]
        cells = [cell([j["eval"]["test"][key] for j in jobs],
                      "*" if key.startswith("zeroshot") and not c["text_trained"] else " ") for _, key in COLUMNS]
        steps = sorted({j["steps"] for j in jobs})
        cut = " (cut short)" if any(j["train"]["cut_short"] for j in jobs) else ""
        lines.append(f"{run:<{w}} {c['gflops_per_step']:>10.2f} {'/'.join(map(str, steps)):>6} "
                     f"{c['gflops_per_step'] * steps[0] / 1e3:>7.1f} {jobs[0]['lr']:>7g} {len(jobs):>5}  "
                     + "  ".join(cells) + cut)
    return lines


def sweep_table(doc: dict) -> list[str]:
    jobs = jobs_in(doc, "sweep")
    if not jobs:
        return []
    lrs = sorted({j["lr"] for j in jobs})
    w = name_width(doc)
    head = f"{'run':<{w}} {'steps':>6}  " + "  ".join(f"{f'lr {lr:g}':>10}" for lr in lrs) + "   chosen"
    lines = [f"LR sweep: validation kNN top-1 % (pooled; {doc['val']['n']} images of the unlabeled pool, "
             f"never the test set), seed {doc['seeds'][0]}", head, "-" * len(head)]
    for run in doc["runs"]:
        mine = {j["lr"]: j for j in jobs if j["config"] == run}
        if not mine:
            continue
        best = (doc["lr"].get(run) or {}).get("lr")  # None: a partial bench, not chosen yet
        cells = [f"{100 * mine[lr]['eval']['val'][SELECT_KEY]:>9.2f}{'*' if lr == best else ' '}" if lr in mine
                 else f"{'-':>10}" for lr in lrs]
        steps = next(iter(mine.values()))["steps"]
        lines.append(f"{run:<{w}} {steps:>6}  " + "  ".join(cells) + (f"   {best:g}" if best else "   -"))
    return lines


def ablation_table(doc: dict) -> list[str]:
    jobs = jobs_in(doc, "ablation")
    if not jobs:
        return []
    run = doc["configs"][jobs[0]["config"]]["run"]
    seed = jobs[0]["seed"]
    full = next((j for j in jobs_in(doc, "seed", run) if j["seed"] == seed), None)
    if full is None:
        return [f"ablations of {run}: no full run at seed {seed}"]
    head = f"{'config':<26} {'change':<34} {'GFLOP/step':>10} {'steps':>6} {'kNN pooled':>10} {'delta':>7} " \
           f"{'zero-shot':>10} {'delta':>7}"
    lines = [f"Ablations of {run} (seed {seed}, lr {full['lr']:g}, equal FLOPs to {doc['reference']}; test top-1 %, "
             f"kNN pooled and zero-shot templates)", head, "-" * len(head)]
    f = full["eval"]["test"]
    zs = "zeroshot_top1/templates"
    lines.append(f"{run:<26} {'(full)':<34} {doc['configs'][run]['gflops_per_step']:>10.2f} {full['steps']:>6} "
                 f"{100 * f[SELECT_KEY]:>10.2f} {'':>7} {100 * f[zs]:>10.2f}")
    for j in jobs:
        c, e = doc["configs"][j["config"]], j["eval"]["test"]
        meaningful = c["text_trained"] and doc["configs"][run]["text_trained"]
        dz = f"{100 * (e[zs] - f[zs]):>+7.2f}" if meaningful else f"{'n/a':>7}"
        cut = " (cut short)" if j["train"]["cut_short"] else ""
        lines.append(f"{j['config']:<26} {c['change']:<34} {c['gflops_per_step']:>10.2f} {j['steps']:>6} "
                     f"{100 * e[SELECT_KEY]:>10.2f} {100 * (e[SELECT_KEY] - f[SELECT_KEY]):>+7.2f} "
                     f"{100 * e[zs]:>9.2f}{' ' if c['text_trained'] else '*'} {dz}{cut}")
    return lines


def versus_single_lines(doc: dict) -> list[str]:
    """For every multi-objective run: its mean minus the best single-objective run's mean on kNN / zero-shot."""
    means = {r: {k: statistics.fmean(j["eval"]["test"][k] for j in jobs_in(doc, "seed", r)) for _, k in COLUMNS}
             for r in doc["runs"] if jobs_in(doc, "seed", r)}
    singles = [r for r in means if len(doc["configs"][r]["objectives"]) == 1]
    lines = []
    for run in means:
        if len(doc["configs"][run]["objectives"]) < 2:
            continue
        for label, key, text_only in (("kNN", SELECT_KEY, False), ("zero-shot", "zeroshot_top1/templates", True)):
            if text_only and not doc["configs"][run]["text_trained"]:
                continue
            pool = [r for r in singles if not text_only or doc["configs"][r]["text_trained"]]
            if pool:
                best = max(pool, key=lambda r: means[r][key])
                lines.append(f"{run} − best single-objective run ({best}) on {label}: "
                             f"{100 * (means[run][key] - means[best][key]):+.1f} points")
    return lines


def report(doc: dict) -> str:
    n = len(doc["seeds"])
    parts = [results_table(doc, "seed", f"Equal training FLOPs (reference {doc['reference']} at "
                                        f"{doc['reference_steps']} steps, batch {doc['batch_size']}); test top-1 %, "
                                        f"mean ± sample std over {n} seed{'s' if n > 1 else ''} ({doc['seeds']})")]
    parts[0] += ["* text tower never trained: zero-shot is meaningless (chance 10%). GFLOP/step: vlp.flops "
                 "(FlopCounterMode: forward + teacher + backward + hooks); TFLOP: total training FLOPs."]
    parts[0] += versus_single_lines(doc)
    for extra in (sweep_table(doc), ablation_table(doc),
                  results_table(doc, "equal-steps", f"Equal steps ({doc['reference_steps']} each, seed "
                                                    f"{doc['seeds'][0]}); test top-1 %")):
        if len(extra) > 3 or len(extra) == 1:  # a table with rows, or a one-line note
            parts.append(extra)
    taken = [j for j in doc["jobs"] if j.get("reused_from")]
    if taken:
        sources = sorted({j["reused_from"] for j in taken})
        parts.append([f"{len(taken)} of {len(doc['jobs'])} trainings taken over (--reuse) from {'; '.join(sources)}: "
                      + ", ".join(j["name"] for j in taken)])
    return "\n\n".join("\n".join(p) for p in parts)


# ---------------------------------------------------------------------------------------------- main


def parse_list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


_FLOPS: dict[str, tuple] = {}  # counted FLOPs by (config tree, steps)


def measure_flops(configs: dict, trees: dict, steps: int) -> None:
    """``gflops_per_step`` and ``forward_gflops`` of every config (in-process, vlp.flops)."""
    from vlp.flops import training_flops_per_step

    for name, c in configs.items():
        t0 = time.time()
        key = json.dumps([trees[name], steps], sort_keys=True, default=str)
        if key not in _FLOPS:  # the same config at another budget (--steps A,B,...) is counted once
            _FLOPS[key] = training_flops_per_step(validated(trees[name]), CLASSNAMES, steps=steps, breakdown=True)
        total, split = _FLOPS[key]
        c["gflops_per_step"] = round(total / 1e9, 4)
        c["forward_gflops"] = {k: round(v / 1e9, 4) for k, v in split.items()}
        log(f"FLOPs {name}: {total / 1e9:.2f} GFLOP/step (forward: "
            + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in split.items()) + f"; {time.time() - t0:.0f} s to count)")


def calibrate(runs: list[str], trees: dict, runs_dir: Path, batch: int) -> dict:
    """Seconds per step and start-up seconds of each run, from a 12-step training (lr and seed of the config)."""
    calib_steps, skip = 12, 4
    out = {}
    for run in runs:
        tree = job_tree(trees[run], runs_dir / f"calibration-{run}", calib_steps, trees[run]["optim"]["lr"], 0, 2)
        tree["optim"]["warmup_steps"] = 2
        res = launch(tree, runs_dir / f"calibration-{run}")
        sps = seconds_per_step(res["metrics"], batch, skip)
        out[run] = {"seconds_per_step": round(sps, 3), "startup_s": round(max(10.0, res["wall_s"] - calib_steps * sps), 1)}
        log(f"calibration {run}: {sps:.2f} s/step, start-up {out[run]['startup_s']:.0f} s")
        shutil.rmtree(runs_dir / f"calibration-{run}", ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"),
                   help="where CIFAR-10 is extracted and the shards are (written when missing; default bench_out/)")
    p.add_argument("--out-dir", default=None,
                   help="runs, validation shards and results (default: CACHE/quality[-quick])")
    p.add_argument("--out", default=None, help="results JSON (default: OUT/results.json)")
    p.add_argument("--report-only", metavar="JSON", nargs="+", default=None,
                   help="print the report of a saved results JSON; of several (one per budget): the curve")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="gap_vs_budget.png's path (default: OUT/gap_vs_budget.png with several --steps budgets)")
    p.add_argument("--prepare-only", action="store_true", help="extract CIFAR-10, write the shards, stop")
    p.add_argument("--plan-only", action="store_true", help="measure FLOPs (and calibrate), print the plan, stop")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 6,000 images, batch 64, 10 reference steps, 1 seed, the configs' lr, 2 FLOP steps")
    p.add_argument("--runs", default=None, help=f"comma-separated configs/bench/quality-RUN.yaml (default: all: "
                                                f"{','.join(available_runs())})")
    p.add_argument("--reference", default="mixed", help="run whose step count is --steps; others match its FLOPs")
    p.add_argument("--budget-minutes", type=float, default=55.0,
                   help="wall-clock budget of the whole bench; sets the reference's steps (default: 55)")
    p.add_argument("--steps", default=None,
                   help="reference steps (default: from the budget); several, comma-separated (250,1000,2500): one "
                        "bench per budget in OUT/steps-S/, then the gap per budget and gap_vs_budget.png")
    p.add_argument("--parallel", type=int, default=1,
                   help="trainings side by side on this machine (default 1): the CPU cores are split between them "
                        "(OMP_NUM_THREADS); evaluations run one at a time")
    p.add_argument("--workers", type=int, default=None,
                   help="data workers of every training (default: the configs' data.workers)")
    p.add_argument("--seeds", default=None, help="comma-separated run seeds (default: 0,1,2; quick: 0)")
    p.add_argument("--lrs", default=None, help="learning rates swept per run (default: 5e-4,1e-3,2e-3; quick: the "
                                               "configs' lr); one value: no sweep")
    p.add_argument("--one-seed", default="", help="comma-separated runs trained at the first seed only (references "
                   "outside the headline comparison)")
    p.add_argument("--lr", default="", help="RUN=LR,...: fixed lr for these runs (no sweep); RUN=@OTHER: the lr "
                                            "chosen for OTHER")
    p.add_argument("--sweep-extend", type=int, default=1, help="a best lr at the edge of the swept ones is swept "
                   "one grid step further, at most this many times per run (default: 1; 0: never)")
    p.add_argument("--sweep-fraction", type=float, default=1.0, help="sweep runs' length as a fraction of a run's "
                                                                     "steps (default: 1, full length)")
    p.add_argument("--ablate", default=None, metavar="RUN", help="ablate every objective of RUN (default: none)")
    p.add_argument("--equal-steps", action="store_true", help="also train every run at the reference's steps")
    p.add_argument("--flop-steps", type=int, default=None, help="steps FLOPs are averaged over (default: 10; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step, every run (default: 128; quick 64)")
    p.add_argument("--mask-ratio", type=float, default=None, help="override every config's model.mask_ratio")
    p.add_argument("--model", default=None, help="model config name (default: the configs', vlp-tiny-vit)")
    p.add_argument("--split-seed", type=int, default=0, help="data split seed")
    p.add_argument("--reuse", metavar="JSON", action="append", default=[],
                   help="an earlier results JSON of this bench (repeatable): each of its uncut trainings with the same "
                        "config (objectives, batch, masking, model, FLOPs), seed, lr and steps is taken over instead "
                        "of trained again; it resumes a killed bench or extends one (a sweep, more seeds)")
    args = p.parse_args(argv)
    bad = [item for item in parse_list(args.lr) if "=" not in item]
    if bad:
        p.error(f"--lr {bad[0]}: expected RUN=LR or RUN=@OTHER")
    try:
        budgets = parse_list(args.steps, int) if args.steps else []
    except ValueError:
        p.error(f"--steps {args.steps}: expected reference steps, or several comma-separated (250,1000,2500)")
    if any(b < 1 for b in budgets) or len(set(budgets)) != len(budgets):
        p.error(f"--steps {args.steps}: each budget a positive step count, once")
    if args.parallel < 1:
        p.error("--parallel: at least 1")
    if args.report_only:
        docs = [json.loads(Path(path).read_text()) for path in args.report_only]
        print("\n\n".join(report(d) for d in docs) if len(docs) == 1 else curve.curve_report(docs, report))
        if args.plot:
            curve.plot_gap(docs, Path(args.plot))
            print(f"wrote {args.plot}")
        return 0
    if len(budgets) <= 1:
        args.steps = budgets[0] if budgets else None
        return bench(p, args, argv)
    # several budgets: one bench each (its own runs, results JSON and tables), then the curve across them
    cache = Path(args.cache_dir).resolve()
    base = Path(args.out_dir).resolve() if args.out_dir else cache / ("quality-quick" if args.quick else "quality")
    paths = []
    for steps in budgets:
        one = copy.copy(args)
        one.steps, one.out_dir, one.out, one.val_dir = steps, str(base / f"steps-{steps}"), None, str(base / "val")
        log(f"budget {steps} reference steps -> {one.out_dir}")
        code = bench(p, one, argv)
        if code:
            return code
        paths.append(Path(one.out_dir) / "results.json")
        if not paths[-1].is_file():  # skipped (no data)
            return 0
    docs = [json.loads(path.read_text()) for path in paths]
    print()
    print(curve.curve_report(docs, report))
    png = Path(args.plot) if args.plot else base / "gap_vs_budget.png"
    curve.plot_gap(docs, png)
    (base / "curve.json").write_text(json.dumps({"budgets": budgets, "results": [str(x) for x in paths],
                                                 "gaps": curve.gaps(docs)}, indent=1) + "\n")
    print(f"\nwrote {png} and {base / 'curve.json'}")
    return 0


def run_threads(parallel: int) -> dict:
    """The environment of each training when ``parallel`` run side by side: the machine's cores split between them
    (torch's default, one thread per core in every process, makes N processes fight over the same cores)."""
    if parallel == 1:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def bench(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    """One budget (``args.steps`` reference steps, or from ``--budget-minutes``): plan, train, evaluate, report."""
    t_start = time.time()

    cache = Path(args.cache_dir).resolve()
    name = "quality-quick" if args.quick else "quality"
    # the full-size shards live where configs/cifar10-mixed.yaml and configs/bench/quality-*.yaml point
    shards = cache / name / "shards"
    info = prepare(cache / "cache", shards, n_test=1000 if args.quick else 5000,
                   limit_per_class=600 if args.quick else None, seed=args.split_seed)
    if info is None:
        print(f"bench_quality: {DATA_TARBALL} not found; skipping (nothing to benchmark).")
        return 0
    if args.prepare_only:
        print(json.dumps(info["counts"]))
        if not args.quick:
            print("shards ready; train with:  python -m vlp.train --config configs/cifar10-mixed.yaml")
        return 0
    out_dir = Path(args.out_dir).resolve() if args.out_dir else cache / name
    val_dir = Path(getattr(args, "val_dir", None) or out_dir / "val")
    n_val = 500 if args.quick else 2000
    if prepare_val(cache / "cache", val_dir, info, n_val) is None:
        print(f"bench_quality: {DATA_TARBALL} not found (needed for the validation split); skipping.")
        return 0

    # ---- configs: runs, reference, ablations; FLOPs of each
    runs = parse_list(args.runs) if args.runs else available_runs()
    known = available_runs()
    for r in runs + [args.reference] + ([args.ablate] if args.ablate else []):
        if r not in known:
            p.error(f"unknown run {r!r}: no configs/bench/quality-{r}.yaml (runs: {', '.join(known)})")
    if args.ablate and args.ablate not in runs:
        p.error(f"--ablate {args.ablate}: not among --runs")
    batch = args.batch_size or (64 if args.quick else 128)
    seeds = parse_list(args.seeds, int) if args.seeds else ([0] if args.quick else [0, 1, 2])
    adapt = lambda t: adapt_tree(t, shards, batch, args.mask_ratio, args.model, args.workers)  # noqa: E731
    trees = {r: adapt(base_tree(r)) for r in dict.fromkeys(runs + [args.reference])}
    configs = {r: {"run": r, "change": None} for r in trees}
    if args.ablate:
        for abl, (tree, change) in ablation_trees(args.ablate, base_tree(args.ablate)).items():
            trees[abl] = adapt(tree)
            configs[abl] = {"run": args.ablate, "change": change}
    for c, v in configs.items():
        cfg = validated(trees[c])
        v.update(objectives=active_objectives(trees[c]), text_trained=text_trained(trees[c]),
                 batch=cfg.data.batch.model_dump(), mask_ratio=cfg.model.mask_ratio, model=cfg.model.name)
    measure_flops(configs, trees, args.flop_steps or (2 if args.quick else 10))

    # ---- learning rates: given, single, or swept
    given_text = dict(item.split("=", 1) for item in parse_list(args.lr))
    follow = {k: v[1:] for k, v in given_text.items() if v.startswith("@")}
    given = {k: float(v) for k, v in given_text.items() if k not in follow}
    for r, other in follow.items():
        if other not in runs or other in follow:
            p.error(f"--lr {r}=@{other}: {other} is not a run of --runs that has its own lr")
    lrs = parse_list(args.lrs, float) if args.lrs else None
    lr_info: dict = {}
    for r in runs:
        if r in follow:
            lr_info[r] = {"lr": None, "how": f"{follow[r]}'s"}
        elif r in given:
            lr_info[r] = {"lr": given[r], "how": "given"}
        elif lrs is None and args.quick:
            lr_info[r] = {"lr": float(trees[r]["optim"]["lr"]), "how": "config"}
        elif lrs is not None and len(lrs) == 1:
            lr_info[r] = {"lr": lrs[0], "how": "given"}
    lrs = lrs or [5e-4, 1e-3, 2e-3]
    sweep = {r: lrs for r in runs if r not in lr_info}
    chosen = {r: v["lr"] for r, v in lr_info.items() if v["lr"] is not None}
    ablations = [c for c in configs if configs[c]["change"]]
    make_plan = lambda s: plan_jobs(s, runs, args.reference, configs, sweep, chosen, seeds,  # noqa: E731
                                    args.sweep_fraction, ablations, args.equal_steps,
                                    tuple(parse_list(args.one_seed)), follow)

    # ---- reference steps: given, quick, or the largest that fits the budget
    runs_dir = out_dir / "runs"
    log_every = 2 if args.quick else 10
    calib, deadline = None, None
    n_eval = info["counts"]["labeled"] + info["counts"]["test"] + n_val
    cost = None
    if args.steps or args.quick:
        steps = args.steps or 10
    else:
        calib = {"runs": calibrate(runs, trees, runs_dir, batch)}
        c = calib["runs"]

        def sps(cfg_name):  # an ablation: its run's seconds per step scaled by their FLOPs
            run = configs[cfg_name]["run"]
            return c[run]["seconds_per_step"] * configs[cfg_name]["gflops_per_step"] / configs[run]["gflops_per_step"]

        # an unmasked forward of B images costs about half a masked mixed/MAE training step
        eval_s = 0.6 * max(v["seconds_per_step"] for v in c.values()) * n_eval / batch + 20.0
        cost = lambda cfg_name, s: c[configs[cfg_name]["run"]]["startup_s"] + sps(cfg_name) * s + eval_s  # noqa: E731
        available = args.budget_minutes * 60 - (time.time() - t_start)
        fits = lambda s: SAFETY * sum(job_costs(make_plan(s), sweep, cost)) <= available  # noqa: E731
        steps, hi = 0, 1
        while fits(hi) and hi < 10 ** 6:
            steps, hi = hi, hi * 2
        while hi - steps > 1:  # largest fitting step count (the plan's cost grows with it)
            mid = (steps + hi) // 2
            steps, hi = (mid, hi) if fits(mid) else (steps, mid)
        calib.update({"eval_s_estimate": round(eval_s, 1), "seconds_available": round(available, 1),
                      "safety_factor": SAFETY})
        if steps < 20:
            print(f"bench_quality: the budget of {args.budget_minutes} min leaves only {steps} reference steps "
                  f"(the CPU is busy?); raise --budget-minutes, pass --steps, or plan less.", file=sys.stderr)
            return 1
        deadline = t_start + args.budget_minutes * 60
    jobs = make_plan(steps)
    reuse = reused(jobs, sweep)
    costs = job_costs(jobs, sweep, cost) if calib else None
    for cname, v in configs.items():
        v["equal_flops_steps"] = equal_flops_steps(steps, configs[args.reference]["gflops_per_step"],
                                                   v["gflops_per_step"])
    doc = results_doc(args, argv, info, n_val, runs, seeds, lrs, steps, batch, configs, lr_info, calib)
    prior = reusable_records([Path(r) for r in args.reuse], doc)
    reuse = [r or (j.lr is not None and j.key() in prior) for j, r in zip(jobs, reuse)]
    print()
    print_plan(jobs, reuse, costs, configs)
    if prior:
        print(f"--reuse: {len(prior)} earlier trainings can be taken over (a job at a swept lr once it is chosen)")
    print()
    if args.plan_only:
        return 0

    doc["plan"] = {"estimated_minutes": round(sum(costs) / 60, 1) if costs else None,
                   "jobs": [asdict(j) for j in jobs], "parallel": args.parallel}
    out = Path(args.out) if args.out else out_dir / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cost_of = {j.name: cst for j, cst in zip(jobs, costs)} if costs else {}
    env_extra = run_threads(args.parallel)

    def choose_lr(run: str) -> Job | None:
        """The sweep of ``run`` is over: one more sweep job past the edge, or None once its lr is chosen."""
        swept = [j for j in doc["jobs"] if "sweep" in j["phases"] and j["config"] == run]
        further = beyond_edge(swept)
        if further is not None and extended.get(run, 0) < args.sweep_extend:
            extended[run] = extended.get(run, 0) + 1
            log(f"{run}: the best lr is at the edge of the sweep; sweeping lr {further:g} too")
            extra = Job(f"sweep-{run}-lr{further:g}", run, swept[0]["seed"], further, swept[0]["steps"], ["sweep"])
            if cost:
                cost_of[extra.name] = cost(run, extra.steps)
            return extra
        best = best_swept(swept)
        chosen[run] = best["lr"]
        lr_info[run] = {"lr": best["lr"], "how": "sweep"}
        log(f"{run}: lr {best['lr']:g} chosen (validation kNN {100 * best['eval']['val'][SELECT_KEY]:.2f})")
        return None

    def train_and_evaluate(job: Job, tree: dict, limit: float | None) -> tuple[dict, dict]:
        train = launch(tree, runs_dir / job.name, time_limit=limit, env_extra=env_extra)
        with eval_lock:  # one evaluation at a time: it uses every core of this process
            ev = evaluate_run(runs_dir / job.name, shards, val_dir)
        return train, ev

    def record_of(job: Job, tree: dict, train: dict, ev: dict) -> dict:
        sps_run = seconds_per_step(train["metrics"], batch, min(10, job.steps // 4))
        log(f"{job.name}: {train['steps_done']} steps in {train['wall_s']} s; test kNN "
            f"{100 * ev['test'][SELECT_KEY]:.2f}, zero-shot {100 * ev['test']['zeroshot_top1/templates']:.2f}; "
            f"val kNN {100 * ev['val'][SELECT_KEY]:.2f}")
        gf = configs[job.config]["gflops_per_step"]
        return {"name": job.name, "config": job.config, "phases": list(job.phases), "seed": job.seed,
                "lr": job.lr, "steps": job.steps, "warmup": tree["optim"]["warmup_steps"],
                "gflops_per_step": gf, "total_tflops": round(gf * train["steps_done"] / 1e3, 3),
                "train": {"steps_done": train["steps_done"], "cut_short": train["cut_short"],
                          "wall_s": train["wall_s"],
                          "samples_per_s": round(batch / sps_run, 2) if sps_run else None,
                          "final_losses": {k: v for k, v in train["last"].items() if k.startswith("loss/")}},
                "eval": ev}

    def save() -> None:  # after every job: a partial bench keeps its results
        doc["total_minutes"] = round((time.time() - t_start) / 60, 2)
        out.write_text(json.dumps(doc, indent=1) + "\n")

    done: dict = {}  # job key -> its record in doc["jobs"]
    extended: dict[str, int] = {}
    eval_lock = threading.Lock()
    pending, running = list(jobs), {}  # running: future -> (job, tree)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        while pending or running:
            job = next_ready(pending, running, chosen, choose_lr)
            if job is not None and len(running) < args.parallel:
                if job.config in follow:
                    lr_info[job.config] = {"lr": job.lr, "how": f"{job.lr_of}'s (sweep)"}
                if job.key() in done:
                    done[job.key()]["phases"] += [ph for ph in job.phases if ph not in done[job.key()]["phases"]]
                    log(f"{job.name}: same training as {done[job.key()]['name']}, reused")
                    continue
                if job.key() in prior:
                    source, old = prior[job.key()]
                    record = {**copy.deepcopy(old), "name": job.name, "phases": list(job.phases),
                              "reused_from": old.get("reused_from", source)}
                    doc["jobs"].append(record)
                    done[job.key()] = record
                    log(f"{job.name}: taken over from {source} ({old['name']}): test kNN "
                        f"{100 * old['eval']['test'][SELECT_KEY]:.2f}, val kNN "
                        f"{100 * old['eval']['val'][SELECT_KEY]:.2f}")
                    save()
                    continue
                tree = job_tree(trees[job.config], runs_dir / job.name, job.steps, job.lr, job.seed, log_every)
                limit = None
                if deadline is not None:  # keep the bench inside the budget: what is left is shared by expected time
                    rest = sum(cost_of.get(j.name, 0.0) for j in pending + [r[0] for r in running.values()])
                    mine = cost_of.get(job.name) or cost(job.config, job.steps)
                    limit = max(60.0, (deadline - time.time()) * args.parallel * mine / max(rest + mine, 1e-9))
                log(f"training {job.name}: {job.steps} steps, lr {job.lr:g}, seed {job.seed}, batch "
                    f"{tree['data']['batch']}" + (f", time limit {limit:.0f} s" if limit else "")
                    + (f" ({len(running) + 1} running)" if args.parallel > 1 else ""))
                running[pool.submit(train_and_evaluate, job, tree, limit)] = (job, tree)
                continue
            if job is not None:  # no free slot: it waits at the head of the queue
                pending.insert(0, job)
            if not running:
                raise RuntimeError(f"bench_quality: no job can start ({[j.name for j in pending]})")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, tree = running.pop(fut)
                train, ev = fut.result()
                record = record_of(job, tree, train, ev)
                doc["jobs"].append(record)
                done[job.key()] = record
                save()
    doc["lr"] = lr_info
    save()
    print()
    print(report(doc))
    print(f"\nwrote {out}  (total {doc['total_minutes']:.1f} min)")
    return 0


def next_ready(pending: list[Job], running: dict, chosen: dict[str, float], choose_lr) -> Job | None:
    """Take the first job of ``pending`` that can start now, in plan order: its lr is known (given, or its run's
    sweep is over and chosen: ``choose_lr(run)`` may instead return one more sweep job, which is taken first), and no
    running job trains the same thing (it then reuses that one's result). None when every pending job waits."""
    busy = {j.key() for j, _ in running.values()}
    sweeping = {j.config for j, _ in running.values() if "sweep" in j.phases}
    sweeping |= {j.config for j in pending if "sweep" in j.phases and j.lr is not None}
    for i, job in enumerate(pending):
        if job.lr is None:
            if job.lr_of not in chosen:
                if job.lr_of in sweeping:
                    continue
                extra = choose_lr(job.lr_of)
                if extra is not None:
                    return extra
            job.lr = chosen[job.lr_of]
        if job.key() in busy:
            continue
        return pending.pop(i)
    return None


REUSE_SETTINGS = ("quick", "batch_size", "split", "split_seed", "val", "flop_steps", "caption_templates", "probe")
REUSE_CONFIG_KEYS = ("objectives", "text_trained", "batch", "mask_ratio", "model", "change")


def reusable_records(paths: list[Path], doc: dict) -> dict[tuple, tuple[str, dict]]:
    """Job key -> (where it comes from, its record), for the uncut trainings of earlier results JSONs whose bench
    settings equal ``doc``'s and whose config is the same (objectives, batch, masking, model, and GFLOP/step to 0.1%).
    An earlier bench with other settings (split, batch, validation set, probes) is an error naming them."""
    out: dict = {}
    for path in paths:
        old = json.loads(path.read_text())
        differ = [k for k in REUSE_SETTINGS if old.get(k) != doc.get(k)]
        if old.get("benchmark") != "bench_quality" or differ:
            raise SystemExit(f"--reuse {path}: not the same bench ({', '.join(differ) or 'benchmark'} differ)")
        for rec in old["jobs"]:
            was, now = old["configs"].get(rec["config"]), doc["configs"].get(rec["config"])
            if now is None or rec["train"]["cut_short"] or any(was.get(k) != now.get(k) for k in REUSE_CONFIG_KEYS):
                continue
            if abs(was["gflops_per_step"] - now["gflops_per_step"]) > 1e-3 * now["gflops_per_step"]:
                continue
            out[(rec["config"], rec["seed"], rec["lr"], rec["steps"])] = (f"{path} of {old['created']}", rec)
    return out


def results_doc(args, argv, info, n_val, runs, seeds, lrs, steps, batch, configs, lr_info, calib) -> dict:
    """The results JSON::

        benchmark, version, quick, argv, created, batch_size, split {test, labeled, paired, unlabeled}, split_seed,
        val {n, source, selection}, runs [run names], reference, reference_steps, seeds, lrs, sweep_fraction,
        flop_steps, configs {name: {run, change, objectives, text_trained, batch, mask_ratio, model,
                                    gflops_per_step, forward_gflops {part: GFLOPs}, equal_flops_steps}},
        lr {run: {lr, how: sweep|given|config}}, calibration, plan {estimated_minutes, jobs},
        jobs [{name, config, phases [sweep|seed|ablation|equal-steps], seed, lr, steps, warmup, gflops_per_step,
               total_tflops, train {steps_done, cut_short, wall_s, samples_per_s, final_losses},
               eval {test {knn_top1/*, linear_top1/*, zeroshot_top1/*, n, n_probe_train}, val {...}, eval_s}}],
        total_minutes

    A job serving several phases (the sweep run at the chosen lr is the first seed's run when the sweep is full
    length) is one record with several phases."""
    return {
        "benchmark": "bench_quality", "version": 2, "quick": args.quick, "argv": list(argv or sys.argv[1:]),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "batch_size": batch, "split": info["counts"],
        "split_seed": args.split_seed,
        "val": {"n": n_val, "source": "class-stratified slice of the unlabeled training pool, labels restored",
                "selection": f"val {SELECT_KEY}"},
        "caption_templates": CAPTION_TEMPLATES,
        "probe": {"train": "the 10% labeled split", "knn": {"k": 20, "T": 0.07},
                  "linear": "sklearn logistic regression, C=1, standardized features"},
        "runs": runs, "reference": args.reference, "reference_steps": steps, "seeds": seeds, "lrs": lrs,
        "sweep_fraction": args.sweep_fraction, "flop_steps": args.flop_steps or (2 if args.quick else 10),
        "configs": configs, "lr": lr_info, "calibration": calib, "jobs": [],
    }


if __name__ == "__main__":
    sys.exit(main())
