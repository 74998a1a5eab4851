"""A bench's trainings: a run config adapted to the bench (shards, batch, lr, steps, warm-up), trained in one
``python -m vlp.train`` subprocess, timed from its metrics; training FLOPs per step counted by ``vlp.flops``."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import REPO
from benchlib.cifar import CLASSNAMES
from benchlib.cli import log


def validated(tree: dict):
    from vlp.config import config_from_dict

    return config_from_dict(tree, check_files=False)


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


RECORD = "bench_train.json"  # launch's record of a training that ran to its end


def last_step(tree: dict, run_dir: Path) -> int | None:
    """The step of the last checkpoint of a training of this very config (``run_dir/bench_config.yaml`` equal to
    ``tree``); None when there is none (no folder, another config, no checkpoint, unreadable leftovers)."""
    import yaml

    from vlp.checkpoint import list_checkpoints, read_run_info

    cfg_path = run_dir / "bench_config.yaml"
    try:
        if not cfg_path.is_file() or yaml.safe_load(cfg_path.read_text()) != tree:
            return None
        found = list_checkpoints(run_dir)
        return read_run_info(found[-1])["step"] if found else None
    except (OSError, ValueError, KeyError, yaml.YAMLError):  # unreadable leftovers: train afresh
        return None


def unfinished_step(tree: dict, run_dir: Path) -> int | None:
    """The step of the last checkpoint that a stopped training of this very config left short of its steps; None
    when there is none (no folder, another config, a finished run)."""
    step = last_step(tree, run_dir)
    return step if step is not None and step < tree["train"]["steps"] else None


def finished_record(tree: dict, run_dir: Path) -> dict | None:
    """``launch``'s record of a training of this very config that ran to its end (a bench stopped while evaluating
    it); None when there is none."""
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if last_step(tree, run_dir) != tree["train"]["steps"] or record.get("steps_done") != tree["train"]["steps"]:
        return None
    return record


def launch(tree: dict, run_dir: Path, time_limit: float | None = None, env_extra: dict | None = None,
           resume: bool = False) -> dict:
    """Train one config in a ``python -m vlp.train`` subprocess (``env_extra``: e.g. its CPU threads when runs share
    the machine). A run past ``time_limit`` seconds gets SIGTERM: vlp checkpoints the current step and exits (the
    run is then marked ``cut_short``). ``resume``: a training of the same config that was stopped (a killed bench,
    a time limit) continues from its last checkpoint (``vlp.train --resume auto``, which restores the data stream,
    optimizer and schedules) instead of starting over; ``resumed_at`` says from which step. One that ran to its end
    is not trained again: its record comes back with ``finished_before: True``."""
    import signal

    import yaml

    done = finished_record(tree, run_dir) if resume else None
    if done is not None:
        log(f"{run_dir.name}: trained to its end before; taken as it is")
        return {**done, "metrics": read_metrics(run_dir), "finished_before": True}
    at = unfinished_step(tree, run_dir) if resume else None
    if at is None:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
    else:
        log(f"{run_dir.name}: resuming its stopped training from step {at} of {tree['train']['steps']}")
    cfg_path = run_dir / "bench_config.yaml"
    cfg_path.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env_extra or {}))
    t0 = time.time()
    cut = False
    argv = [sys.executable, "-m", "vlp.train", "--config", str(cfg_path)] + ([] if at is None else ["--resume", "auto"])
    with open(run_dir / "train.log", "w" if at is None else "a") as logf:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT)
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
    record = {"wall_s": round(wall, 1), "steps_done": state["step"],
              "cut_short": cut or state["step"] < tree["train"]["steps"], "last": state.get("metrics", {}),
              **({} if at is None else {"resumed_at": at})}
    if not record["cut_short"]:
        (run_dir / RECORD).write_text(json.dumps(record))
    return {**record, "metrics": read_metrics(run_dir)}


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def seconds_per_step(metrics: list[dict], batch_total: int, skip_steps: int) -> float | None:
    """Mean seconds per step over the logged windows after ``skip_steps`` (each window: log_every steps; a resumed
    run logs again the steps after its checkpoint: the last record of a step counts)."""
    rows = sorted({m["step"]: m for m in metrics if "samples_per_s" in m}.values(), key=lambda m: m["step"])
    steps_prev, t, n = 0, 0.0, 0
    for m in rows:
        window = m["step"] - steps_prev
        if steps_prev >= skip_steps:
            t += window * batch_total / m["samples_per_s"]
            n += window
        steps_prev = m["step"]
    return t / n if n else None


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


def equal_flops_steps(steps: int, ref_flops: float, flops: float) -> int:
    return max(1, round(steps * ref_flops / flops))
