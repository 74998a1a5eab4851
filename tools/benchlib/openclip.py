"""open_clip_train beside vlp: the real trainer run on shards (``python -m open_clip_train.main`` through a wrapper
that registers a model config first, with webdataset 0.2.86 first on its PYTHONPATH) and its timing windows; and
its training step rebuilt in process (:class:`OpenClipStep`) from the same command line, so it can be timed with
the GPU synchronized."""
from __future__ import annotations

import math
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
    mean data-wait and step seconds over the steps since the previous line (its meters reset at each line).

    ``Batch (t)`` is wall time from one step's end to the next one's (the intervals add up to the loop's wall time),
    so the rate from it is honest end to end. Neither it nor ``Data (t)`` is GPU time: open_clip_train never
    synchronizes inside a step, and the GPU work it queued finishes while the next ``Data (t)`` is being timed (the
    ``.item()`` of a log line waits for it there), so ``Batch (t) - Data (t)`` is not the step's compute."""
    windows, prev = [], 0
    for m in LINE.finditer(log_text):
        done = int(m.group(1)) // batch
        n = done - prev
        if n > 0:
            windows.append((prev + 1, done, n * float(m.group(3)), n * float(m.group(2))))
        prev = done
    return windows


def openclip_argv(model_json: Path, steps: int, batch: int, precision: str = "fp32", workers: int = 1,
                  extra: tuple[str, ...] = (), log_every: int = 1, train_data: str = "unused",
                  logs: str = "unused") -> list[str]:
    """open_clip_train's command line for a run of ``steps`` steps of ``batch`` on ``model_json`` (registered by
    its stem name): the one :func:`run_openclip` launches and :class:`OpenClipStep` parses."""
    return ["--dataset-type", "webdataset", "--train-data", train_data, "--dataset-resampled",
            "--train-num-samples", str(steps * batch), "--model", Path(model_json).stem,
            "--precision", precision, "--batch-size", str(batch), "--workers", str(workers),
            "--epochs", "1", "--lr", "1e-3",
            "--warmup", "10", "--wd", "0.2", "--report-to", "", "--log-every-n-steps", str(log_every),
            "--save-frequency", "0", "--seed", "0", "--logs", logs, "--name", "run", *extra]


def run_openclip(shards: Path, run_dir: Path, wds_dir: Path, args, model_json: Path = TINY_VIT,
                 precision: str = "fp32", workers: int = 1, extra: tuple[str, ...] = (), log_every: int = 1,
                 steps: int | None = None) -> dict:
    """open_clip_train on the paired shards; ``model_json`` is registered with open_clip and trained by its stem
    name (tools/bench_gpu.py passes other models, ``amp_bf16``, more workers, ``--torchcompile``, a log line every
    ``log_every`` steps and its own step count)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    urls = sorted((shards / "paired").glob("*.tar"))
    spec = str(shards / "paired" / f"{urls[0].name.rsplit('-', 1)[0]}-{{000000..{len(urls) - 1:06d}}}.tar")
    cmd = [sys.executable, "-c", OPENCLIP_WRAPPER, str(model_json),
           *openclip_argv(model_json, steps or args.steps, args.batch_size, precision, workers, extra, log_every,
                          train_data=spec, logs=str(run_dir))]
    env = dict(os.environ, PYTHONPATH=pythonpath(wds_dir), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    res = run_subprocess(cmd, run_dir / "stdout.log", env, REPO)
    log_file = run_dir / "run" / "out.log"
    text = log_file.read_text() if log_file.is_file() else ""
    if res["rc"] != 0 or not text:
        tail = (run_dir / "stdout.log").read_text()[-2500:]
        raise RuntimeError(f"open_clip_train failed (exit {res['rc']}):\n{tail}")
    res["windows"] = openclip_windows(text, args.batch_size)
    return res


class OpenClipStep:
    """open_clip_train's training step in this process: the model, loss, optimizer, schedule and autocast that
    ``open_clip_train.main`` builds from :func:`openclip_argv`'s command line (``create_model_and_transforms`` with
    ``output_dict=True``, ``create_loss`` = ClipLoss, AdamW with no decay on gains and biases, cosine schedule, no
    GradScaler unless ``--precision amp``, ``--torchcompile`` / ``--grad-checkpointing`` as main applies them), and
    ``train_one_epoch``'s step body (``accum_freq`` 1): scheduler, inputs to the device, ``zero_grad``, forward and
    loss under autocast, backward, optimizer step, logit-scale clamp. :meth:`step` runs it in four parts with a
    ``sync`` callable between them, so each part is timed with the device idle."""

    def __init__(self, model_json: Path, device, steps: int, batch: int, precision: str,
                 extra: tuple[str, ...] = ()):
        import open_clip
        import torch
        from open_clip import create_loss, create_model_and_transforms, get_input_dtype
        from open_clip_train.params import parse_args
        from open_clip_train.precision import get_autocast
        from open_clip_train.scheduler import cosine_lr

        open_clip.add_model_config(str(model_json))
        self.argv = openclip_argv(model_json, steps, batch, precision, extra=extra)
        args = parse_args(self.argv)
        args.device, args.rank, args.local_rank, args.world_size = str(device), 0, 0, 1
        args.distributed, args.horovod = False, False
        args.distill = args.distill_model is not None and args.distill_pretrained is not None  # as main sets them
        self.args, self.device = args, device
        torch.manual_seed(args.seed)
        model, _, _ = create_model_and_transforms(
            args.model, args.pretrained, precision=args.precision, device=device, jit=args.torchscript,
            force_quick_gelu=args.force_quick_gelu, force_custom_text=args.force_custom_text,
            force_patch_dropout=args.force_patch_dropout, force_image_size=args.force_image_size,
            force_context_length=args.force_context_length, image_mean=args.image_mean, image_std=args.image_std,
            image_interpolation=args.image_interpolation, image_resize_mode=args.image_resize_mode,
            aug_cfg=args.aug_cfg, pretrained_image=args.pretrained_image, output_dict=True,
            cache_dir=args.cache_dir)
        if args.grad_checkpointing:
            model.set_grad_checkpointing()
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": args.wd}],
            lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
        self.scaler = torch.amp.GradScaler(device=device.type) if args.precision == "amp" else None
        self.scheduler = cosine_lr(self.optimizer, args.lr, args.warmup, steps)
        model.train()  # train_one_epoch's model.train()
        self.original = model
        self.model = torch.compile(model) if args.torchcompile else model
        self.loss = create_loss(args)
        self.autocast = get_autocast(args.precision, device_type=device.type)
        self.input_dtype = get_input_dtype(args.precision)

    def losses(self, images, texts):
        """Forward and loss as ``train_one_epoch`` computes them (under autocast); returns the total loss."""
        with self.autocast():
            out = self.model(images, texts)
            losses = self.loss(**out, output_dict=True)
            return sum(losses.values())

    def step(self, step: int, host_images, host_texts, sync) -> tuple[list[float], object]:
        """One training step; returns (seconds of data, forward, backward, optimizer; the loss)."""
        import time

        import torch

        sync()
        t0 = time.perf_counter()
        self.scheduler(step)
        images = host_images.to(device=self.device, dtype=self.input_dtype, non_blocking=True)
        texts = host_texts.to(device=self.device, non_blocking=True)
        sync()
        t1 = time.perf_counter()
        self.optimizer.zero_grad()
        total = self.losses(images, texts)
        sync()
        t2 = time.perf_counter()
        if self.scaler is not None:
            self.scaler.scale(total).backward()
        else:
            total.backward()
        sync()
        t3 = time.perf_counter()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        with torch.no_grad():
            self.original.logit_scale.clamp_(0, math.log(100))
        sync()
        t4 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t4 - t3], total.detach()

    def count_flops(self, host_images, host_texts) -> float:
        """FLOPs of one step (forward, loss, backward; ``FlopCounterMode``, as ``vlp.flops`` counts vlp's step) on
        the uncompiled model."""
        from torch.utils.flop_counter import FlopCounterMode

        model, self.model = self.model, self.original
        try:
            self.original.train()
            counter = FlopCounterMode(display=False)
            with counter:
                total = self.losses(host_images.to(self.device, dtype=self.input_dtype), host_texts.to(self.device))
                total.backward()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.model = model
        return counter.get_total_flops()
