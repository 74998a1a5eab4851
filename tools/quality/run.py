"""One budget of the quality bench: the shards, the runs' configs and FLOPs, learning rates, the reference steps
(given, or the most that fit ``--budget-minutes``), then every job trained (side by side with ``--parallel``),
evaluated and recorded in the results JSON after each; ``--reuse`` takes earlier trainings over."""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path

from benchlib.cifar import CAPTION_TEMPLATES, DATA_TARBALL, prepare, prepare_val
from benchlib.cli import log, parse_list, write_json
from benchlib.evaluate import evaluate_run
from benchlib.train import job_tree, launch, seconds_per_step
from quality.plan import (SELECT_KEY, Job, beyond_edge, best_swept, job_costs, learning_rates, plan_jobs, print_plan,
                          reused, run_configs, stage_steps, with_stages, without_pretrained)
from quality.report import report

SAFETY = 1.15


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

    # ---- configs (runs, reference, ablations; FLOPs of each), learning rates (given, single, or swept)
    batch = args.batch_size or (64 if args.quick else 128)
    seeds = parse_list(args.seeds, int) if args.seeds else ([0] if args.quick else [0, 1, 2])
    runs, trees, configs = run_configs(p, args, shards, batch)
    lrs, lr_info, sweep, follow = learning_rates(p, args, runs, trees)
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
        calib = {"runs": calibrate(with_stages(runs, trees), {c: without_pretrained(t) for c, t in trees.items()},
                                   runs_dir, batch)}
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
    for cname, n in stage_steps(steps, args.reference, configs).items():
        configs[cname]["equal_flops_steps"] = n
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

    def choose_lr(run: str) -> Job | None:
        """The sweep of ``run`` is over: one more sweep job past the edge, or None once its lr is chosen."""
        swept = [j for j in doc["jobs"] if "sweep" in j["phases"] and j["config"] == run]
        key = configs[run].get("select", SELECT_KEY)
        further = beyond_edge(swept, key)
        if further is not None and extended.get(run, 0) < args.sweep_extend:
            extended[run] = extended.get(run, 0) + 1
            log(f"{run}: the best lr is at the edge of the sweep; sweeping lr {further:g} too")
            extra = Job(f"sweep-{run}-lr{further:g}", run, swept[0]["seed"], further, swept[0]["steps"], ["sweep"],
                        init_of=(swept[0].get("init") or {}).get("name", ""))
            if cost:
                cost_of[extra.name] = cost(run, extra.steps)
            return extra
        best = best_swept(swept, key)
        chosen[run] = best["lr"]
        lr_info[run] = {"lr": best["lr"], "how": "sweep"}
        log(f"{run}: lr {best['lr']:g} chosen (validation {key} {100 * best['eval']['val'][key]:.2f})")
        return None

    def train_and_evaluate(job: Job, tree: dict, limit: float | None, env_extra: dict) -> tuple[dict, dict]:
        train = launch(tree, runs_dir / job.name, time_limit=limit, env_extra=env_extra, resume=True)
        with eval_lock:  # one evaluation at a time: it uses every core of this process
            ev = evaluate_run(runs_dir / job.name, shards, val_dir)
        return train, ev

    def record_of(job: Job, tree: dict, train: dict, ev: dict) -> dict:
        sps_run = seconds_per_step(train["metrics"], batch, min(10, job.steps // 4))
        log(f"{job.name}: {train['steps_done']} steps in {train['wall_s']} s; test kNN "
            f"{100 * ev['test'][SELECT_KEY]:.2f}, zero-shot {100 * ev['test']['zeroshot_top1/templates']:.2f}; "
            f"val kNN {100 * ev['val'][SELECT_KEY]:.2f}")
        gf = configs[job.config]["gflops_per_step"]
        own = round(gf * train["steps_done"] / 1e3, 3)
        init = init_of(job)
        return {"name": job.name, "config": job.config, "phases": list(job.phases), "seed": job.seed,
                "lr": job.lr, "steps": job.steps, "warmup": tree["optim"]["warmup_steps"],
                # a second stage: the whole run's FLOPs (its first stage's too); stage_tflops: this stage's
                "gflops_per_step": gf, "total_tflops": round(own + (init["total_tflops"] if init else 0), 3),
                **({"stage_tflops": own, "init": init} if init else {}), "run_dir": str(runs_dir / job.name),
                "train": {"steps_done": train["steps_done"], "cut_short": train["cut_short"],
                          "wall_s": train["wall_s"],  # a resumed training: since its resume
                          **({"resumed_at": train["resumed_at"]} if "resumed_at" in train else {}),
                          **({"finished_before": True} if train.get("finished_before") else {}),
                          "samples_per_s": round(batch / sps_run, 2) if sps_run else None,
                          "final_losses": {k: v for k, v in train["last"].items() if k.startswith("loss/")}},
                "eval": ev}

    def init_of(job: Job) -> dict | None:
        """What a second stage started from: its first stage's record, in short."""
        if not job.init_of:
            return None
        rec = finished[job.init_of]
        return {"name": job.init_of, "config": rec["config"], "seed": rec["seed"], "lr": rec["lr"],
                "steps": rec["steps"], "total_tflops": rec["total_tflops"], "run_dir": rec.get("run_dir"),
                "cut_short": rec["train"]["cut_short"]}

    def save() -> None:  # after every job: a partial bench keeps its results
        doc["total_minutes"] = round((time.time() - t_start) / 60, 2)
        write_json(out, doc)

    done: dict = {}  # job key -> its record in doc["jobs"]
    finished: dict = {}  # job name -> its record (a second stage reads its first stage's run folder from it)
    extended: dict[str, int] = {}
    eval_lock = threading.Lock()
    pending, running = list(jobs), {}  # running: future -> (job, tree)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        while pending or running:
            job = next_ready(pending, running, chosen, choose_lr, finished)
            if job is not None and len(running) < args.parallel:
                if job.config in follow:
                    lr_info[job.config] = {"lr": job.lr, "how": f"{job.lr_of}'s (sweep)"}
                if job.key() in done:
                    done[job.key()]["phases"] += [ph for ph in job.phases if ph not in done[job.key()]["phases"]]
                    finished[job.name] = done[job.key()]
                    log(f"{job.name}: same training as {done[job.key()]['name']}, reused")
                    continue
                if job.key() in prior and (not configs[job.config].get("stage_of")
                                           or has_checkpoint(prior[job.key()][1].get("run_dir"))):
                    source, old = prior[job.key()]
                    record = {**copy.deepcopy(old), "name": job.name, "phases": list(job.phases),
                              "reused_from": old.get("reused_from", source)}
                    doc["jobs"].append(record)
                    done[job.key()] = finished[job.name] = record
                    log(f"{job.name}: taken over from {source} ({old['name']}): test kNN "
                        f"{100 * old['eval']['test'][SELECT_KEY]:.2f}, val kNN "
                        f"{100 * old['eval']['val'][SELECT_KEY]:.2f}")
                    save()
                    continue
                tree = job_tree(trees[job.config], runs_dir / job.name, job.steps, job.lr, job.seed, log_every)
                if args.save_every:
                    tree["train"]["save_every"] = args.save_every
                if job.init_of:  # a second stage starts from its first stage's run folder
                    tree["model"]["pretrained"] = finished[job.init_of]["run_dir"]
                limit = None
                if deadline is not None:  # keep the bench inside the budget: what is left is shared by expected time
                    rest = sum(cost_of.get(j.name, 0.0) for j in pending + [r[0] for r in running.values()])
                    mine = cost_of.get(job.name) or cost(job.config, job.steps)
                    limit = max(60.0, (deadline - time.time()) * args.parallel * mine / max(rest + mine, 1e-9))
                neighbours = startable(pending, finished, chosen, set(prior) | set(done))
                threads = run_threads(min(args.parallel, len(running) + 1 + len(neighbours)))
                log(f"training {job.name}: {job.steps} steps, lr {job.lr:g}, seed {job.seed}, batch "
                    f"{tree['data']['batch']}" + (f", from {job.init_of}" if job.init_of else "")
                    + (f", time limit {limit:.0f} s" if limit else "")
                    + (f" ({len(running) + 1} running, {threads.get('OMP_NUM_THREADS', 'all')} threads)"
                       if args.parallel > 1 else ""))
                running[pool.submit(train_and_evaluate, job, tree, limit, threads)] = (job, tree)
                continue
            if job is not None:  # no free slot: it waits at the head of the queue
                pending.insert(0, job)
            if not running:
                raise RuntimeError(f"bench_quality: no job can start ({[j.name for j in pending]})")
            completed, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in completed:
                job, tree = running.pop(fut)
                train, ev = fut.result()
                record = record_of(job, tree, train, ev)
                doc["jobs"].append(record)
                done[job.key()] = finished[job.name] = record
                save()
    doc["lr"] = lr_info
    save()
    print()
    print(report(doc))
    print(f"\nwrote {out}  (total {doc['total_minutes']:.1f} min)")
    return 0


def next_ready(pending: list[Job], running: dict, chosen: dict[str, float], choose_lr,
               finished: dict | None = None) -> Job | None:
    """Take the first job of ``pending`` that can start now, in plan order: its lr is known (given, or its run's
    sweep is over and chosen: ``choose_lr(run)`` may instead return one more sweep job, which is taken first), the
    job it starts from (``init_of``, a second stage's first stage) is among ``finished`` (name -> record; its key
    becomes the job's ``init``), and no running job trains the same thing (it then reuses that one's result). None
    when every pending job waits."""
    finished = finished or {}
    busy = {j.key() for j, _ in running.values()}
    sweeping = {j.config for j, _ in running.values() if "sweep" in j.phases}
    sweeping |= {j.config for j in pending if "sweep" in j.phases and j.lr is not None}
    def init_known(job: Job) -> bool:  # a job starting from another's run may go once that one has finished
        if job.init_of:
            if job.init_of not in finished:
                return False
            rec = finished[job.init_of]
            job.init = trained(rec)
        return True

    for i, job in enumerate(pending):
        if not init_known(job):
            continue
        if job.lr is None:
            if job.lr_of not in chosen:
                if job.lr_of in sweeping:
                    continue
                extra = choose_lr(job.lr_of)
                if extra is not None:  # one more sweep job (a second stage's: from the same first stage, finished)
                    init_known(extra)
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
            key = trained(rec)
            if rec.get("init"):  # a second stage: the same only from the same first stage
                key += (trained(rec["init"]),)
            out[key] = (f"{path} of {old['created']}", rec)
    return out


def has_checkpoint(run_dir: str | None) -> bool:
    """A first stage's run taken over from an earlier bench serves a second stage only while its folder holds a
    checkpoint."""
    return bool(run_dir) and any((Path(run_dir) / "checkpoints").glob("step_*"))


def results_doc(args, argv, info, n_val, runs, seeds, lrs, steps, batch, configs, lr_info, calib) -> dict:
    """The results JSON::

        benchmark, version, quick, argv, created, batch_size, split {test, labeled, paired, unlabeled}, split_seed,
        val {n, source, selection}, runs [run names], reference, reference_steps, seeds, lrs, sweep_fraction,
        flop_steps, configs {name: {run, change, objectives, text_trained, batch, mask_ratio, model,
                                    gflops_per_step, forward_gflops {part: GFLOPs}, equal_flops_steps}},
        lr {run: {lr, how: sweep|given|config}}, calibration, plan {estimated_minutes, jobs},
        jobs [{name, config, phases [sweep|seed|stage1|ablation|equal-steps], seed, lr, steps, warmup,
               gflops_per_step, total_tflops, run_dir, train {steps_done, cut_short, wall_s, samples_per_s,
               final_losses}, eval {test {knn_top1/*, linear_top1/*, zeroshot_top1/*, n, n_probe_train}, val {...},
               eval_s}}],
        total_minutes

    A two-stage run's config has ``stages`` [first, second], ``first_stage_share`` (and how it was set) and
    ``select`` (its sweep's validation key); its first stage's config has ``stage_of``. A second stage's job has
    ``init`` {name, config, seed, lr, steps, total_tflops, run_dir, cut_short} (the first stage it started from),
    ``stage_tflops`` (its own) and ``total_tflops`` of both stages.

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


def trained(record: dict) -> tuple:
    """What a job's record trained (config, seed, lr, steps): the key of a first stage in its second's key."""
    return record["config"], record["seed"], record["lr"], record["steps"]


def startable(pending: list[Job], finished: dict, chosen: dict[str, float], known: set) -> list[Job]:
    """The pending jobs that may train beside a job starting now (a lone job whose followers all wait on it gets
    every core): not those that wait on a first stage still to be trained, nor those whose training is ``known``
    (a key taken over from an earlier bench or trained in this one)."""
    def trains(job: Job) -> bool:
        if job.init_of and job.init_of not in finished:
            return False
        lr = job.lr if job.lr is not None else chosen.get(job.lr_of)
        if lr is None:  # its lr is still to be chosen: it may well train
            return True
        return job.key(lr, trained(finished[job.init_of]) if job.init_of else None) not in known

    return [j for j in pending if trains(j)]


def run_threads(parallel: int) -> dict:
    """The environment of each training when ``parallel`` run side by side: the machine's cores split between them
    (torch's default, one thread per core in every process, makes N processes fight over the same cores)."""
    if parallel == 1:
        return {}
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}



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

