"""In-training evaluation: the eval tasks of a run config's ``eval`` section (``eval.zeroshot``, ``eval.knn``...)
on the model being trained, through the task registry of ``vlp.eval.tasks``.

:func:`run_training_eval` runs task settings on an open_clip model; :func:`evaluate_student` runs a trainer's
configured tasks on its student (every ``train.eval_every`` steps and at the last step).
"""
from __future__ import annotations

import inspect
import json
import logging
from typing import Any, Mapping

from vlp import checkpoint as ckpt_io
from vlp.eval.tasks import EvalTask, evaluate, get_eval_task
from vlp.models.factory import create_clip, run_clip_options

log = logging.getLogger("vlp.train")  # the training run's log: its eval line keeps the name it always had


def evaluate_student(trainer) -> dict:
    """The configured eval tasks on a :class:`vlp.train.Trainer`'s student (main process; others wait); metrics
    are ``<task>/<metric>``, kept as ``trainer.eval_metrics``, logged as ``eval/<task>/<metric>`` and appended to
    ``metrics.jsonl``. Each task's settings are first fitted to the student
    (:meth:`vlp.eval.config.TaskConfig.for_model`)."""
    cfg, student = trainer.cfg, trainer.task.student
    specs = {name: spec.for_model(student) for name, spec in cfg.eval.tasks().items()}
    if not specs:
        return {}
    acc = trainer.accelerator
    full = trainer.checkpointer.full_state_dict()  # FSDP: rank 0 evaluates a whole copy (every rank helps gather it)
    if acc.is_main_process:
        if full is not None:
            clip = create_clip(cfg.model.name, pretrained_text=False, **run_clip_options(cfg))[0]
            clip.load_state_dict(ckpt_io._clip_part(full), strict=True)
            clip.to(acc.device)
        else:
            clip = acc.unwrap_model(trainer.model).clip
        was_training = clip.training
        clip.eval()
        trainer.eval_metrics = run_training_eval(
            clip, trainer.tokenizer, trainer.eval_preprocess, specs, device=acc.device,
            batch_size=cfg.eval.batch_size, default_classnames=trainer.classnames,
            default_templates=trainer.templates)
        clip.train(was_training)
        acc.log({f"eval/{k}": v for k, v in trainer.eval_metrics.items()}, step=trainer.step)
        log.info("step %d eval: %s", trainer.step, trainer.eval_metrics)
        with (trainer.run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": trainer.step, **trainer.eval_metrics}) + "\n")
    acc.wait_for_everyone()
    return trainer.eval_metrics


_EVALUATE_OPTIONS = frozenset(p.name for p in inspect.signature(evaluate).parameters.values()
                              if p.kind is p.KEYWORD_ONLY)


def _task_options(task: EvalTask) -> set[str]:
    """The keywords ``task`` accepts: :func:`evaluate`'s plus those its ``run`` names."""
    params = inspect.signature(task.run).parameters.values()
    named = set(_EVALUATE_OPTIONS) | {p.name for p in params if p.kind is p.KEYWORD_ONLY}
    return named - {"device", "train_data"}  # given by run_training_eval (train_data as train_shards)


def _as_dict(settings) -> dict[str, Any]:
    if hasattr(settings, "model_dump"):  # a pydantic config section
        return settings.model_dump()
    return dict(settings)


def run_training_eval(clip_model, tokenizer, preprocess, specs: Mapping[str, Any], *, device, batch_size: int,
                      default_classnames=None, default_templates=None) -> dict[str, float]:
    """Run each configured eval task; metrics named ``<task>/<metric>`` (numbers only), e.g. ``zeroshot/top1``,
    ``knn/top1``.

    ``specs`` maps a task name (or alias) to its settings, a dict or a pydantic section (``None``: skipped):
    ``shards`` (required), ``train_shards`` (tasks with ``uses_train_data``), ``classnames`` and ``templates``
    (unset: the shards' files first, then ``default_classnames``/``default_templates``, as
    :func:`vlp.eval.tasks.zeroshot_labels`), and any other :func:`evaluate` option
    (``max_samples``, ``k``, ``T``, ``C``, ``test_fraction``, ``seed``, ``ks``, ``batch_size`` ...). Unset
    (``None``) settings take :func:`evaluate`'s defaults. Image-only tasks (``needs_text=False``, e.g. ``knn``)
    never touch the text tower, so they suit models trained without one.
    """
    metrics: dict[str, float] = {}
    for name, settings in specs.items():
        if settings is None:
            continue
        task = get_eval_task(name)
        opts = {k: v for k, v in _as_dict(settings).items()
                if v is not None and not (k in ("classnames", "templates") and not v)}  # empty: unset
        shards = opts.pop("shards", None)
        if not shards:
            raise ValueError(f"eval.{name}: no shards")
        train_shards = opts.pop("train_shards", None)
        if train_shards and not task.uses_train_data:
            raise ValueError(f"eval.{name}: task {task.name} takes no train_shards")
        unknown = sorted(set(opts) - _task_options(task))
        if unknown:
            raise ValueError(f"eval.{name}: unknown setting(s) {', '.join(unknown)}")
        if task.needs_text and tokenizer is None:
            raise ValueError(f"eval.{name}: task {task.name} needs a text tower (no tokenizer given)")
        opts.update(default_classnames=default_classnames, default_templates=default_templates)
        opts.setdefault("batch_size", batch_size)
        result = evaluate(clip_model, tokenizer, preprocess, task.name, shards, device=device,
                          train_data=train_shards, **opts)
        metrics.update({f"{task.name}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    return metrics
