"""The run config's ``eval`` section: one optional section per eval task that has a config class, plus
``batch_size``.

A task's section is a :class:`TaskConfig` subclass registered under the task's name (as registered in
``vlp.eval.tasks``) with :func:`task_config`; :data:`EvalConfig` is built from these registrations when this module
is imported. This module imports no model or data code, so ``vlp.config`` can build on it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model

from vlp.strict import StrictModel


class TaskConfig(StrictModel):
    """Base of an eval task's section ``eval.<task>``: its settings, passed to the task by
    :func:`vlp.eval.in_training.run_training_eval`."""

    def for_model(self, model) -> TaskConfig:
        """These settings for the training model ``model`` (a :class:`vlp.models.model.VLPModel`): a task whose
        settings depend on the model (e.g. an ``auto`` value) resolves them here; by default they are as given."""
        return self


TASK_CONFIGS: dict[str, type[TaskConfig]] = {}


def task_config(name: str):
    """Class decorator registering a :class:`TaskConfig` subclass as the section ``eval.<name>`` of eval task
    ``name``; a section registered after this module is imported is not in :data:`EvalConfig`."""

    def decorator(cls: type[TaskConfig]) -> type[TaskConfig]:
        if name in TASK_CONFIGS:
            raise ValueError(f"eval task {name!r} already has a config ({TASK_CONFIGS[name].__name__})")
        TASK_CONFIGS[name] = cls
        return cls

    return decorator


@task_config("zeroshot")
class ZeroShotEvalConfig(TaskConfig):
    shards: str
    classnames: list[str] | str | None = None
    templates: list[str] | str | None = None
    max_samples: int | None = None


@task_config("knn")
class KnnEvalConfig(TaskConfig):
    """Weighted kNN (DINO's protocol) on image features: needs no text tower, so it monitors SSL-only runs."""

    shards: str                          # labeled evaluation shards
    train_shards: str | None = None      # labeled shards for the kNN memory (default: a split of ``shards``)
    k: int = Field(20, gt=0)
    max_samples: int | None = None
    # embed: encode_image; pooled: the ViT's pooled token before the projection; auto: pooled when no objective
    # trains the text side (the projection stays untrained there), else embed
    feature: Literal["auto", "embed", "pooled"] = "auto"

    def for_model(self, model) -> KnnEvalConfig:
        if self.feature != "auto":
            return self
        return self.model_copy(update={"feature": "embed" if model.use_text else "pooled"})


class _EvalSections(StrictModel):
    def tasks(self) -> dict[str, TaskConfig]:
        """The configured tasks' sections by task name (unset sections left out)."""
        return {name: spec for name in TASK_CONFIGS if (spec := getattr(self, name)) is not None}


EvalConfig = create_model(
    "EvalConfig", __base__=_EvalSections, __module__=__name__,
    __doc__="In-training evaluation; every task registered in ``vlp.eval.tasks`` that has a section here runs.",
    **{name: (cls | None, None) for name, cls in TASK_CONFIGS.items()},
    batch_size=(int, Field(256, gt=0)),
)
