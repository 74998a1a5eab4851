"""Training speed from a trainer's own timing windows: ``(first step, last step, step seconds, data seconds)`` per
logged window (steps 1-based), read from vlp's ``metrics.jsonl`` here and from open_clip_train's ``Batch (t)`` /
``Data (t)`` log lines in :mod:`benchlib.openclip`."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from benchlib import REPO
from benchlib.process import run_subprocess


def vlp_windows(metrics_path: Path, batch: int) -> list[tuple[int, int, float, float]]:
    """vlp's ``metrics.jsonl`` windows: ``samples_per_s`` and ``data_wait_frac`` per ``log_every`` steps."""
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


def windows_rate(windows: list[tuple[int, int, float, float]], batch: int, warmup: int) -> dict | None:
    """samples/s, step seconds and the data-wait share over the windows that start after ``warmup``
    (``steps_measured``: the steps they hold); None when there are none."""
    used = [w for w in windows if w[0] > warmup]
    steps = sum(last - first + 1 for first, last, _, _ in used)
    t, d = sum(w[2] for w in used), sum(w[3] for w in used)
    if not steps or t <= 0:
        return None
    return {"samples_per_s": batch * steps / t, "step_s": t / steps, "data_wait_frac": d / t, "steps_measured": steps}


def timed_vlp_run(tree: dict, run_dir: Path, batch: int, name: str, root: Path = REPO) -> dict:
    """Train ``tree`` in a fresh ``run_dir`` with ``python -m vlp.train`` and return :func:`run_subprocess`'s
    record plus its ``windows``; ``root``: the checkout whose ``vlp`` runs (an older one is put first on the path and
    made the working directory, so ``-m`` finds it before this one)."""
    import yaml

    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    tree = {**tree, "output_dir": str(run_dir)}
    cfg = run_dir / "bench_config.yaml"
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if Path(root) != REPO:
        env["PYTHONPATH"] = os.pathsep.join([str(root)] + [x for x in [env.get("PYTHONPATH")] if x])
    res = run_subprocess([sys.executable, "-m", "vlp.train", "--config", str(cfg)], run_dir / "stdout.log", env, root)
    if res["rc"] != 0 or not (run_dir / "metrics.jsonl").is_file():
        tail = (run_dir / "stdout.log").read_text()[-2500:]
        raise RuntimeError(f"vlp {name} failed (exit {res['rc']}):\n{tail}")
    res["windows"] = vlp_windows(run_dir / "metrics.jsonl", batch)
    return res
