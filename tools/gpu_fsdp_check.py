#!/usr/bin/env python
"""FSDP through accelerate on one GPU process: train, checkpoint, resume, export, load the export with open_clip.

    python tools/gpu_fsdp_check.py               # a GPU: accelerate launch --config_file configs/accelerate/fsdp.yaml
                                                 #   --num_processes 1 -m vlp.train (FSDP1, SHARDED_STATE_DICT, bf16)
    python tools/gpu_fsdp_check.py --no-fsdp     # every other part, anywhere: python -m vlp.train (CPU: fp32)

On a machine without CUDA the FSDP mode prints why it cannot run (accelerate runs FSDP on GPUs only) and exits 0.

Steps, all on the demo's digits shards (``vlp.demo.write_demo_shards``) with the mixed recipe (CLIP/UniCL + MAE +
supervised) and a momentum teacher (pseudo-labels on the unlabeled rows), 2 data workers:

1. ``ref``: ``--steps`` steps, a checkpoint every ``--resume-at`` steps (under FSDP: accelerate's sharded model
   and optimizer, ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, plus vlp's gathered ``model.safetensors``).
2. ``resumed``: a fresh output folder, ``--resume ref/checkpoints/step_<resume-at>``, to ``--steps``: what a run
   killed after that checkpoint and resumed does.
3. The resumed run's losses at every step after the checkpoint against ``ref``'s (the first step after the resume
   comes from exactly the saved state: a tight tolerance; later ones a GPU's non-deterministic kernels may move
   slightly: ``--rtol``), and the final weights and teacher of both.
4. Under FSDP: the checkpoint really is FSDP's (the sharded folder is there) and its sharded model, read back
   through ``vlp.checkpoint.read_weights``, equals vlp's gathered ``model.safetensors``.
5. ``vlp export`` of the resumed run; ``open_clip.create_model_and_transforms("local-dir:...")`` and its tokenizer
   load it; its weights equal the checkpoint's CLIP weights and its image and text embeddings equal those of the
   model vlp builds from the checkpoint.

Prints one line per check and exits 1 if any fails (2 if a training or the export fails), naming what differs.
``--out`` writes the checks as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # vlp from this checkout, as its subprocesses get it (PYTHONPATH)
    sys.path.insert(0, str(REPO))


class Failed(RuntimeError):
    """A training or the export did not finish: exit 2 with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_tree(data: Path, out_dir: Path, model: str, steps: int, save_every: int, workers: int, gpu: bool) -> dict:
    return {
        "output_dir": str(out_dir),
        "seed": 0,
        "model": {"name": model, "mask_ratio": 0.75},
        "data": {
            "sources": [
                {"name": "pairs", "kind": "paired", "shards": str(data / "paired" / "*.tar")},
                {"name": "lab", "kind": "labeled", "shards": str(data / "labeled" / "*.tar")},
                {"name": "unlab", "kind": "unlabeled", "shards": str(data / "unlabeled" / "*.tar")},
            ],
            "batch": {"paired": 16, "labeled": 8, "unlabeled": 8},
            "workers": workers,
            "shuffle_buffer": 50,
            "templates": ["a photo of the digit {c}.", "the number {c}."],
        },
        "objectives": {"contrastive": {"weight": 1.0, "labels_as_text": True},
                       "mae": {"weight": 0.5, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
                       "supervised": {"weight": 0.5},
                       "pseudolabel": {"weight": 0.5}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": steps, "log_every": 1, "save_every": save_every, "keep_last": 100, "progress": False,
                  "precision": "bf16" if gpu else "no"},
    }


def launch(tree: dict, work: Path, name: str, fsdp: bool, extra: tuple[str, ...] = ()) -> Path:
    """Train ``tree`` (FSDP: accelerate launch with configs/accelerate/fsdp.yaml, one process; else python -m
    vlp.train); returns its run folder. Raises :class:`Failed` with the log's tail."""
    import yaml

    cfg = work / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    if fsdp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
               "--main_process_port", str(free_port()), "-m", "vlp.train"]
    else:
        cmd = [sys.executable, "-m", "vlp.train"]
    cmd += ["--config", str(cfg), *extra]
    pypath = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONPATH=str(REPO) + (os.pathsep + pypath if pypath else ""))
    t0 = time.time()
    log_path = work / f"{name}.log"
    with open(log_path, "w") as logf:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    print(f"[gpu_fsdp_check] {name}: {' '.join(cmd[2:6]) if fsdp else 'python -m vlp.train'} ... exit {rc} "
          f"({time.time() - t0:.0f} s)", flush=True)
    if rc != 0:
        raise Failed(f"{name} failed (exit {rc}); {log_path} ends:\n{log_path.read_text()[-3000:]}")
    return Path(tree["output_dir"])


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["step"]] = {k: v for k, v in rec.items() if k.startswith("loss/")}
    return out


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def max_abs_diff(a: dict, b: dict) -> tuple[float, list[str]]:
    """(largest |a - b| over the common tensors, the keys that only one has or whose shapes differ)."""
    bad = sorted(set(a) ^ set(b)) + [k for k in set(a) & set(b) if a[k].shape != b[k].shape]
    diff = max(((a[k].float() - b[k].float()).abs().max().item() for k in set(a) & set(b)
                if a[k].shape == b[k].shape and a[k].numel()), default=0.0)
    return diff, bad


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, name: str, ok: bool, detail: str) -> bool:
        self.rows.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if not r["ok"]]


def check_resume(check: Checks, ref: Path, resumed: Path, resume_at: int, steps: int, rtol_first: float,
                 rtol: float, atol_weights: float) -> None:
    from safetensors.torch import load_file

    from vlp import checkpoint as ckpt_io

    a, b = losses(ref), losses(resumed)
    missing = [s for s in range(resume_at + 1, steps + 1) if s not in a or s not in b]
    if not check("losses logged", not missing, f"steps {resume_at + 1}..{steps} in both runs"
                 + (f"; missing {missing}" if missing else "")):
        return
    first = max(rel_diff(b[resume_at + 1][k], a[resume_at + 1][k]) for k in a[resume_at + 1])
    check("first step after resume", first <= rtol_first,
          f"step {resume_at + 1}: largest relative loss difference {first:.2e} (tolerance {rtol_first:g}); "
          + ", ".join(f"{k} {b[resume_at + 1][k]:.6g} vs {a[resume_at + 1][k]:.6g}" for k in sorted(a[resume_at + 1])))
    worst, where = 0.0, None
    for s in range(resume_at + 1, steps + 1):
        keys = set(a[s]) | set(b[s])
        if set(a[s]) != set(b[s]):
            check("same losses", False, f"step {s}: loss keys differ: {sorted(keys - (set(a[s]) & set(b[s])))}")
            return
        for k in keys:
            d = rel_diff(b[s][k], a[s][k])
            if d > worst:
                worst, where = d, f"step {s} {k}: {b[s][k]:.6g} resumed vs {a[s][k]:.6g} uninterrupted"
    check("losses after resume", worst <= rtol, f"largest relative difference {worst:.2e} over steps "
          f"{resume_at + 1}..{steps} (tolerance {rtol:g})" + (f"; {where}" if where else ""))
    end_a, end_b = ckpt_io.checkpoint_dir(ref, steps), ckpt_io.checkpoint_dir(resumed, steps)
    diff, bad = max_abs_diff(ckpt_io.model_state_dict(end_b), ckpt_io.model_state_dict(end_a))
    check("final weights", not bad and diff <= atol_weights,
          f"step {steps}: largest |difference| {diff:.2e} (tolerance {atol_weights:g})" + (f"; keys differ: {bad[:5]}" if bad else ""))
    ta, tb = ckpt_io.teacher_file(end_a), ckpt_io.teacher_file(end_b)
    if ta is None or tb is None:
        check("final teacher", False, f"teacher weights missing: {end_a if ta is None else end_b}")
    else:
        diff, bad = max_abs_diff(load_file(str(tb)), load_file(str(ta)))
        check("final teacher", not bad and diff <= atol_weights,
              f"{tb.name}: largest |difference| {diff:.2e} (tolerance {atol_weights:g})" + (f"; keys differ: {bad[:5]}" if bad else ""))


def check_fsdp_checkpoint(check: Checks, ckpt: Path) -> None:
    from vlp import checkpoint as ckpt_io

    sharded = ckpt / "pytorch_model_fsdp_0"
    have = sorted(p.name for p in ckpt.iterdir())
    if not check("FSDP checkpoint", sharded.is_dir() and (ckpt / "model.safetensors").is_file(),
                 f"{ckpt.name} holds {', '.join(have)} (needs pytorch_model_fsdp_0/ from accelerate's FSDP save "
                 f"and vlp's gathered model.safetensors)"):
        return
    diff, bad = max_abs_diff(ckpt_io.read_weights(sharded), ckpt_io.read_weights(ckpt / "model.safetensors"))
    check("sharded = gathered", not bad and diff == 0.0,
          f"pytorch_model_fsdp_0 read back vs model.safetensors: largest |difference| {diff:.2e}"
          + (f"; keys differ: {bad[:5]}" if bad else ""))


def check_export(check: Checks, run: Path, export: Path, work: Path) -> None:
    import open_clip
    import torch

    from vlp import checkpoint as ckpt_io
    from vlp.models.factory import create_clip, run_clip_options

    proc = subprocess.run([sys.executable, "-m", "vlp.cli", "export", "--checkpoint", str(run), "--out", str(export)],
                          cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + (
                              os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")))
    (work / "export.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise Failed(f"vlp export failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    ckpt = ckpt_io.find_checkpoint(run)
    want = ckpt_io.clip_state_dict(ckpt)
    try:
        loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    except Exception as err:  # any failure to load is the finding
        check("open_clip loads the export", False, f"{type(err).__name__}: {err}")
        return
    check("open_clip loads the export", True, f"create_model_and_transforms('local-dir:{export.name}') and its tokenizer")
    got = loaded.state_dict()
    diff, bad = max_abs_diff(got, want)
    check("export weights", not bad and diff == 0.0, f"{len(got)} tensors vs the checkpoint's clip.*: largest "
          f"|difference| {diff:.2e}" + (f"; keys differ: {bad[:5]}" if bad else ""))
    cfg = ckpt_io.read_run_config(ckpt)
    ref, _, _ = create_clip(cfg.model.name, pretrained_text=False, **run_clip_options(cfg))
    ref.load_state_dict(want, strict=True)
    size = loaded.visual.image_size
    size = size if isinstance(size, int) else size[0]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = tokenizer(["a photo of the digit 3.", "the number 7.", "a photo of the digit 0.", "nine"])
    with torch.no_grad():
        loaded.eval(), ref.eval()
        di = (loaded.encode_image(images) - ref.encode_image(images)).abs().max().item()
        dt = (loaded.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item()
    check("export embeddings", di <= 1e-5 and dt <= 1e-5,
          f"open_clip's model vs vlp's from the checkpoint: image {di:.2e}, text {dt:.2e} (tolerance 1e-05)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-fsdp", action="store_true", help="python -m vlp.train instead of accelerate launch with FSDP")
    p.add_argument("--model", default="vlp-test-vit", help="open_clip name or JSON (default: vlp-test-vit)")
    p.add_argument("--steps", type=int, default=6, help="training steps (default: 6)")
    p.add_argument("--resume-at", type=int, default=3, help="the checkpoint step the second run resumes from (default: 3)")
    p.add_argument("--workers", type=int, default=2, help="data workers (default: 2)")
    p.add_argument("--rtol-first", type=float, default=None,
                   help="relative loss tolerance, first step after the resume (default: 1e-5 CPU, 1e-4 GPU)")
    p.add_argument("--rtol", type=float, default=None, help="relative loss tolerance, every step after the resume "
                   "(default: 1e-5 CPU, 1e-2 GPU: bf16 and non-deterministic GPU kernels)")
    p.add_argument("--atol-weights", type=float, default=None,
                   help="absolute tolerance, final weights and teacher (default: 1e-6 CPU, 1e-3 GPU)")
    p.add_argument("--work", default=str(REPO / "bench_out" / "fsdp-check"), help="runs, logs (replaced)")
    p.add_argument("--out", default=None, help="the checks as JSON")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    fsdp = not args.no_fsdp
    mode = "FSDP (accelerate, 1 process)" if fsdp else "no FSDP (python -m vlp.train)"
    if fsdp and not gpu:
        print("gpu_fsdp_check: SKIPPED: no CUDA device, and accelerate runs FSDP on GPUs only (configs/accelerate/"
              "fsdp.yaml); `--no-fsdp` runs every other part of this check (train, checkpoint, resume, export, "
              "open_clip load) here")
        if args.out:
            Path(args.out).write_text(json.dumps({"mode": mode, "skipped": "no CUDA device"}, indent=1) + "\n")
        return 0
    if not 0 < args.resume_at < args.steps:
        p.error("--resume-at must be between 0 and --steps")
    rtol_first = args.rtol_first if args.rtol_first is not None else (1e-4 if gpu else 1e-5)
    rtol = args.rtol if args.rtol is not None else (1e-2 if gpu else 1e-5)
    atol_w = args.atol_weights if args.atol_weights is not None else (1e-3 if gpu else 1e-6)
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    from vlp.demo import write_demo_shards

    t0 = time.time()
    write_demo_shards(work / "data", maxcount=100)
    print(f"[gpu_fsdp_check] {mode}, {'cuda ' + torch.cuda.get_device_name(0) if gpu else 'cpu'}, model {args.model}, "
          f"{args.steps} steps, resume at {args.resume_at}; torch {torch.__version__}", flush=True)
    check = Checks()
    status = 0
    try:
        tree = run_tree(work / "data", work / "ref", args.model, args.steps, args.resume_at, args.workers, gpu)
        ref = launch(tree, work, "ref", fsdp)
        from vlp import checkpoint as ckpt_io

        at = ckpt_io.checkpoint_dir(ref, args.resume_at)
        if not check("checkpoints", at.is_dir() and ckpt_io.checkpoint_dir(ref, args.steps).is_dir(),
                     f"ref wrote {[c.name for c in ckpt_io.list_checkpoints(ref)]}"):
            raise Failed(f"no checkpoint {at}")
        if fsdp:
            check_fsdp_checkpoint(check, at)
        tree = run_tree(work / "data", work / "resumed", args.model, args.steps, args.resume_at, args.workers, gpu)
        resumed = launch(tree, work, "resumed", fsdp, ("--resume", str(at)))
        check_resume(check, ref, resumed, args.resume_at, args.steps, rtol_first, rtol, atol_w)
        check_export(check, resumed, work / "export", work)
    except Failed as err:
        print(f"gpu_fsdp_check: FAILED: {err}", flush=True)
        check("finished", False, str(err).splitlines()[0])
        status = 2
    if not status and check.failed:
        status = 1
    verdict = ("PASSED" if not status else
               f"FAILED ({', '.join(r['check'] for r in check.failed)})")
    print(f"gpu_fsdp_check: {mode}: {verdict}, {len(check.rows)} checks, {time.time() - t0:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"mode": mode, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                                              "passed": status == 0, "checks": check.rows, "args": vars(args)},
                                             indent=1) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
