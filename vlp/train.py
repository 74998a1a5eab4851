"""The trainer: ``accelerate launch -m vlp.train --config configs/X.yaml [key=value ...]``.

Accelerate owns devices, DDP, mixed precision and state saving; :class:`vlp.task.PretrainTask` owns the step
(student, objectives, momentum teacher, masking). The trainer holds the loop: the mixed-data stream, accumulation,
clipping, non-finite-loss guards and signal-safe exits. AdamW with decay only on weight matrices and warmup + cosine
are :mod:`vlp.optim`'s; atomic keep-last-K checkpoints with exact resume :class:`vlp.checkpointer.Checkpointer`'s;
progress and metrics :mod:`vlp.train_log`'s; in-training evaluation :mod:`vlp.eval.in_training`'s. It has no
objective-specific line.

Under FSDP (``configs/accelerate/fsdp.yaml``) the student's 0-dim parameters become [1] before the optimizer
(``vlp.task.fsdp_ready``), each checkpoint adds the gathered full weights as ``model.safetensors`` beside
accelerate's sharded state, and in-training evaluation runs on a gathered copy on rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from vlp import checkpoint as ckpt_io
from vlp.checkpointer import Checkpointer, CheckpointWriteError
from vlp.config import KINDS, Config, ConfigError, dump_config, load_config
from vlp.data.device_decode import DeviceDecoder
from vlp.data.mixing import POLL_S, MixedBatches, close_loader, make_loader
from vlp.data.sources import NoUsableData, build_sources
from vlp.data.transforms import eval_transform, resolve_templates, train_transform
from vlp.data_wait import STOP_GRACE_S, DataTimeout, next_batch
from vlp.eval.in_training import evaluate_student
from vlp.optim import build_optimizer
from vlp.run_dir import RunDirBusy, check_writable, lock_run_dir
from vlp.task import PretrainTask
from vlp.train_log import Progress, flat_hparams, quiet_library_logs, trackers

log = logging.getLogger("vlp.train")


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    """One training run. ``Trainer(cfg).fit()``; subclass ``compute_loss`` to change a step."""

    def __init__(self, cfg: Config, resume: str | None = None, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        cpu = cfg.train.cpu or not torch.cuda.is_available()
        self.accelerator = accelerator or Accelerator(
            cpu=cpu, mixed_precision=cfg.train.precision, log_with=trackers(cfg), project_dir=str(self.run_dir))
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        self._run_lock = None
        self.checkpointer = Checkpointer(self)
        self.sources = build_sources(cfg.data.sources)
        self.classnames = next((s.classnames for s in self.sources if s.kind == "labeled" and s.classnames), None)
        if cfg.model.num_classes and self.classnames and cfg.model.num_classes < len(self.classnames):
            raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(self.classnames)} "
                              f"classes of the labeled data ({', '.join(self.classnames[:5])}...); leave it unset "
                              f"to size the head from the class names")
        if acc.is_main_process:
            check_writable(self.run_dir)
        self.checkpointer.check_fresh(resume)
        set_seed(cfg.seed + self.rank)

        self.task = PretrainTask(cfg, self.rank, self.world, self.classnames)
        self.model_cfg, self.tokenizer = self.task.model_cfg, self.task.tokenizer
        clip = self.task.student.clip
        self.templates = resolve_templates(cfg.data.templates)
        self.dataset = MixedBatches(
            cfg.data, train_transform(clip, cfg.data.scale, cfg.data.augment), self.tokenizer, cfg.seed, self.rank,
            self.world, self.templates, labels_as_text=self.task.labels_as_text, sources=self.sources,
            view_groups=self.task.view_groups)
        self.device_decoder = DeviceDecoder([s.name for s in self.sources])  # data.decode: device
        self.eval_preprocess = eval_transform(clip)

        if self.fsdp:
            from vlp.task import fsdp_ready

            fsdp_ready(self.task.student)  # before the optimizer takes the parameters
        optimizer, scheduler = build_optimizer(self.task.student, cfg.optim, cfg.train.steps)
        self.model, self.optimizer, self.scheduler = self.task.prepare(acc, optimizer, scheduler)

        self.step = 0
        self.samples_seen = {k: 0 for k in KINDS}
        self.bad_steps_total = 0
        self.last_metrics: dict[str, float] = {}
        self.eval_metrics: dict[str, float] = {}
        self._stop_signal: int | None = None
        self._stop_time: float | None = None  # when the first stop signal came (time.monotonic)
        if acc.is_main_process:  # one live run per output_dir (taken after the config and model built cleanly)
            self._run_lock = lock_run_dir(self.run_dir)
        if resume:
            self.checkpointer.resume(resume)
        self.task.on_train_start()
        self.dataset.start_batch = self.step * cfg.train.micro_batches

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def evaluate(self) -> dict:
        """The configured eval tasks on the student: :func:`vlp.eval.in_training.evaluate_student`."""
        return evaluate_student(self)

    # ---- one step -------------------------------------------------------------------------------------------
    def compute_loss(self, batch, micro: int) -> tuple[torch.Tensor, dict]:
        return self.task.training_forward(batch, self.step, micro)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Agree across ranks, so every rank skips the same steps (no rank waits in a collective alone)."""
        flag = torch.tensor([1.0 if torch.isfinite(loss).all() else 0.0], device=loss.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, reduction="sum") / self.world
        return bool(flag.item() == 1.0)

    def train_step(self, batches: list) -> dict | None:
        """One optimizer step over ``grad_accum`` (or ``accum_freq``) micro-batches. Returns metrics, or None if
        skipped. Each micro-batch's loss is divided by their number: the task's losses average to the step's loss."""
        acc, n = self.accelerator, len(batches)
        metrics_sum: dict[str, float] = {}
        if self.cfg.train.accum_freq > 1:  # open_clip_train's first pass: every micro-batch's features, no grad
            with acc.autocast():
                self.task.cache_features(batches, self.step)
        for micro, batch in enumerate(batches):
            sync = micro == n - 1
            ctx = acc.no_sync(self.model) if not sync and self.world > 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss, metrics = self.compute_loss(batch, micro)
            if not self._all_finite(loss):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            acc.backward(loss / n)
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / n
        self.task.after_backward(self.step)
        if self.cfg.optim.grad_clip:
            metrics_sum["grad_norm"] = float(acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))
        metrics_sum["lr"] = self.scheduler.get_last_lr()[0]  # the lr of this step (the scheduler moves on below)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics_sum.update(self.task.after_optimizer_step(self.step))
        return metrics_sum

    # ---- the loop -------------------------------------------------------------------------------------------
    def bad_samples(self) -> dict[str, int]:
        """Samples skipped as unreadable per source, summed over every rank's workers (a collective: every rank
        calls it at the same step) and over the run before it was resumed."""
        base = getattr(self, "_bad_base", {})
        now = getattr(self, "_bad", {})
        local = torch.tensor([float(now.get(s.name, 0)) for s in self.sources], device=self.accelerator.device)
        if self.world > 1:
            local = self.accelerator.reduce(local, reduction="sum")
        return {s.name: int(base.get(s.name, 0)) + int(n) for s, n in zip(self.sources, local.tolist())}

    def _track_stream(self, meta) -> None:
        """Per-worker cumulative counts travel with each batch's StreamMeta; keep the latest per worker and sum."""
        self._per_worker_bad = getattr(self, "_per_worker_bad", {})
        self._per_worker_bad[meta.worker] = meta.bad.tolist()
        totals = [sum(col) for col in zip(*self._per_worker_bad.values())]
        self._bad = {s.name: totals[i] for i, s in enumerate(self.sources)}
        self._data_taken = getattr(self, "_data_taken", {})
        self._data_taken[meta.stream] = list(meta.taken)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if not self._stop_signal:
                self._stop_time = time.monotonic()
            self._stop_signal = signum
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _should_stop(self) -> bool:
        flag = torch.tensor([float(self._stop_signal or 0)], device=self.accelerator.device)
        if self.world > 1:
            flag = self.accelerator.reduce(flag, reduction="max")
        if flag.item() > 0 and not self._stop_signal:  # another rank was signalled: stop alike
            self._stop_signal = int(flag.item())
        return bool(flag.item() > 0)

    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        tc = cfg.train
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir / ckpt_io.CONFIG_FILE)
        acc.init_trackers("tb", config=flat_hparams(cfg))
        self._install_signal_handlers()
        loader = iter(make_loader(self.dataset, cfg.data.workers, poll_s=POLL_S))
        stalled = False
        try:  # on any exit (an error from a worker included) the workers are shut down here: they absorb the
            # first SIGTERM, which is all multiprocessing's exit handler would send them before joining forever
            progress = Progress(self)
            consecutive_bad = 0
            while self.step < tc.steps:
                t0 = time.perf_counter()
                batches = []
                for _ in range(tc.micro_batches):
                    item = next_batch(loader, cfg.data, lambda: self._stop_time)
                    if item is None:
                        break
                    batch, meta = item
                    batch = self.device_decoder(batch, meta, acc.device)  # data.decode device: the JPEGs decode here
                    self._track_stream(meta)
                    batches.append(batch.to(acc.device, non_blocking=True))
                if len(batches) < tc.micro_batches:  # stopped while a stream stalls
                    stalled = True
                    self._stop_while_stalled(whole_step=not batches)
                    break
                t_data = time.perf_counter() - t0
                self.model.train()
                metrics = self.train_step(batches)
                if metrics is None:
                    consecutive_bad += 1
                    self.bad_steps_total += 1
                    log.warning("step %d: non-finite loss, step skipped (%d in a row, %d total)",
                                self.step, consecutive_bad, self.bad_steps_total)
                    acc.log({"train/nonfinite_steps": self.bad_steps_total}, step=self.step)
                    if consecutive_bad >= tc.max_bad_steps:
                        self.checkpointer.save()
                        raise NonFiniteLoss(
                            f"{consecutive_bad} consecutive steps had a non-finite loss at step {self.step}; "
                            f"the last good state is saved in {ckpt_io.find_checkpoint(self.run_dir)}. "
                            f"Lower optim.lr, enable optim.grad_clip, or check the data.")
                    # the batches are consumed, as in a normal step, so data positions stay aligned on resume
                else:
                    consecutive_bad = 0
                self.step += 1
                for k in KINDS:
                    self.samples_seen[k] += progress.per_step[k]
                progress.step(metrics, time.perf_counter() - t0, t_data)
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    self.evaluate()
                stop = self._should_stop()
                if stop or self.step % tc.save_every == 0 or self.step == tc.steps:
                    if self.step == tc.steps and cfg.eval.tasks():
                        self.evaluate()
                    self.checkpointer.save()
                if stop:
                    log.warning("signal %s: checkpoint saved at step %d, exiting", self._stop_signal, self.step)
                    break
        except DataTimeout:
            stalled = True
            raise
        finally:
            close_loader(loader, kill=stalled)
        progress.close()
        acc.end_training()
        self.release()
        return {"step": self.step, **self.last_metrics, **self.eval_metrics}

    def _stop_while_stalled(self, whole_step: bool) -> None:
        """A stop signal came while a stream stalls: one process saves the step reached (its data positions are
        whole when no micro-batch of the next step was taken); ranks cannot agree on a save without data."""
        done = (ckpt_io.checkpoint_dir(self.run_dir, self.step) / ckpt_io.STATE_FILE).is_file()
        if self.world == 1 and whole_step and self.step and not done:
            self.checkpointer.save()
        saved = ckpt_io.list_checkpoints(self.run_dir)
        log.warning("signal %s: no batch came in %.0f s more (a stream stalls); %s, exiting", self._stop_signal,
                    STOP_GRACE_S, f"latest checkpoint {saved[-1].name}" if saved else "no checkpoint yet")

    def release(self) -> None:
        """Give up the output_dir lock (also released when the process exits)."""
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="vlp train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--resume", default=None,
                        help="'latest' (open_clip_train's word) or 'auto': the latest checkpoint of output_dir if there "
                             "is one, else a fresh start; or a checkpoint / run folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.steps=100")
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_library_logs()
    try:
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg, resume=args.resume)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RunDirBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return 4
    try:
        result = trainer.fit()
    except NonFiniteLoss as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except CheckpointWriteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 5
    except DataTimeout as err:
        print(f"error: {err}", file=sys.stderr)
        return 7
    except NoUsableData as err:  # raised in a DataLoader worker: torch re-raises it with the worker's traceback
        line = str(err).strip().splitlines()[-1]  # its last line: "vlp.data.sources.NoUsableData: <reason>"
        print(f"error: {line.removeprefix(f'{NoUsableData.__module__}.{NoUsableData.__name__}: ')}", file=sys.stderr)
        return 6
    if trainer.accelerator.is_main_process:
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}))
    if trainer._stop_signal:  # checkpointed, but not finished: `vlp train ... && vlp export ...` must stop here
        return 128 + int(trainer._stop_signal)
    return 0


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, with ``key=value`` overrides anywhere (``--config X --resume auto train.steps=80``,
    or before and after an option)."""
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if e.startswith("-") or "=" not in e]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(build_parser(), argv))


if __name__ == "__main__":
    sys.exit(main())
