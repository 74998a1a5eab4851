"""A training run's checkpoints: :class:`Checkpointer` saves the trainer's state atomically (keep-last-K) and
resumes it exactly, falling back to an older checkpoint when the latest is unreadable (and setting that one aside),
refusing a checkpoint of another model, and reporting what changed since the checkpoint's run. The folder layout and
the reading of checkpoint files are :mod:`vlp.checkpoint`'s."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file

from vlp import checkpoint as ckpt_io
from vlp.config import ConfigError, dump_config
from vlp.optim import warmup_cosine
from vlp.train_log import flat_hparams

log = logging.getLogger("vlp.train")  # the training run's log: these lines keep the name they always had

# settings a resumed run may change without changing what it trains (how long, how often it logs, saves, evaluates)
RESUME_FREE = ("output_dir", "train.steps", "train.log_every", "train.save_every", "train.keep_last",
               "train.eval_every", "train.progress", "eval.")


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


def _model_summary(model_cfg: dict) -> str:
    v = model_cfg.get("vision_cfg", {})
    return (f"embed_dim {model_cfg.get('embed_dim')}, vision width {v.get('width')} x {v.get('layers')} layers, "
            f"image {v.get('image_size')}")


class Checkpointer:
    """The checkpoints of a :class:`vlp.train.Trainer`'s run (``RUN_DIR/checkpoints``): what it saves is the
    trainer's state (the step, counters, data positions, the accelerate state of model, optimizer and scheduler,
    the task's extra and per-process state), and a resume puts it back."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.data_taken: dict = {}  # every rank's stream positions at the last save (rank 0)

    def check_fresh(self, resume: str | None) -> None:
        """A fresh run (no ``resume``) into a folder that holds an earlier run's checkpoints is a config error."""
        found = ckpt_io.list_checkpoints(self.trainer.run_dir)
        if found and not resume:  # a fresh run here would be pruned by, and mixed with, the old run's checkpoints
            raise ConfigError(f"output_dir: {self.trainer.run_dir} holds checkpoints of an earlier run (latest "
                              f"{found[-1].name}); continue it with --resume auto, or pick another output_dir")

    # ---- resume -------------------------------------------------------------------------------------------
    def resume(self, resume: str) -> None:
        latest = resume in ("auto", "latest")  # open_clip_train's --resume latest: the same
        target = self.trainer.run_dir if latest else Path(resume)
        if latest and not ckpt_io.list_checkpoints(target):
            log.info("resume=%s: no checkpoint in %s, starting fresh", resume, target)
            return
        # newest first: a checkpoint corrupted after it was published falls back to the previous one
        candidates = ckpt_io.newest_first(target)
        for i, path in enumerate(candidates):
            try:
                self._check_same_model(path)
                self._load(path)
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
        t = self.trainer
        if not t.accelerator.is_main_process or path.parent != t.run_dir / "checkpoints":
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
        now = self.trainer.model_cfg
        if before is not None and before != json.loads(json.dumps(now)):
            raise ConfigError(f"--resume: {path} was trained with another model ({_model_summary(before)}; this "
                              f"config: {_model_summary(now)}); resume with the run's own config, or "
                              f"start a fresh run in another output_dir")

    def _load(self, path: Path) -> None:
        t = self.trainer
        state = json.loads((path / ckpt_io.STATE_FILE).read_text())
        extra = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors")) if f.stem in t.task.EXTRA_STATE}
        t.accelerator.load_state(str(path))
        t.step = state["step"]
        t.samples_seen = state["samples_seen"]
        t.bad_steps_total = state.get("nonfinite_steps", 0)
        t.eval_metrics = state.get("eval", {})
        t._bad_base = state.get("bad_samples", {})
        exact = state.get("world_size") == t.world and state.get("data_workers") == t.cfg.data.workers
        if exact:
            taken = state.get("data_taken", {}).get(str(t.rank), {})
            t.dataset.start_taken = {int(k): v for k, v in taken.items()}
        self._report_changes(path, state, exact)
        t.task.load_extra_state(extra)
        own = path / ckpt_io.PER_PROCESS_FILE.format(rank=t.rank)
        if state.get("world_size") == t.world and own.is_file():  # another world size keeps rank 0's buffers
            t.task.load_per_process_state(load_file(str(own)))
        log.info("resumed from %s at step %d", path, t.step)
        self._log_schedule_change(path)

    def _log_schedule_change(self, path: Path) -> None:
        """A resumed run with another train.steps: the step-indexed schedules (warmup + cosine lr, teacher tau,
        unmasked tail) follow the new total, as open_clip_train rebuilds its cosine for a new --epochs; say so."""
        t = self.trainer
        try:
            before = yaml.safe_load((path / ckpt_io.CONFIG_FILE).read_text())["train"]["steps"]
        except Exception:  # an older or hand-made checkpoint: nothing to compare
            return
        now, o = t.cfg.train.steps, t.cfg.optim
        if before != now:
            old_lr = o.lr * warmup_cosine(o.warmup_steps, before, o.min_lr_ratio)(t.step)
            log.warning("train.steps %d -> %d on resume: the warmup + cosine lr schedule (and the teacher's tau) is "
                        "rebuilt for %d steps, as open_clip_train does for a new --epochs; at step %d the lr is %.3g "
                        "(it was %.3g on the old schedule)", before, now, now, t.step,
                        t.scheduler.get_last_lr()[0], old_lr)

    def _report_changes(self, path: Path, state: dict, exact: bool) -> None:
        """Say which settings differ from the checkpoint's run (a resumed run is only the same run when none do, and
        a changed world size or worker count restarts the data streams): one warning, and a metrics.jsonl record."""
        t = self.trainer
        try:
            before = flat_hparams(ckpt_io.read_run_config(path))
        except Exception:  # an old checkpoint without a readable config: nothing to compare
            return
        now = flat_hparams(t.cfg)
        changed = {k: [before.get(k), now.get(k)] for k in sorted(set(before) | set(now))
                   if before.get(k) != now.get(k) and not k.startswith(RESUME_FREE)}
        if state.get("world_size") not in (None, t.world):
            changed["world_size"] = [state["world_size"], t.world]
        if not changed:
            return
        lines = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        log.warning("resuming %s with changed settings: %s%s", path, lines,
                    "" if exact else "; the data streams restart (exact resume needs the same world size and "
                                     "data.workers)")
        if t.accelerator.is_main_process:
            with (t.run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"step": t.step, "resume_changes": changed, "exact_data_resume": exact}) + "\n")

    # ---- save ---------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint for the current step atomically; every rank must call it."""
        t = self.trainer
        acc = t.accelerator
        final = ckpt_io.checkpoint_dir(t.run_dir, t.step)
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        # every rank's exact stream positions (records consumed per stream and kind, replacements included)
        mine = [getattr(t, "_data_taken", {})]
        taken = gather_object(mine) if t.world > 1 else mine
        bad = t.bad_samples()
        try:
            acc.save_state(str(tmp))
            own = t.task.per_process_state() if t.world > 1 else {}
            if own:  # every rank the same objectives: all write, then all wait, before rank 0 publishes
                tmp.mkdir(parents=True, exist_ok=True)
                save_tensors(own, tmp / ckpt_io.PER_PROCESS_FILE.format(rank=t.rank))
                acc.wait_for_everyone()
            full = self.full_state_dict()  # collective under FSDP: every rank takes part
            if acc.is_main_process:
                self.data_taken = {str(r): {str(k): v for k, v in taken_r.items()} for r, taken_r in enumerate(taken)}
                dump_config(t.cfg, tmp / ckpt_io.CONFIG_FILE)
                if full is not None:  # FSDP: accelerate wrote pytorch_model_fsdp*; the gathered weights beside it
                    save_tensors(full, tmp / ckpt_io.MODEL_WEIGHTS[0])
                for stem, tensors in t.task.extra_state().items():
                    if tensors:
                        save_tensors(tensors, tmp / f"{stem}.safetensors")
                ckpt_io.write_state(tmp, {**self.state_dict(), "bad_samples": bad})
                ckpt_io.publish(tmp, final, t.cfg.train.keep_last)
        except Exception as err:  # disk full, quota, file size limit: torch, safetensors and json raise many types
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint would keep the disk full
            raise CheckpointWriteError(tmp, err) from err
        acc.wait_for_everyone()
        return final

    def full_state_dict(self) -> dict | None:
        """Under FSDP: the student's whole state dict gathered to rank 0 (CPU, clean key names; ``{}`` on other
        ranks); every rank must call it. None otherwise (accelerate's ``model.safetensors`` is already whole)."""
        if not self.trainer.fsdp:
            return None
        acc = self.trainer.accelerator
        state = acc.get_state_dict(self.trainer.model)
        return ckpt_io.clean_state(state) if acc.is_main_process else {}

    def state_dict(self) -> dict:
        """The run info of ``vlp_state.json`` (without the bad-sample counts, which :meth:`save` adds)."""
        t = self.trainer
        return {
            "step": t.step,
            "samples_seen": t.samples_seen,
            "nonfinite_steps": t.bad_steps_total,
            "metrics": t.last_metrics,
            "eval": t.eval_metrics,
            "model_cfg": t.model_cfg,
            "data": [{"name": s.name, "kind": s.kind, "shards": s.cfg.shards, "size": s.size} for s in t.sources],
            "batch": t.cfg.data.batch.model_dump(),
            "objectives": {k: v.model_dump(mode="json") for k, v in t.cfg.objectives.items()},
            "world_size": t.world,
            "data_workers": t.cfg.data.workers,
            "data_taken": self.data_taken,
        }
