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
lit             stage 1: labeled + unlabeled (B);             stage 1: CE + MAE, 75% masking;
                stage 2: paired (B)                           stage 2: CLIP, image tower locked (LiT)
=============== ============================================= =====================================

Two-stage runs (LiT, Zhai et al. 2022). A config whose ``model.pretrained`` is ``bench_out/quality/runs/FIRST``
(``quality-lit.yaml``: ``lit-tower``) is the second stage of a run whose first stage is ``quality-FIRST.yaml``
(which is then no row of its own). Per seed the bench trains the first stage, then the second with
``model.pretrained`` set to that run folder (the image tower locked: ``model.lock_image``), and evaluates the
second. The two stages together spend the same training FLOPs as every other run: the first ``F`` of them, the
second the rest (each stage's steps from its own GFLOP/step, counted by ``vlp.flops``, where a locked tower costs its
forward only). ``F`` is ``--first-stage-share``; by default the share of the reference run's FLOPs per step that its
rows of the first stage's kinds cost (for mixed: its labeled + unlabeled rows, the image-only ones, against its
captioned rows; counted by ``vlp.flops`` on the reference config without its other rows), or 50/50 when the
reference has no such rows or nothing else. Each stage has its own lr: the first stage's sweep selects on the
validation kNN (as every run); the second stage's sweep starts from the first stage at the first seed and its
chosen lr, and selects on the validation zero-shot (templates), since a locked image tower leaves kNN on the pooled
feature unchanged. The report gives both stages (steps, GFLOP/step, TFLOP, lr) under the headline table.

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
3. Ablations (``--ablate RUN``, or ``RUN:PIECE,...`` for only those pieces): one config per active objective of
   RUN with that objective removed, and one with ``contrastive.labels_as_text: false`` where it is true; each
   re-measured for FLOPs and trained at equal FLOPs to the reference, first seed, RUN's chosen lr. The table gives
   each one's delta to RUN at the same seed.

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

Output: ``OUT/results.json`` (``--out``; layout in :func:`quality.run.results_doc`) and a report to paste into README
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
    python tools/bench_quality.py --runs clip,mixed,lit --steps 250     # LiT's two stages against the one-stage mix
    python tools/bench_quality.py --prepare-only            # write the shards configs/cifar10-mixed.yaml reads
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import quality_curve as curve  # tools/: the curve across budgets (gap table, gap_vs_budget.png)
from benchlib import REPO
from benchlib.cli import log, parse_list
from quality.plan import available_runs
from quality.report import report
from quality.run import bench

# the bench's pieces, still reachable as bench_quality.X (tests/test_bench_quality.py)
from quality.plan import SELECT_KEY, beyond_edge, plan_jobs, reused, stage_steps, two_stage_steps  # noqa: E402,F401,I001
from quality.report import COLUMNS  # noqa: E402,F401
from quality.run import next_ready, reusable_records  # noqa: E402,F401


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
    p.add_argument("--first-stage-share", type=float, default=None, metavar="F",
                   help="a two-stage run (lit): the share of its FLOPs its first stage spends (default: the "
                        "reference's FLOP share of the rows of the first stage's kinds, e.g. mixed's image-only rows; "
                        "50/50 when that is undefined)")
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
    p.add_argument("--ablate", default=None, metavar="RUN[:PIECE,...]",
                   help="ablate every objective of RUN, or only the PIECEs named (objectives, labels-as-text; "
                        "e.g. mixed:pseudolabel) (default: none)")
    p.add_argument("--equal-steps", action="store_true", help="also train every run at the reference's steps")
    p.add_argument("--flop-steps", type=int, default=None, help="steps FLOPs are averaged over (default: 10; quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per step, every run (default: 128; quick 64)")
    p.add_argument("--mask-ratio", type=float, default=None, help="override every config's model.mask_ratio")
    p.add_argument("--model", default=None, help="model config name (default: the configs', vlp-tiny-vit)")
    p.add_argument("--split-seed", type=int, default=0, help="data split seed")
    p.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                   help="every training also checkpoints each STEPS steps (default: the configs', only at the end). "
                        "A training stopped by a kill or a time limit continues from its last checkpoint when the bench "
                        "runs again into the same --out-dir (with --reuse of its results JSON for the finished ones)")
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
    if args.first_stage_share is not None and not 0 < args.first_stage_share < 1:
        p.error("--first-stage-share: a fraction between 0 and 1")
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


if __name__ == "__main__":
    sys.exit(main())
