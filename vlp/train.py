"""The trainer: ``accelerate launch -m vlp.train --config configs/X.yaml [key=value ...]``.

Accelerate owns devices, DDP, mixed precision and state saving; :class:`vlp.task.PretrainTask` owns the step
(student, objectives, momentum teacher, masking). The trainer holds the loop: the mixed-data stream, AdamW with
decay only on weight matrices, warmup + cosine, accumulation, clipping, atomic keep-last-K checkpoints with exact
resume, non-finite-loss guards, signal-safe exits and logging. It has no objective-specific line.

Under FSDP (``configs/accelerate/fsdp.yaml``) the student's 0-dim parameters become [1] before the optimizer
(``vlp.task.fsdp_ready``), each checkpoint adds the gathered full weights as ``model.safetensors`` beside
accelerate's sharded state, and in-training evaluation runs on a gathered copy on rank 0.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from safetensors.torch import load_file, save_file

from vlp import checkpoint as ckpt_io
from vlp.config import KINDS, Config, ConfigError, dump_config, load_config
from vlp.data.mixing import POLL_S, MixedBatches, close_loader, make_loader
from vlp.data.sources import NoUsableData, build_sources
from vlp.data.transforms import eval_transform, resolve_templates, train_transform
from vlp.data_wait import STOP_GRACE_S, DataTimeout, next_batch
from vlp.optim import build_optimizer, warmup_cosine
from vlp.run_dir import RunDirBusy, check_writable, lock_run_dir
from vlp.task import PretrainTask
from vlp.train_log import Progress, flat_hparams, quiet_library_logs, trackers

log = logging.getLogger("vlp.train")


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors (detached, on the CPU, contiguous)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (its partial folder is removed; earlier checkpoints are untouched)."""

    def __init__(self, tmp: Path, err: Exception):
        try:
            free = f"{shutil.disk_usage(tmp.parent).free / 2**20:.0f} MiB free"
        except OSError:
            free = "free space unknown"
        super().__init__(f"could not write checkpoint {tmp.name.removesuffix('.tmp')} in {tmp.parent} "
                         f"({type(err).__name__}: {str(err).strip()[:200]}; {free}); the partial checkpoint is "
                         f"removed and earlier checkpoints are intact: free space, then --resume auto")


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
        self.sources = build_sources(cfg.data.sources)
        self.classnames = next((s.classnames for s in self.sources if s.kind == "labeled" and s.classnames), None)
        if cfg.model.num_classes and self.classnames and cfg.model.num_classes < len(self.classnames):
            raise ConfigError(f"model.num_classes: {cfg.model.num_classes} is fewer than the {len(self.classnames)} "
                              f"classes of the labeled data ({', '.join(self.classnames[:5])}...); leave it unset "
                              f"to size the head from the class names")
        if acc.is_main_process:
            check_writable(self.run_dir)
        found = ckpt_io.list_checkpoints(self.run_dir)
        if found and not resume:  # a fresh run here would be pruned by, and mixed with, the old run's checkpoints
            raise ConfigError(f"output_dir: {self.run_dir} holds checkpoints of an earlier run (latest "
                              f"{found[-1].name}); continue it with --resume auto, or pick another output_dir")
        set_seed(cfg.seed + self.rank)

        self.task = PretrainTask(cfg, self.rank, self.world, self.classnames)
        self.model_cfg, self.tokenizer = self.task.model_cfg, self.task.tokenizer
        clip = self.task.student.clip
        self.templates = resolve_templates(cfg.data.templates)
        self.dataset = MixedBatches(
            cfg.data, train_transform(clip, cfg.data.scale, cfg.data.augment), self.tokenizer, cfg.seed, self.rank,
            self.world, self.templates, labels_as_text=self.task.labels_as_text, sources=self.sources,
            view_groups=self.task.view_groups)
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
            self._resume(resume)
        self.task.on_train_start()
        self.dataset.start_batch = self.step * cfg.train.micro_batches

    # ---- checkpoints --------------------------------------------------------------------------------------
    def _resume(self, resume: str) -> None:
        latest = resume in ("auto", "latest")  # open_clip_train's --resume latest: the same
        target = self.run_dir if latest else Path(resume)
        if latest and not ckpt_io.list_checkpoints(target):
            log.info("resume=%s: no checkpoint in %s, starting fresh", resume, target)
            return
        # newest first: a checkpoint corrupted after it was published falls back to the previous one
        candidates = ckpt_io.newest_first(target)
        for i, path in enumerate(candidates):
            try:
                self._check_same_model(path)
                self._load_checkpoint(path)
                return
            except ConfigError:
                raise
            except Exception as err:  # truncated or corrupt files: safetensors, torch, json raise many types
                if i == len(candidates) - 1:
                    raise RuntimeError(f"checkpoint {path} is unreadable ({err!r}) and no older one is left") from err
                aside = self._set_aside(path)
                log.warning("checkpoint %s is unreadable (%r)%s; falling back to %s", path, err,
                            f", set aside as {aside.name}" if aside else "", candidates[i + 1])

    def _set_aside(self, path: Path) -> Path | None:
        """Rename an unreadable checkpoint of this run out of the checkpoint list (kept for a look): left in place,
        pruning would keep it, as the newest, and delete the good ones the resumed run writes (main process)."""
        if not self.accelerator.is_main_process or path.parent != self.run_dir / "checkpoints":
            return None
        aside = path.with_name(f"{path.name}.unreadable")
        shutil.rmtree(aside, ignore_errors=True)
        try:
            path.rename(aside)
        except OSError:  # another rank's view, a read-only folder: leave it
            return None
        return aside

    def _check_same_model(self, path: Path) -> None:
        """A checkpoint of another model cannot be resumed: a config error, not an "unreadable" fallback."""
        try:
            before = json.loads((path / ckpt_io.STATE_FILE).read_text()).get("model_cfg")
        except (OSError, ValueError):  # unreadable: the load says so
            return
        if before is not None and before != json.loads(json.dumps(self.model_cfg)):
            raise ConfigError(f"--resume: {path} was trained with another model ({_model_summary(before)}; this "
                              f"config: {_model_summary(self.model_cfg)}); resume with the run's own config, or "
                              f"start a fresh run in another output_dir")

    def _load_checkpoint(self, path: Path) -> None:
        state = json.loads((path / ckpt_io.STATE_FILE).read_text())
        extra = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors")) if f.stem in self.task.EXTRA_STATE}
        self.accelerator.load_state(str(path))
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.bad_steps_total = state.get("nonfinite_steps", 0)
        self.eval_metrics = state.get("eval", {})
        self._bad_base = state.get("bad_samples", {})
        exact = state.get("world_size") == self.world and state.get("data_workers") == self.cfg.data.workers
        if exact:
            taken = state.get("data_taken", {}).get(str(self.rank), {})
            self.dataset.start_taken = {int(k): v for k, v in taken.items()}
        self._report_changes(path, state, exact)
        self.task.load_extra_state(extra)
        own = path / ckpt_io.PER_PROCESS_FILE.format(rank=self.rank)
        if state.get("world_size") == self.world and own.is_file():  # another world size keeps rank 0's buffers
            self.task.load_per_process_state(load_file(str(own)))
        log.info("resumed from %s at step %d", path, self.step)
        self._log_schedule_change(path)

    def _log_schedule_change(self, path: Path) -> None:
        """A resumed run with another train.steps: the step-indexed schedules (warmup + cosine lr, teacher tau,
        unmasked tail) follow the new total, as open_clip_train rebuilds its cosine for a new --epochs; say so."""
        try:
            before = yaml.safe_load((path / ckpt_io.CONFIG_FILE).read_text())["train"]["steps"]
        except Exception:  # an older or hand-made checkpoint: nothing to compare
            return
        now, o = self.cfg.train.steps, self.cfg.optim
        if before != now:
            old_lr = o.lr * warmup_cosine(o.warmup_steps, before, o.min_lr_ratio)(self.step)
            log.warning("train.steps %d -> %d on resume: the warmup + cosine lr schedule (and the teacher's tau) is "
                        "rebuilt for %d steps, as open_clip_train does for a new --epochs; at step %d the lr is %.3g "
                        "(it was %.3g on the old schedule)", before, now, now, self.step,
                        self.scheduler.get_last_lr()[0], old_lr)

    def _report_changes(self, path: Path, state: dict, exact: bool) -> None:
        """Say which settings differ from the checkpoint's run (a resumed run is only the same run when none do, and
        a changed world size or worker count restarts the data streams): one warning, and a metrics.jsonl record."""
        try:
            before = flat_hparams(ckpt_io.read_run_config(path))
        except Exception:  # an old checkpoint without a readable config: nothing to compare
            return
        now = flat_hparams(self.cfg)
        changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k) and not k.startswith(RESUME_FREE)}
        if state.get("world_size") not in (None, self.world):
            changed["world_size"] = [state["world_size"], self.world]
        if not changed:
            return
        lines = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        log.warning("resuming %s with changed settings: %s%s", path, lines,
                    "" if exact else "; the data streams restart (exact resume needs the same world size and "
                                     "data.workers)")
        if self.accelerator.is_main_process:
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, "resume_changes": changed, "exact_data_resume": exact}) + "\n")

    def save(self) -> Path:
        """Write a checkpoint for the current step atomically; every rank must call it."""
        acc = self.accelerator
        final = ckpt_io.checkpoint_dir(self.run_dir, self.step)
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        # every rank's exact stream positions (records consumed per stream and kind, replacements included)
        mine = [getattr(self, "_data_taken", {})]
        taken = gather_object(mine) if self.world > 1 else mine
        bad = self.bad_samples()
        try:
            acc.save_state(str(tmp))
            own = self.task.per_process_state() if self.world > 1 else {}
            if own:  # every rank the same objectives: all write, then all wait, before rank 0 publishes
                tmp.mkdir(parents=True, exist_ok=True)
                save_tensors(own, tmp / ckpt_io.PER_PROCESS_FILE.format(rank=self.rank))
                acc.wait_for_everyone()
            full = self.full_state_dict()  # collective under FSDP: every rank takes part
            if acc.is_main_process:
                self.data_taken = {str(r): {str(k): v for k, v in t.items()} for r, t in enumerate(taken)}
                dump_config(self.cfg, tmp / ckpt_io.CONFIG_FILE)
                if full is not None:  # FSDP: accelerate wrote pytorch_model_fsdp*; the gathered weights beside it
                    save_tensors(full, tmp / ckpt_io.MODEL_WEIGHTS[0])
                for stem, tensors in self.task.extra_state().items():
                    if tensors:
                        save_tensors(tensors, tmp / f"{stem}.safetensors")
                ckpt_io.write_state(tmp, {**self.state_dict(), "bad_samples": bad})
                ckpt_io.publish(tmp, final, self.cfg.train.keep_last)
        except Exception as err:  # disk full, quota, file size limit: torch, safetensors and json raise many types
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint would keep the disk full
            raise CheckpointWriteError(tmp, err) from err
        acc.wait_for_everyone()
        return final

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def full_state_dict(self) -> dict | None:
        """Under FSDP: the student's whole state dict gathered to rank 0 (CPU, clean key names; ``{}`` on other
        ranks); every rank must call it. None otherwise (accelerate's ``model.safetensors`` is already whole)."""
        if not self.fsdp:
            return None
        state = self.accelerator.get_state_dict(self.model)
        return ckpt_io.clean_state(state) if self.accelerator.is_main_process else {}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_steps": self.bad_steps_total,
            "metrics": self.last_metrics,
            "eval": self.eval_metrics,
            "model_cfg": self.model_cfg,
            "data": [{"name": s.name, "kind": s.kind, "shards": s.cfg.shards, "size": s.size} for s in self.sources],
            "batch": self.cfg.data.batch.model_dump(),
            "objectives": {k: v.model_dump(mode="json") for k, v in self.cfg.objectives.items()},
            "world_size": self.world,
            "data_workers": self.cfg.data.workers,
            "data_taken": getattr(self, "data_taken", {}),
        }

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
                        self.save()
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
                    self.save()
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
            self.save()
        saved = ckpt_io.list_checkpoints(self.run_dir)
        log.warning("signal %s: no batch came in %.0f s more (a stream stalls); %s, exiting", self._stop_signal,
                    STOP_GRACE_S, f"latest checkpoint {saved[-1].name}" if saved else "no checkpoint yet")

    def release(self) -> None:
        """Give up the output_dir lock (also released when the process exits)."""
        if self._run_lock is not None:
            self._run_lock.close()
            self._run_lock = None

    def evaluate(self) -> dict:
        """The configured eval tasks (``eval.zeroshot``, ``eval.knn``...) on the student (main process; others
        wait); metrics are ``<task>/<metric>``."""
        specs = self.cfg.eval.tasks()
        if not specs:
            return {}
        if "knn" in specs and specs["knn"].feature == "auto":
            specs["knn"] = specs["knn"].model_copy(
                update={"feature": "embed" if self.task.student.use_text else "pooled"})
        acc = self.accelerator
        full = self.full_state_dict()  # FSDP: rank 0 evaluates a whole copy (every rank helps gather it)
        if acc.is_main_process:
            from vlp.eval.tasks import run_training_eval

            if full is not None:
                from vlp.models.factory import create_clip, run_clip_options

                clip = create_clip(self.cfg.model.name, pretrained_text=False, **run_clip_options(self.cfg))[0]
                clip.load_state_dict(ckpt_io._clip_part(full), strict=True)
                clip.to(acc.device)
            else:
                clip = acc.unwrap_model(self.model).clip
            was_training = clip.training
            clip.eval()
            self.eval_metrics = run_training_eval(
                clip, self.tokenizer, self.eval_preprocess, specs, device=acc.device,
                batch_size=self.cfg.eval.batch_size, default_classnames=self.classnames,
                default_templates=self.templates)
            clip.train(was_training)
            acc.log({f"eval/{k}": v for k, v in self.eval_metrics.items()}, step=self.step)
            log.info("step %d eval: %s", self.step, self.eval_metrics)
            with (self.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": self.step, **self.eval_metrics}) + "\n")
        acc.wait_for_everyone()
        return self.eval_metrics


def _model_summary(model_cfg: dict) -> str:
    v = model_cfg.get("vision_cfg", {})
    return (f"embed_dim {model_cfg.get('embed_dim')}, vision width {v.get('width')} x {v.get('layers')} layers, "
            f"image {v.get('image_size')}")


# settings a resumed run may change without changing what it trains (how long, how often it logs, saves, evaluates)
RESUME_FREE = ("output_dir", "train.steps", "train.log_every", "train.save_every", "train.keep_last",
               "train.eval_every", "train.progress", "eval.")


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
