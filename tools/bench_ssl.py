#!/usr/bin/env python
"""The self-supervised methods on CIFAR-10 at equal training FLOPs: kNN and linear-probe top-1 of the frozen
backbone on the held-out test split (vlp).

Data: ``tools/bench_quality.py``'s preparation (``benchlib.cifar.prepare``): ``../shared/data/cifar10-train.tar.gz``
split into WebDataset shards under ``bench_out/quality/shards/{labeled,paired,unlabeled,test}`` (a fixed, class-
stratified 5,000 test images; of the rest 10% labeled, 20% image-text, 70% unlabeled; ``split.json``). Skipped with a
message when the tarball is absent. Each method trains on the unlabeled split (31,500 images) with its config
``configs/ssl/<method>.yaml``; two reference rows: ``mae`` (``configs/bench/quality-mae.yaml``: MAE on every
training image) and ``supervised`` (``configs/bench/quality-supervised.yaml``: cross-entropy on the 4,500 labeled
images); and ``random``, the untrained model (initialized with the bench's seed), evaluated the same way.

Equal FLOPs (as bench_quality): the training FLOPs per step of each run config are counted by
``vlp.flops.training_flops_per_step`` (student pass, heads, teacher forwards, backward, hooks, on a synthetic batch of
the run's composition and views); the reference method (``--reference``, default simclr) trains ``--budget`` steps and
every other one ``round(budget * flops(reference) / flops(method))``. Every run: vlp-tiny-vit, batch ``--batch-size``
(default 64: twice the updates of 128 at the same FLOPs), the config's lr and recipe, warm-up 10% of its steps (at
least 30, at most half), the config's schedule compressed to the run's length (``compress_schedule``: step-counted
freezes keep their fraction of the run, the teacher's time constant 1 / (1 - tau) too), seed ``--seed`` (0); one ``python -m
vlp.train`` subprocess each (``--parallel N``: N at once), stopped (SIGTERM, checkpointed, marked cut short) past its
share of ``--max-minutes``. A training stopped by a kill continues from its last checkpoint when the bench runs again
(``benchlib.train.launch``'s ``resume``).

Evaluation (bench_quality's: ``benchlib.evaluate.evaluate_clip``, on ``pooled``, the ViT's pooled token before the
CLIP projection): kNN top-1 (k=20, T=0.07) and linear-probe top-1 (logistic regression on standardized features),
both fit on the 10% labeled split (4,500 images) and measured on the 5,000 test images (± in the table: the binomial
standard error); kNN also on ``--val`` images of the unlabeled pool (labels restored, as bench_quality's validation
split), which alone choose the lr of a swept method (``--lrs``). A method whose student sees a transformed image is
evaluated on that input too (``EVAL_INPUT``): colorization on the grey of each image's lightness, as Zhang et al.
(2016, Sec. 3.2) evaluate their features on grayscale input; that input is its row's, colour is kept in the JSON, and
the random-init row is evaluated on both.

Output: one markdown table on stdout; ``bench_out/ssl/results.json`` (``--out``), written after every run.

Usage::

    python tools/bench_ssl.py                             # every method, 300 SimCLR steps at batch 64 (~75 min, 2 cores)
    python tools/bench_ssl.py --methods simclr,swav --budget 50
    python tools/bench_ssl.py --methods mocov3 --lr mocov3=1e-4 --out bench_out/ssl/mocov3-lr1e-4.json
    python tools/bench_ssl.py --methods random,colorization --lrs colorization=2e-4/5e-4/1.5e-3   # best val kNN
    python tools/bench_ssl.py --methods swav --set swav:objectives.swav.projector_norm=layer --out bench_out/ssl/swav-ln.json
    python tools/bench_ssl.py --quick                       # smoke run: 6,000 images, batch 32, 6 steps
    python tools/bench_ssl.py --report-only bench_out/ssl/results.json
    python tools/bench_ssl.py --batch-size 128 --budget 1200 --workers 3 --parallel 6   # one GPU: README's table, 8x
    python tools/bench_ssl.py --report-only a.json b.json   # bench processes run side by side (own --cache-dir each)
    python tools/bench_ssl.py --methods random,context --seed 1 --out bench_out/ssl/s1.json   # then --seed 2 ...
    python tools/bench_ssl.py --report-only s0.json s1.json s2.json   # several seeds: mean ± s.e. against random init
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from benchlib import REPO
from benchlib.cifar import DATA_TARBALL, prepare, prepare_val
from benchlib.cli import log, parse_list, write_json
from benchlib.evaluate import evaluate_clip
from benchlib.train import adapt_tree, equal_flops_steps, job_tree, launch, measure_flops
from quality.report import mean_std

# method -> (config under configs/, paper); "random" has no config: the untrained model
METHODS = {
    "random": (None, "untrained (the bench's seed)"),
    "simclr": ("ssl/simclr.yaml", "Chen et al. 2020, SimCLR"),
    "mocov3": ("ssl/mocov3.yaml", "Chen, Xie & He 2021, MoCo v3"),
    "byol": ("ssl/byol.yaml", "Grill et al. 2020, BYOL"),
    "dino": ("ssl/dino.yaml", "Caron et al. 2021, DINO"),
    "swav": ("ssl/swav.yaml", "Caron et al. 2020, SwAV"),
    "rotation": ("ssl/rotation.yaml", "Gidaris et al. 2018, RotNet"),
    "jigsaw": ("ssl/jigsaw.yaml", "Noroozi & Favaro 2016, Jigsaw"),
    "colorization": ("ssl/colorization.yaml", "Zhang, Isola & Efros 2016, Colorful Image Colorization"),
    "context": ("ssl/context.yaml", "Doersch, Gupta & Efros 2015, Context Prediction"),
    "beit": ("ssl/beit.yaml", "Bao et al. 2021, BEiT (in-project k-means pixel-patch codebook)"),
    "mae": ("bench/quality-mae.yaml", "He et al. 2022, MAE (every training image)"),
    "supervised": ("bench/quality-supervised.yaml", "cross-entropy on the labeled split"),
}
KEYS = ("knn_top1/pooled", "linear_top1/pooled")
# methods whose student sees a transformed image, evaluated on that input too (the row's headline) beside colour:
# colorization encodes the L channel (Zhang et al. 2016 evaluate their features on grayscale input, Sec. 3.2)
EVAL_INPUT = {"colorization": "lightness"}


def run_tree(method: str, shards: Path, batch: int, workers: int | None = None,
             overrides: list[tuple[str, object]] = ()) -> dict:
    """The method's config with this bench's shards and batch, no in-run evaluation, one final checkpoint
    (``workers``: DataLoader workers per process instead of the config's; ``overrides``: ``(dotted key, value)``
    set on the config first, as ``vlp.train``'s command-line overrides)."""
    import yaml

    from vlp.config import apply_overrides

    tree = apply_overrides(yaml.safe_load((REPO / "configs" / METHODS[method][0]).read_text()), overrides)
    tree = adapt_tree(tree, shards, batch, None, None)
    if workers is not None:
        tree["data"]["workers"] = workers
    tree.pop("eval", None)  # evaluated once, after training, by this bench
    tree["train"].update({"save_every": 10 ** 6, "keep_last": 1, "progress": False})
    tree["train"].pop("eval_every", None)
    return tree


# objective knobs counted in steps: written for the config's train.steps, compressed with the schedule
STEP_KNOBS = ("freeze_last_layer_steps", "freeze_prototypes_steps", "warmup_teacher_temp_steps", "rampup_steps")


def compress_schedule(tree: dict, steps: int) -> dict:
    """A copy of the config with its schedule compressed to a run of ``steps`` (the config's ``train.steps`` is its full length):
    step-counted knobs (DINO's last-layer freeze, SwAV's prototype freeze, ...) keep their fraction of the run, and
    the momentum teacher keeps its time constant 1 / (1 - tau) as a fraction of the run, so a 200-step run does not
    spend all of itself inside a freeze written for 2,000 steps, nor average toward a teacher that barely moves
    (warm-up is set by ``benchlib.train.job_tree``, 10% of the run)."""
    scale = steps / tree["train"]["steps"]
    if scale >= 1:
        return tree
    tree = copy.deepcopy(tree)
    for settings in tree.get("objectives", {}).values():
        for knob in STEP_KNOBS:
            if isinstance((settings or {}).get(knob), int):
                settings[knob] = round(settings[knob] * scale)
    if "tau" in (tree.get("teacher") or {}):
        tree["teacher"]["tau"] = round(max(0.0, 1 - (1 - tree["teacher"]["tau"]) / scale), 4)
    return tree


def parse_sets(items: list[str], methods: list[str]) -> dict[str, list[tuple[str, object]]]:
    """``--set METHOD:dotted.key=value`` items -> ``{method: [(key, value), ...]}`` (values parsed as YAML, as
    ``vlp.train``'s overrides); an item naming no method run, or without ``:`` / ``=``, is an error before any work."""
    from vlp.config import ConfigError, parse_overrides

    sets: dict[str, list] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or method not in methods or method == "random":
            raise SystemExit(f"--set {item!r}: expected METHOD:key=value with METHOD one of the trained methods "
                             f"({', '.join(m for m in methods if m != 'random')})")
        try:
            sets.setdefault(method, []).extend(parse_overrides([override]))
        except ConfigError as err:
            raise SystemExit(f"--set {item!r}: {err}") from None
    return sets


def config_cell(method: str, run: dict) -> str:
    """The table's config column: the config file and any ``--set`` overrides of this run."""
    if not METHODS[method][0]:
        return "-"
    sets = "".join(f" {k}={v}" for k, v in run.get("overrides", []))
    return f"`configs/{METHODS[method][0]}`" + (f" +{sets}" if sets else "")


def lightness_preprocess(preprocess):
    """``preprocess`` with the image replaced by the neutral grey of its lightness (colorization's student input,
    ``vlp.objectives.colorization.lightness_image``) before normalization."""
    from torchvision import transforms

    from vlp.objectives.colorization import lightness_image

    steps = list(preprocess.transforms)
    at = next(i for i, t in enumerate(steps) if isinstance(t, transforms.Normalize))
    return transforms.Compose(steps[:at] + [transforms.Lambda(lightness_image)] + steps[at:])


def evaluate(clip, tokenizer, preprocess, shards: Path, val: Path | None, inputs: tuple[str, ...]) -> dict:
    """``evaluate_clip`` once per input: ``colour`` (the images as they are) and, where asked, ``lightness``;
    ``{"test", "val"}`` are the first input's, every input's are under ``"inputs"``."""
    t0 = time.time()
    runs = {name: evaluate_clip(clip, tokenizer, lightness_preprocess(preprocess) if name == "lightness" else
                                preprocess, shards, val) for name in inputs}
    out = {**runs[inputs[0]], "input": inputs[0], "inputs": runs}
    out["eval_s"] = round(time.time() - t0, 1)
    return out


def evaluate_random(model: str, shards: Path, val: Path | None, seed: int, inputs: tuple[str, ...]) -> dict:
    import torch

    from vlp.models.factory import create_clip, image_transforms

    torch.manual_seed(seed)
    clip, _, tokenizer = create_clip(model, pretrained_text=False)
    clip.eval()
    return evaluate(clip, tokenizer, image_transforms(clip)[1], shards, val, inputs)


def evaluate_trained(run_dir: Path, shards: Path, val: Path | None, inputs: tuple[str, ...]) -> dict:
    import torch

    from vlp.models.factory import load_clip

    torch.manual_seed(0)
    clip, _, tokenizer, preprocess = load_clip(run_dir)
    if torch.cuda.is_available():
        clip = clip.cuda()
    return evaluate(clip, tokenizer, preprocess, shards, val, inputs)


def run_all(jobs: list, job, parallel: int = 1):
    """``(item, job(i, item))`` for each item of ``jobs`` (a method, or a method and its lr), in the order they finish: one at a time, or ``parallel`` at
    once (threads, each waiting on its training subprocess: a tiny ViT leaves a GPU mostly idle, so several runs
    share it, and the CPU cores make their views)."""
    if parallel <= 1:
        for i, m in enumerate(jobs):
            yield m, job(i, m)
        return
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(parallel) as pool:
        futures = {pool.submit(job, i, m): m for i, m in enumerate(jobs)}
        for f in as_completed(futures):
            yield futures[f], f.result()


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def merge_results(docs: list[dict]) -> dict:
    """One results doc from several runs of the same bench (same reference, budget, batch, split and seed)."""
    same = ("reference", "budget_steps", "batch_size", "split", "seed")
    for d in docs[1:]:
        diff = [k for k in same if d.get(k) != docs[0].get(k)]
        if diff:
            raise SystemExit(f"results differ in {diff}: not the same bench; merge only runs of one bench")
    merged = copy.deepcopy(docs[0])
    for d in docs[1:]:
        merged["runs"].update(copy.deepcopy(d["runs"]))
    return merged


def pct_se(p: float, n: int | None) -> str:
    """A top-1 as a percentage with its binomial standard error, ``100 sqrt(p (1 - p) / n)``."""
    return f"{100 * p:.1f} ± {100 * (p * (1 - p) / n) ** 0.5:.1f}" if n else f"{100 * p:.1f}"


def table(doc: dict) -> str:
    """One row per method (a swept method: its lr of best validation kNN), ranked by test kNN; ± is the binomial
    standard error over the test images."""
    ref = doc["reference"]
    lines = ["| method | config | GFLOP/step | steps | total TFLOP | lr | val kNN | kNN top-1 | linear top-1 | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = sorted(doc["runs"].items(), key=lambda kv: -kv[1]["eval"]["test"][KEYS[0]] if "eval" in kv[1] else 1)
    for m, r in rows:
        if "eval" not in r:
            continue
        t, v = r["eval"]["test"], r["eval"].get("val")
        n = t.get("n")
        gf = r.get("gflops_per_step")
        cut = f" of {r['steps']} (cut short)" if r.get("steps_done", 0) < r.get("steps", 0) else ""
        cfg = config_cell(m, r) + (f" ({r['eval']['input']} input)" if r["eval"].get("input", "colour") != "colour"
                                   else "")
        lr = f"{r['lr']:g}" + (f" of {'/'.join(f'{x:g}' for x in r['swept'])}" if r.get("swept") else "") \
            if r.get("lr") else "-"
        lines.append(f"| {m}{' (reference)' if m == ref else ''} | {cfg} | {f'{gf:.1f}' if gf is not None else '-'} | "
                     f"{r.get('steps_done', 0)}{cut} | {gf * r['steps_done'] / 1e3 if gf else 0:.1f} | {lr} | "
                     f"{f'{100 * v[KEYS[0]]:.1f}' if v else '-'} | {pct_se(t[KEYS[0]], n)} | {pct_se(t[KEYS[1]], n)} | "
                     f"{r.get('wall_s', 0):.0f} |")
    return "\n".join(lines)


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error over seeds (bench_quality's sample std / sqrt(n)); None with one seed."""
    mean, std = mean_std(values)
    return mean, (std / len(values) ** 0.5 if std is not None else None)


def seeds_table(docs: list[dict]) -> str:
    """Runs of one bench at several seeds (``--seed``; the docs of each seed merged): per method, test kNN and linear
    top-1 as the mean over its seeds ± the standard error of that mean, and the difference from random init's mean
    ± the standard error of the difference (the two added in quadrature); each seed's kNN in the last column."""
    by_seed: dict[int, list[dict]] = {}
    for d in docs:
        by_seed.setdefault(d.get("seed", 0), []).append(d)
    runs = {seed: merge_results(ds)["runs"] for seed, ds in sorted(by_seed.items())}
    methods = list(dict.fromkeys(m for r in runs.values() for m, run in r.items() if "eval" in run))
    stats = {m: {k: mean_se([100 * r[m]["eval"]["test"][k] for r in runs.values() if "eval" in r.get(m, {})])
                 for k in KEYS} for m in methods}

    def cell(m: str, k: str) -> str:
        mean, se = stats[m][k]
        return f"{mean:.1f}" + (f" ± {se:.1f}" if se is not None else "")

    def versus(m: str, k: str) -> str:
        if m == "random" or "random" not in stats:
            return "-"
        (a, sa), (b, sb) = stats[m][k], stats["random"][k]
        se = (sa ** 2 + sb ** 2) ** 0.5 if sa is not None and sb is not None else None
        return f"{a - b:+.1f}" + (f" ± {se:.1f}" if se is not None else "")

    lines = ["| method | seeds | kNN top-1 | vs random init | linear top-1 | vs random init | kNN per seed |",
             "|---|---|---:|---:|---:|---:|---|"]
    for m in sorted(methods, key=lambda m: -stats[m][KEYS[0]][0]):
        seeds = [s for s, r in runs.items() if "eval" in r.get(m, {})]
        per_seed = ", ".join(f"{100 * runs[s][m]['eval']['test'][KEYS[0]]:.1f}" for s in seeds)
        lines.append(f"| {m} | {','.join(map(str, seeds))} | {cell(m, KEYS[0])} | {versus(m, KEYS[0])} | "
                     f"{cell(m, KEYS[1])} | {versus(m, KEYS[1])} | {per_seed} |")
    return "\n".join(lines)


def choose_lr(entries: dict[float, dict]) -> tuple[float, dict]:
    """The lr whose run has the best validation kNN (the test split chooses nothing)."""
    return max(entries.items(), key=lambda kv: kv[1]["eval"]["val"][KEYS[0]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=300, help="steps of the reference method (default 300)")
    p.add_argument("--reference", default="simclr", help="method whose FLOPs x --budget every run spends")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=1,
                   help="methods trained at once (on a GPU: a tiny ViT leaves it mostly idle); with --max-minutes, "
                        "every run is stopped at that deadline instead of at its share")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers per run instead of the configs' (on a GPU the multi-crop views are the "
                        "bottleneck: give them the CPU cores)")
    p.add_argument("--lr", default="", help="METHOD=LR,...: these methods' lr instead of their config's")
    p.add_argument("--lrs", default="", metavar="METHOD=LR/LR/...,...",
                   help="sweep: train these methods at each lr; the row is the lr of best validation kNN (--val)")
    p.add_argument("--val", type=int, default=2000,
                   help="validation images (class-stratified, from the unlabeled pool, as bench_quality's): kNN on "
                        "them chooses a swept lr; 0: none")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a dotted config override for one method, e.g. swav:objectives.swav.epsilon=0.05 "
                        "(repeatable; shown in the table's config column)")
    p.add_argument("--flop-steps", type=int, default=2, help="steps averaged by the FLOP counter")
    p.add_argument("--flop-batch", type=int, default=16,
                   help="rows of the batch the FLOPs are counted on, scaled to --batch-size (FLOPs are linear in "
                        "the rows but for the losses' tiny B x B logits); default 16")
    p.add_argument("--split", choices=("full", "small"), default="full",
                   help="full: bench_quality's split (5,000 test, 4,500 labeled for the probes, 31,500 unlabeled); "
                        "small: its --quick split (1,000 test, 540 labeled, 3,780 unlabeled), evaluation ~9x cheaper")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock cap of the whole bench: each run is stopped past its share of what is left")
    p.add_argument("--quick", action="store_true", help="smoke run: the small split, batch 32, 6 reference steps")
    p.add_argument("--cache-dir", default=str(REPO / "bench_out"))
    p.add_argument("--out", default=None, help="results JSON (default: CACHE/ssl[-quick]/results.json)")
    p.add_argument("--report-only", metavar="JSON", nargs="+", default=None,
                   help="print the table of saved results JSONs (several: runs of the same bench, e.g. methods run "
                        "in parallel processes, merged; a later file's run of a method replaces an earlier one's; of "
                        "several --seed values: each method's mean over seeds ± its standard error, against random "
                        "init's)")
    args = p.parse_args(argv)
    if args.report_only:
        docs = [json.loads(Path(f).read_text()) for f in args.report_only]
        several = len({d.get("seed", 0) for d in docs}) > 1
        print(seeds_table(docs) if several else table(merge_results(docs)))
        return 0
    t_start = time.time()
    methods = parse_list(args.methods)
    unknown = [m for m in methods + [args.reference] if m not in METHODS]
    if unknown or args.reference == "random":
        raise SystemExit(f"unknown method(s) {unknown or ['random (as reference)']}; known: {', '.join(METHODS)}")
    lrs = {k: float(v) for k, v in (item.split("=", 1) for item in parse_list(args.lr))}
    sweeps = {k: [float(x) for x in v.split("/")] for k, v in (item.split("=", 1) for item in parse_list(args.lrs))}
    if set(lrs) - set(methods) or set(sweeps) - set(methods) or set(lrs) & set(sweeps):
        raise SystemExit(f"--lr / --lrs name method(s) not run, or both name one: {sorted(set(lrs) | set(sweeps))}")
    if sweeps and not args.val:
        raise SystemExit("--lrs chooses on the validation split: give --val > 0")
    sets = parse_sets(args.set, methods)
    if args.quick:
        args.budget, args.batch_size, args.flop_steps, args.split = min(args.budget, 6), 32, 1, "small"
    small = args.split == "small"

    cache = Path(args.cache_dir).resolve()
    shards = cache / ("quality-quick" if small else "quality") / "shards"
    info = prepare(cache / "cache", shards, n_test=1000 if small else 5000,
                   limit_per_class=600 if small else None, seed=0)
    if info is None:
        print(f"bench_ssl: {DATA_TARBALL} not found; skipping (nothing to benchmark).")
        return 0
    out_dir = cache / ("ssl-quick" if args.quick else "ssl")
    val = None
    if args.val:
        val = shards.parent / "val"
        if prepare_val(cache / "cache", val, info, min(args.val, 500) if small else args.val) is None:
            val = None
    out_path = Path(args.out) if args.out else out_dir / "results.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)

    trained = [m for m in methods if m != "random"]
    trees = {m: run_tree(m, shards, args.batch_size, args.workers, sets.get(m, ()))
             for m in set(trained) | {args.reference}}
    configs: dict = {m: {} for m in trees}
    measure_flops(configs, {m: adapt_tree(t, shards, args.flop_batch, None, None) for m, t in trees.items()},
                  args.flop_steps)
    for c in configs.values():
        c["gflops_per_step"] = round(c["gflops_per_step"] * args.batch_size / args.flop_batch, 2)
    ref_flops = configs[args.reference]["gflops_per_step"]
    doc = {"benchmark": "ssl", "argv": sys.argv[1:] if argv is None else argv, "quick": args.quick,
           "reference": args.reference, "reference_gflops_per_step": ref_flops, "budget_steps": args.budget,
           "batch_size": args.batch_size, "seed": args.seed, "split": args.split, "workers": args.workers,
           "parallel": args.parallel, "device": device_name(), "counts": info["counts"], "flop_batch": args.flop_batch,
           "created": time.strftime("%Y-%m-%d %H:%M:%S"),
           "probe": {"train": "the 10% labeled split", "test": "held-out test split", "feature": "pooled",
                     "knn": {"k": 20, "T": 0.07}, "linear": "logistic regression, standardized"},
           "runs": {}}
    plan = {m: equal_flops_steps(args.budget, ref_flops, configs[m]["gflops_per_step"]) for m in trained}
    log("plan: " + ", ".join(f"{m} {plan[m]} steps ({configs[m]['gflops_per_step']:.1f} GFLOP/step)" for m in trained))

    inputs = {m: ("colour",) if m not in EVAL_INPUT else (EVAL_INPUT[m], "colour") for m in methods}
    inputs["random"] = tuple(dict.fromkeys(["colour"] + [i for m in methods for i in inputs[m]]))
    jobs = [(m, lr) for m in methods for lr in sweeps.get(m, [None])]

    def train_and_evaluate(job: tuple[str, float | None], limit: float | None) -> dict:
        m, lr = job
        entry: dict = {"config": METHODS[m][0], "paper": METHODS[m][1], "overrides": sets.get(m, [])}
        if m == "random":
            entry.update(steps_done=0, eval=evaluate_random(trees[args.reference]["model"]["name"], shards, val,
                                                            args.seed, inputs[m]))
            return entry
        steps = plan[m]
        run_dir = out_dir / "runs" / ((m if lr is None else f"{m}-lr{lr:g}") + (f"-seed{args.seed}" if args.seed else ""))
        tree = job_tree(compress_schedule(trees[m], steps), run_dir, steps,
                        lr or lrs.get(m, trees[m]["optim"]["lr"]), args.seed, log_every=max(1, steps // 10))
        log(f"{m}: {steps} steps at lr {tree['optim']['lr']:g}" + (f" (at most {limit:.0f} s)" if limit else ""))
        res = launch(tree, run_dir, limit, resume=True)  # a stopped training of this config continues
        entry.update(steps=steps, steps_done=res["steps_done"], cut_short=res["cut_short"], wall_s=res["wall_s"],
                     gflops_per_step=configs[m]["gflops_per_step"], lr=tree["optim"]["lr"],
                     warmup=tree["optim"]["warmup_steps"], teacher_tau=(tree.get("teacher") or {}).get("tau"),
                     schedule={k: v for o in tree["objectives"].values() for k, v in (o or {}).items()
                               if k in STEP_KNOBS},
                     final_losses={k: v for k, v in res["last"].items() if k.startswith("loss/")})
        entry["eval"] = evaluate_trained(run_dir, shards, val, inputs[m])
        return entry

    def time_limit(i: int) -> float | None:
        """Sequential: each run's share of the time left (30 s of it for evaluation); parallel: the time left."""
        if not args.max_minutes:
            return None
        left = args.max_minutes * 60 - (time.time() - t_start)
        share = 1 if args.parallel > 1 else len([x for x, _ in jobs[i:] if x != "random"])
        return max(60.0, left / max(1, share) - 30)

    def record(job: tuple[str, float | None], entry: dict) -> None:
        m, lr = job
        t, v = entry["eval"]["test"], entry["eval"].get("val")
        log(f"{m}{f' lr {lr:g}' if lr else ''}: kNN {100 * t[KEYS[0]]:.1f}, linear {100 * t[KEYS[1]]:.1f}"
            + (f", val kNN {100 * v[KEYS[0]]:.1f}" if v else "") + f" (eval {entry['eval']['eval_s']} s)")
        if lr is None:
            doc["runs"][m] = entry
        else:  # the row: the lr of best validation kNN among those done
            doc.setdefault("sweeps", {}).setdefault(m, {})[f"{lr:g}"] = entry
            best = choose_lr(doc["sweeps"][m])[1]
            doc["runs"][m] = {**best, "swept": sorted(float(x) for x in doc["sweeps"][m])}
        doc["total_minutes"] = round((time.time() - t_start) / 60, 1)
        write_json(out_path, doc)

    for job, entry in run_all(jobs, lambda i, job: train_and_evaluate(job, time_limit(i)), args.parallel):
        record(job, entry)
    print(table(doc))
    log(f"results: {out_path} ({doc['total_minutes']} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
