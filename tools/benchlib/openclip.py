"""open_clip_train, the real trainer, run on shards beside vlp: ``python -m open_clip_train.main`` through a
wrapper that registers a model config first, with webdataset 0.2.86 first on its PYTHONPATH; its timing windows."""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from benchlib import REPO
from benchlib.process import run_subprocess
from benchlib.wds_old import pythonpath

TINY_VIT = REPO / "configs" / "models" / "vlp-tiny-vit.json"
OPENCLIP_WRAPPER = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                    "from open_clip_train.main import main; sys.exit(main(sys.argv[2:]) or 0)")

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


def run_openclip(shards: Path, run_dir: Path, wds_dir: Path, args, model_json: Path = TINY_VIT,
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
    env = dict(os.environ, PYTHONPATH=pythonpath(wds_dir), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    res = run_subprocess(cmd, run_dir / "stdout.log", env, REPO)
    log_file = run_dir / "run" / "out.log"
    text = log_file.read_text() if log_file.is_file() else ""
    if res["rc"] != 0 or not text:
        tail = (run_dir / "stdout.log").read_text()[-2500:]
        raise RuntimeError(f"open_clip_train failed (exit {res['rc']}):\n{tail}")
    res["windows"] = openclip_windows(text, args.batch_size)
    return res

