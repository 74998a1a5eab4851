"""What a training run reports: the trackers (TensorBoard, wandb) and the hyperparameters they record, the
loop's progress (:class:`Progress`: a bar or a plain line, the logged metrics), and the library log levels."""
from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from pathlib import Path

from vlp.config import KINDS, Config

log = logging.getLogger("vlp.train")  # the training run's log: its progress lines keep the name they always had


def trackers(cfg: Config) -> list:
    """TensorBoard always (``output_dir/tb``); wandb with ``log.wandb`` (project ``log.wandb_project``)."""
    out: list = ["tensorboard"]
    if cfg.log.wandb:
        from accelerate.tracking import WandBTracker

        out.append(WandBTracker(cfg.log.wandb_project, name=cfg.log.name or Path(cfg.output_dir).name,
                                dir=str(cfg.output_dir)))
    return out


def flat_hparams(cfg: Config) -> dict:
    """The run config as one flat dict of dotted keys (``optim.lr``) to numbers, strings and booleans (anything
    else as its string): the hyperparameters the trackers record, and what a resume compares."""
    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float, str, bool)):
            out[prefix] = node
        else:
            out[prefix] = str(node)
    walk("", cfg.model_dump(mode="json"))
    return out


def log_line(metrics: dict, eta_s: float | None = None) -> str:
    """``loss/total 1.234 loss/contrastive 0.9 ... lr 3e-4 samples/s 812 eta 0:03:05``: the plain progress line
    (the bar's ETA for a log file; ``eta_s``: seconds left)."""
    losses = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("loss/"))
    eta = "" if eta_s is None else f" eta {datetime.timedelta(seconds=round(eta_s))}"
    return f"{losses} lr {metrics['lr']:.3g} samples/s {metrics['samples_per_s']:.0f}{eta}"


def bar_postfix(metrics: dict) -> dict:
    """The progress bar's fields: every loss (``total``, ``contrastive``, ...), lr, samples/s."""
    out = {k.split("/", 1)[1]: f"{v:.3f}" for k, v in metrics.items() if k.startswith("loss/")}
    return {**out, "lr": f"{metrics['lr']:.2g}", "sps": f"{metrics['samples_per_s']:.0f}"}


def quiet_library_logs() -> None:
    """accelerate's INFO lines on every checkpoint ("Saving current state to ...", "Model weights saved in ...")
    and open_clip's (filtered where vlp builds models) are noise in a training log; their warnings stay."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)


class Progress:
    """The loop's progress, on the main process: a tqdm bar on a terminal, else a plain line with an ETA every
    ``train.log_every`` steps. At each logged step (every rank: the bad-sample count is a collective) the step's
    metrics, with throughput, data-wait fraction and the non-finite and bad-sample counts, become
    ``trainer.last_metrics`` and go to the trackers and ``metrics.jsonl``."""

    def __init__(self, trainer):
        self.trainer = trainer
        acc, tc = trainer.accelerator, trainer.cfg.train
        self.per_step = {k: getattr(trainer.cfg.data.batch, k) * tc.micro_batches * trainer.world for k in KINDS}
        self.bar = None
        # a bar only on a terminal (a log file gets no carriage returns); otherwise a plain line every log_every
        self.plain = acc.is_main_process and not (tc.progress and sys.stderr.isatty())
        if acc.is_main_process and not self.plain:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=tc.steps, initial=trainer.step, desc="train", dynamic_ncols=True)
        self.window_t, self.window_wait, self.window_steps = 0.0, 0.0, 0
        self.fit_t0, self.fit_step0 = time.perf_counter(), trainer.step  # for the plain line's ETA
        self.metrics_path = trainer.run_dir / "metrics.jsonl"

    def step(self, metrics: dict | None, dt: float, t_data: float) -> None:
        """A step was taken in ``dt`` seconds, ``t_data`` of them waiting for data (``metrics``: None if skipped)."""
        t, acc, tc, per_step = self.trainer, self.trainer.accelerator, self.trainer.cfg.train, self.per_step
        self.window_t += dt
        self.window_wait += t_data
        self.window_steps += 1
        if metrics is not None and (t.step % tc.log_every == 0 or t.step == tc.steps):
            window_t, window_steps = self.window_t, self.window_steps
            rate = window_steps * sum(per_step.values()) / window_t
            metrics.update({
                "samples_per_s": rate,
                "data_wait_frac": self.window_wait / window_t,
                "nonfinite_steps": t.bad_steps_total,
                **{f"samples_per_s/{k}": window_steps * per_step[k] / window_t for k in KINDS if per_step[k]},
                **{f"bad_samples/{name}": n for name, n in t.bad_samples().items()},
            })
            t.last_metrics = metrics
            acc.log({f"train/{k}": v for k, v in metrics.items()}, step=t.step)
            if acc.is_main_process:
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps({"step": t.step, **metrics}) + "\n")
                if self.plain:
                    eta = (tc.steps - t.step) * (time.perf_counter() - self.fit_t0) / (t.step - self.fit_step0)
                    log.info("step %d/%d %s", t.step, tc.steps, log_line(metrics, eta))
            self.window_t = self.window_wait = 0.0
            self.window_steps = 0
        if self.bar is not None:
            self.bar.update(1)
            if t.last_metrics:
                self.bar.set_postfix(bar_postfix(t.last_metrics), refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
