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


def run_configs(p: argparse.ArgumentParser, args: argparse.Namespace, shards: Path,
                batch: int) -> tuple[list[str], dict, dict]:
    """(runs, trees, configs) of the command line: ``--runs`` (and the reference) and ``--ablate``'s ablations as
    configs adapted to the bench; ``configs``: each one's run, change, objectives, batch, masking, model and FLOPs."""
    runs = parse_list(args.runs) if args.runs else available_runs()
    known = available_runs()
    for r in runs + [args.reference] + ([args.ablate] if args.ablate else []):
        if r not in known:
            p.error(f"unknown run {r!r}: no configs/bench/quality-{r}.yaml (runs: {', '.join(known)})")
    if args.ablate and args.ablate not in runs:
        p.error(f"--ablate {args.ablate}: not among --runs")
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
    return runs, trees, configs


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
    return lrs, lr_info, {r: lrs for r in runs if r not in lr_info}, follow


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


def plan_jobs(steps: int, runs: list[str], reference: str, configs: dict, sweep: dict[str, list[float]],
              chosen: dict[str, float], seeds: list[int], fraction: float, ablations: list[str],
              equal_steps: bool, one_seed: tuple[str, ...] = (), follow: dict[str, str] | None = None) -> list[Job]:
    """Every job of the bench in execution order: sweep, seeds, ablations, equal-steps (see ``tools/bench_quality.py``'s docstring).
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
