"""What the quality bench trains: the runs (``configs/bench/quality-<run>.yaml``) and their ablations with their
FLOPs, each run's learning rate (given, or swept), and the jobs of the sweep, the seeds, the ablations and equal
steps, in execution order, with what each costs."""
from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import REPO
from benchlib.cli import log, parse_list
from benchlib.train import adapt_tree, equal_flops_steps, measure_flops, validated

CONFIGS = REPO / "configs" / "bench"
SELECT_KEY = "knn_top1/pooled"  # the sweep's selection metric, on the validation split


# A second stage names its first stage by model.pretrained: this prefix + the first stage's config name
# (configs/bench/quality-lit.yaml: bench_out/quality/runs/lit-tower); the bench trains that config first and puts
# its run folder there.
STAGE_PREFIX = "bench_out/quality/runs/"
# a second stage whose image tower is locked cannot change kNN on the pooled feature: its sweep selects on this
STAGE2_SELECT_KEY = "zeroshot_top1/templates"


def all_configs() -> list[str]:
    return sorted(p.stem[len("quality-"):] for p in CONFIGS.glob("quality-*.yaml"))


def first_stage(tree: dict) -> str | None:
    """The bench config a second stage starts from (its ``model.pretrained`` is ``STAGE_PREFIX`` + that name), or
    None for a one-stage run."""
    pre = str((tree.get("model") or {}).get("pretrained") or "")
    name = pre[len(STAGE_PREFIX):].strip("/") if pre.startswith(STAGE_PREFIX) else ""
    return name if name and (CONFIGS / f"quality-{name}.yaml").is_file() else None


def first_stages() -> dict[str, list[str]]:
    """First-stage config -> the two-stage runs that start from it (``lit-tower`` -> ``[lit]``; ``mixed-curriculum``
    and ``mixed-curriculum-soft`` share one first stage, trained once per seed)."""
    out: dict[str, list[str]] = {}
    for run in all_configs():
        if first := first_stage(base_tree(run)):
            out.setdefault(first, []).append(run)
    return out


def available_runs() -> list[str]:
    """The bench's runs (rows): every ``configs/bench/quality-RUN.yaml`` except the first stages of two-stage runs,
    which train only as part of theirs."""
    firsts = first_stages()
    return [r for r in all_configs() if r not in firsts]


def base_tree(run: str) -> dict:
    import yaml

    path = CONFIGS / f"quality-{run}.yaml"
    if not path.is_file():
        raise SystemExit(f"no config {path} (runs: {', '.join(available_runs())})")
    return yaml.safe_load(path.read_text())


def without_pretrained(tree: dict) -> dict:
    """A second stage's config with its placeholder ``model.pretrained`` dropped: what FLOPs and calibration are
    measured on (the weights do not change the arithmetic; ``lock_image`` stays)."""
    if not first_stage(tree):
        return tree
    tree = copy.deepcopy(tree)
    del tree["model"]["pretrained"]
    return tree


def first_stage_share(reference_tree: dict, first_tree: dict, flop_steps: int) -> tuple[float, str]:
    """The default share of a two-stage run's FLOPs that its first stage spends: the share of the reference run's
    training FLOPs per step that its rows of the first stage's kinds cost (mixed: its labeled + unlabeled rows,
    image-only, against its captioned rows), counted by ``vlp.flops`` on the reference config without its other
    rows. 0.5 when the reference has no rows of those kinds, or nothing else. Returns (share, how)."""
    from benchlib.cifar import CLASSNAMES
    from vlp.config import ConfigError
    from vlp.flops import training_flops_per_step

    kinds = {k for k, n in first_tree["data"]["batch"].items() if n}
    batch = reference_tree["data"]["batch"]
    keep = {k: n for k, n in batch.items() if n and k in kinds}
    if not keep or sum(keep.values()) == sum(n for n in batch.values() if n):
        return 0.5, "50/50 (the reference has no rows of the first stage's kinds, or only them)"
    part = copy.deepcopy(reference_tree)
    part["data"]["batch"] = keep
    part["data"]["sources"] = [s for s in part["data"]["sources"] if s.get("kind", "paired") in kinds]
    try:
        counted = [training_flops_per_step(validated(t), CLASSNAMES, steps=flop_steps)
                   for t in (part, reference_tree)]
    except (ConfigError, ValueError) as err:
        return 0.5, f"50/50 (the reference without its other rows does not train: {err})"
    share = round(counted[0] / counted[1], 4)
    return share, (f"the reference's FLOP share of its {'+'.join(sorted(keep))} rows ({sum(keep.values())} of "
                   f"{sum(batch.values())} rows: {counted[0] / 1e9:.2f} of {counted[1] / 1e9:.2f} GFLOP/step)")


def active_objectives(tree: dict) -> list[str]:
    """Objectives with a weight > 0, as the config parses them (a bare number is a weight)."""
    cfg = validated(tree)
    return [name for name, o in cfg.objectives.items() if o.weight > 0]


def text_trained(tree: dict) -> bool:
    """The run trains its text tower: an active objective reads text (contrastive) and the tower is not locked."""
    from vlp.objectives import OBJECTIVES

    cfg = validated(tree)
    return any(OBJECTIVES[n].needs_text for n in active_objectives(tree)) and not cfg.model.text.lock


def parse_ablate(spec: str | None) -> tuple[str | None, tuple[str, ...]]:
    """``--ablate RUN`` (every ablation of RUN) or ``RUN:PIECE,...`` (only those: an objective's name or
    ``labels-as-text``) -> ``(RUN, pieces)``; no pieces: all."""
    if not spec:
        return None, ()
    run, _, pieces = spec.partition(":")
    return run, tuple(p.strip() for p in pieces.split(",") if p.strip())


def ablation_trees(run: str, tree: dict, only: tuple[str, ...] = ()) -> dict[str, tuple[dict, str]]:
    """name -> (config, what changed): each active objective removed; labels-as-text off where it is on. ``only``:
    just these pieces (objective names or ``labels-as-text``); a piece RUN does not have is an error."""
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
    if only:
        pieces = {name.removeprefix(f"{run}-no-"): name for name in out}
        missing = [p for p in only if p not in pieces]
        if missing:
            raise ValueError(f"--ablate {run}:{','.join(only)}: {', '.join(missing)} not ablatable in {run} "
                             f"(pieces: {', '.join(pieces)})")
        out = {pieces[p]: out[pieces[p]] for p in only}
    for name, (t, _) in list(out.items()):
        try:
            validated(t)
        except ConfigError as err:
            log(f"ablation {name} skipped: {err}")
            del out[name]
    return out


def run_configs(p: argparse.ArgumentParser, args: argparse.Namespace, shards: Path,
                batch: int) -> tuple[list[str], dict, dict]:
    """(runs, trees, configs) of the command line: ``--runs`` (and the reference) and ``--ablate``'s ablations as
    configs adapted to the bench; ``configs``: each one's run, change, objectives, batch, masking, model and FLOPs."""
    runs = parse_list(args.runs) if args.runs else available_runs()
    known, firsts = available_runs(), first_stages()
    ablate, pieces = parse_ablate(args.ablate)
    for r in runs + [args.reference] + ([ablate] if ablate else []):
        if r in firsts:
            p.error(f"{r!r} is the first stage of the two-stage run(s) {', '.join(firsts[r])}, not a run of its own: "
                    f"--runs {firsts[r][0]}")
        if r not in known:
            p.error(f"unknown run {r!r}: no configs/bench/quality-{r}.yaml (runs: {', '.join(known)})")
    if ablate and ablate not in runs:
        p.error(f"--ablate {ablate}: not among --runs")
    if ablate and first_stage(base_tree(ablate)):
        p.error(f"--ablate {ablate}: a two-stage run has no ablations here")
    if first_stage(base_tree(args.reference)):
        p.error(f"--reference {args.reference}: a two-stage run cannot be the reference")
    adapt = lambda t: adapt_tree(t, shards, batch, args.mask_ratio, args.model, args.workers)  # noqa: E731
    trees = {}
    for r in dict.fromkeys(runs + [args.reference]):
        if first := first_stage(base_tree(r)):  # a two-stage run: its first stage's config comes with it
            trees[first] = adapt(base_tree(first))
        trees[r] = adapt(base_tree(r))
    configs = {r: {"run": r, "change": None} for r in trees}
    if ablate:
        try:
            ablations = ablation_trees(ablate, base_tree(ablate), pieces)
        except ValueError as err:
            p.error(str(err))
        for abl, (tree, change) in ablations.items():
            trees[abl] = adapt(tree)
            configs[abl] = {"run": ablate, "change": change}
    flop_steps = args.flop_steps or (2 if args.quick else 10)
    for c, v in configs.items():
        cfg = validated(trees[c])
        v.update(objectives=active_objectives(trees[c]), text_trained=text_trained(trees[c]),
                 batch=cfg.data.batch.model_dump(), mask_ratio=cfg.model.mask_ratio, model=cfg.model.name)
    measure_flops(configs, {c: without_pretrained(t) for c, t in trees.items()}, flop_steps)
    for r in runs:
        if first := first_stage(trees[r]):
            if args.first_stage_share is not None:
                share, how = args.first_stage_share, "given (--first-stage-share)"
            else:
                share, how = first_stage_share(trees[args.reference], trees[first], flop_steps)
            log(f"{r}: two stages, {first} then {r}; the first spends {share:.4g} of the FLOPs: {how}")
            configs[first]["stage_of"] = r
            # the run's own objectives are both stages' (a two-stage run is never a single-objective row); its
            # second stage's are kept for the stages table
            configs[r].update(stages=[first, r], first_stage_share=share, first_stage_share_how=how,
                              second_stage_objectives=configs[r]["objectives"],
                              select=STAGE2_SELECT_KEY if validated(trees[r]).model.lock_image else SELECT_KEY,
                              objectives=list(dict.fromkeys(configs[first]["objectives"] + configs[r]["objectives"])))
    return runs, trees, configs


def stage_steps(steps: int, reference: str, configs: dict) -> dict[str, int]:
    """Steps of every config at ``steps`` reference steps: a one-stage config matches the reference's FLOPs; the two
    stages of a two-stage run split them, ``first_stage_share`` to the first (:func:`two_stage_steps`)."""
    ref = configs[reference]["gflops_per_step"]
    out = {c: equal_flops_steps(steps, ref, v["gflops_per_step"]) for c, v in configs.items()}
    for run, v in configs.items():
        if v.get("stages"):
            first = v["stages"][0]
            out[first], out[run] = two_stage_steps(steps * ref, v["first_stage_share"],
                                                   configs[first]["gflops_per_step"], v["gflops_per_step"])
    return out


def two_stage_steps(budget_gflops: float, share: float, first_gflops: float, second_gflops: float) -> tuple[int, int]:
    """(first, second) stage steps: ``share`` of the budget's FLOPs to the first stage, the rest to the second."""
    return (max(1, round(share * budget_gflops / first_gflops)),
            max(1, round((1 - share) * budget_gflops / second_gflops)))


def learning_rates(p: argparse.ArgumentParser, args: argparse.Namespace, runs: list[str],
                   trees: dict) -> tuple[list[float], dict, dict, dict]:
    """(lrs, lr_info, sweep, follow): the lrs a sweep tries; each run's lr and how it is set (``{"lr", "how"}``:
    given, config, or another run's; runs without one are swept); run -> the lrs swept; run -> the run whose lr it
    takes (``--lr RUN=@OTHER``)."""
    given_text = dict(item.split("=", 1) for item in parse_list(args.lr))
    follow = {k: v[1:] for k, v in given_text.items() if v.startswith("@")}
    given = {k: float(v) for k, v in given_text.items() if k not in follow}
    for r, other in follow.items():
        if other not in runs or other in follow:
            p.error(f"--lr {r}=@{other}: {other} is not a run of --runs that has its own lr")
    lrs = parse_list(args.lrs, float) if args.lrs else None
    lr_info: dict = {}
    for r in with_stages(runs, trees):
        if r in follow:
            lr_info[r] = {"lr": None, "how": f"{follow[r]}'s"}
        elif r in given:
            lr_info[r] = {"lr": given[r], "how": "given"}
        elif lrs is None and args.quick:
            lr_info[r] = {"lr": float(trees[r]["optim"]["lr"]), "how": "config"}
        elif lrs is not None and len(lrs) == 1:
            lr_info[r] = {"lr": lrs[0], "how": "given"}
    lrs = lrs or [5e-4, 1e-3, 2e-3]
    return lrs, lr_info, {r: lrs for r in with_stages(runs, trees) if r not in lr_info}, follow


def with_stages(runs: list[str], trees: dict) -> list[str]:
    """``runs`` with the first stage of each two-stage run just before it: every config that has its own lr."""
    out = []
    for r in runs:
        if first := first_stage(trees[r]):
            out.append(first)
        out.append(r)
    return list(dict.fromkeys(out))


@dataclass
class Job:
    """One training + evaluation. ``lr`` None: the lr chosen for ``lr_of`` (known after the sweep). ``init_of``: the
    job whose run this one starts from (a second stage: its first stage's job of the same seed), which must finish
    first; ``init``: that run's key once it has (what it trained: config, seed, lr, steps)."""

    name: str
    config: str
    seed: int
    lr: float | None
    steps: int
    phases: list[str] = field(default_factory=list)
    lr_of: str = ""
    init_of: str = ""
    init: tuple | None = None

    def key(self, lr: float | None = None, init: tuple | None = None):
        """Jobs with equal keys train the same thing: the later one reuses the earlier one's result. ``lr`` and
        ``init`` (its first stage's (config, seed, lr, steps)) stand in for those not set on the job yet."""
        own = self.config, self.seed, self.lr if lr is None else lr, self.steps
        init = self.init or init
        return own + ((tuple(init) if init else ("after", self.init_of)),) if self.init_of else own


def plan_jobs(steps: int, runs: list[str], reference: str, configs: dict, sweep: dict[str, list[float]],
              chosen: dict[str, float], seeds: list[int], fraction: float, ablations: list[str],
              equal_steps: bool, one_seed: tuple[str, ...] = (), follow: dict[str, str] | None = None) -> list[Job]:
    """Every job of the bench in execution order: sweep, seeds, ablations, equal-steps (see ``tools/bench_quality.py``'s docstring).
    ``follow``: run -> the run whose chosen lr it trains at (``--lr RUN=@OTHER``)."""
    follow = follow or {}
    eq = stage_steps(steps, reference, configs)
    s0 = seeds[0]
    jobs = []
    for run, lrs in sweep.items():
        n = max(1, round(eq[run] * fraction))
        # a second stage's sweep starts from its first stage at the first seed and that stage's chosen lr
        init = f"{configs[run]['stages'][0]}-seed{s0}" if configs[run].get("stages") else ""
        jobs += [Job(f"sweep-{run}-lr{lr:g}", run, s0, lr, n, ["sweep"], init_of=init) for lr in lrs]
    for run in runs:
        stages = configs[run].get("stages") or [run]
        for seed in (seeds[:1] if run in one_seed else seeds):
            init = ""
            for config in stages:  # a two-stage run: its first stage, then the second from it, per seed
                lr_of = follow.get(config, config)
                jobs.append(Job(f"{config}-seed{seed}", config, seed, chosen.get(lr_of), eq[config],
                                ["seed" if config == run else "stage1"], lr_of, init_of=init))
                init = jobs[-1].name
    for name in ablations:
        run = configs[name]["run"]
        jobs.append(Job(f"{name}-seed{s0}", name, s0, chosen.get(run), eq[name], ["ablation"], run))
    if equal_steps:  # one-stage runs only: a two-stage run's steps are its stages'
        jobs += [Job(f"{run}-steps{steps}", run, s0, chosen.get(run), steps, ["equal-steps"], run) for run in runs
                 if not configs[run].get("stages")]
    return jobs


def best_swept(swept: list[dict], key: str = SELECT_KEY) -> dict:
    """The sweep run with the best validation ``key`` (kNN pooled; a locked-tower second stage: zero-shot)."""
    return max(swept, key=lambda j: j["eval"]["val"][key])


def beyond_edge(swept: list[dict], key: str = SELECT_KEY) -> float | None:
    """The next lr to sweep when the best validation lr is the smallest or largest swept: one step of the grid's
    ratio beyond it (3 significant digits). None when the best lies inside the swept range."""
    lrs = sorted({j["lr"] for j in swept})
    if len(lrs) < 2:
        return None
    best = best_swept(swept, key)["lr"]
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
        print(f"{j.name:<34} {j.config:<24} {j.seed:>4} {lr:>8} {j.steps:>6} {tf:>8.2f} {est:>8}"
              + (f"  (from {j.init_of})" if j.init_of else ""))
    n = reuse.count(False)
    print(f"{n} trainings + evaluations" + (f", estimated {sum(costs) / 60:.1f} min" if costs else ""), flush=True)
