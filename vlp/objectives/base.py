"""The objective contract. An objective is one file under ``vlp/objectives/`` that registers itself by name:

    @register("rotation")
    class RotationObjective(Objective):
        class Config(RowsConfig):               # validated under objectives.rotation (one-line errors)
            label_smoothing: float = 0.0        # RowsConfig adds kinds: the rows it reads (default unlabeled)
        head_names = ("rotation_head",)
        def heads(self, ctx): ...               # modules added to the student (trained, in DDP)
        def view_groups(self, ctx): ...         # extra augmented views of its rows, decoded once per record
        def forward(self, outputs, batch): ...  # -> (loss, {metric: tensor})

Every objective is built the same way, ``Objective(cfg, ctx)``: its validated ``Config`` (kept as ``self.cfg``) and
the :class:`BuildContext`; one whose state depends on them (buffers, a loss module) extends ``__init__`` with that
signature. Everything else is optional: ``check`` (cross-key validation against the run config), ``uses_teacher``
and ``teacher_heads`` (the momentum teacher tracks the image tower plus these heads; ``teacher.head(name)`` is the
teacher's copy), ``needs_text`` (the student computes text features), ``labels_as_text`` (labeled rows carry
prompts), hooks ``after_backward`` / ``after_optimizer_step`` (called with the unwrapped student), and
``card_settings`` (its line in the model card). An objective holds no trainable parameters of its own: those are
heads, owned by the student, so DDP syncs them. State that must survive a resume (a DINO center, class-wise
counters) lives in registered buffers; the task saves every objective's buffers in each checkpoint.

A head (``vlp.objectives.heads.Head``) is an ``nn.Module`` whose ``forward(model, outputs, batch) -> dict`` runs
inside the student's forward after the shared image pass (so DDP sees every parameter it uses) and adds named outputs
for its objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from vlp.strict import StrictModel

OBJECTIVES: dict[str, type["Objective"]] = {}


class ObjectiveConfig(StrictModel):
    """Base of every objective's own config (``Objective.Config``): its weight in the summed loss."""

    weight: float = Field(1.0, ge=0)


class RowsConfig(ObjectiveConfig):
    """Config of an objective whose rows the user picks (``kinds``; unlabeled by default)."""

    kinds: list[Literal["paired", "labeled", "unlabeled"]] = Field(default_factory=lambda: ["unlabeled"],
                                                                   min_length=1)


def register(name: str):
    """Class decorator: make an objective available as ``objectives.<name>`` in run configs."""
    def wrap(cls):
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} registered twice ({OBJECTIVES[name].__module__}, {cls.__module__})")
        OBJECTIVES[name] = cls
        cls.name = name
        return cls
    return wrap


@dataclass
class BuildContext:
    """What an objective may read when it builds its heads and views: the run config and the student's shape."""

    cfg: Any = None                   # vlp.config.Config (None: a bare context, for tests)
    rank: int = 0
    world_size: int = 1
    width: int = 0                    # image tower's pooled feature width (pre-projection)
    embed_dim: int = 0                # contrastive embedding width
    patch: int | None = None          # ViT patch size (None for other towers)
    grid: tuple[int, int] | None = None
    is_vit: bool = False
    image_size: int = 224
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    std: tuple = (0.26862954, 0.26130258, 0.27577711)
    classnames: list[str] | None = None  # the labeled sources' class names (one label space)
    num_classes: int = 0
    tokenizer: Any = None             # the text tower's tokenizer (open_clip's)
    seed: int = 0                     # the run's seed (cfg.seed)


class Objective(nn.Module):
    name: ClassVar[str] = ""
    Config: ClassVar[type[ObjectiveConfig]] = ObjectiveConfig
    kinds: ClassVar[tuple[str, ...]] = ()       # rows it reads where its config does not choose them (cfg.kinds)
    head_names: ClassVar[tuple[str, ...]] = ()  # the student attributes of the heads it adds (heads()' keys)
    needs_text: ClassVar[bool] = False
    labels_as_text: bool = False
    uses_teacher: ClassVar[bool] = False
    teacher_heads: ClassVar[tuple[str, ...]] = ()  # heads (its own or another's) the teacher tracks for it
    # outputs it reads over the whole accumulated batch under train.accum_freq (open_clip_train's --accum-freq):
    # those of the other micro-batches come from a no-grad pass; it then also reads the accumulated rows'
    # batch["label"], batch["has_text"], batch["kind"]. Empty: its loss is per micro-batch, averaged.
    accumulates: ClassVar[tuple[str, ...]] = ()
    # buffers each process keeps for itself (neither all-reduced nor identical across ranks, e.g. SwAV's queue):
    # every rank saves its own (``objectives.rank<R>.safetensors``) and a resumed rank of the same world gets its own
    per_process_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ObjectiveConfig | None = None, ctx: BuildContext | None = None):
        """``cfg``: its validated config (default: every default), kept as ``self.cfg`` (its own copy); ``ctx``:
        what it may read of the run (default: a bare context). A subclass with state extends this signature."""
        super().__init__()
        self.cfg = (cfg if cfg is not None else self.Config()).model_copy(deep=True)

    @classmethod
    def check(cls, o: ObjectiveConfig, cfg) -> None:
        """Cross-key checks against the run config, raising ``ValueError('objectives.<name>...: why')``. The
        default: the step has rows of the kinds it reads (``o.kinds`` where its config chooses them, else ``kinds``)."""
        b = cfg.data.batch
        if isinstance(o, RowsConfig):
            if not any(getattr(b, k) > 0 for k in o.kinds):
                raise ValueError(f"objectives.{cls.name}.kinds: no rows of {o.kinds} in data.batch")
        elif cls.kinds and not any(getattr(b, k) > 0 for k in cls.kinds):
            need = " or ".join(f"data.batch.{k} > 0" for k in cls.kinds)
            raise ValueError(f"objectives.{cls.name}: needs {need}")

    @classmethod
    def card_settings(cls, o: ObjectiveConfig, cfg) -> dict:
        """Its row in the model card: the weight and every setting that differs from the default."""
        return {"weight": o.weight, **o.model_dump(mode="json", exclude_defaults=True, exclude={"weight"})}

    def heads(self, ctx: BuildContext) -> dict[str, nn.Module]:
        """Modules the student adds (attribute name in ``head_names`` -> head); trained with the student."""
        return {}

    def view_groups(self, ctx: BuildContext) -> list["ViewGroup"]:
        return []

    def forward(self, outputs: dict, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def text_pass_ratio(self, step: int) -> float | None:
        """The masking ratio of the text rows' image pass at this step (None: they share the main pass)."""
        return None

    def teacher_forward(self, teacher, batch, step: int) -> dict:
        """No-grad teacher outputs this objective reads (``outputs['teacher/...']``); called before the student."""
        return {}

    @property
    def chooses_rows(self) -> bool:
        """Whether this objective's teacher chooses, before the student pass, which rows the student trains on
        (:meth:`teacher_select`); at most one objective of a run may."""
        return False

    def teacher_select(self, teacher, batch, step: int) -> tuple[torch.Tensor, dict]:
        """``(keep [B] bool, no-grad teacher outputs of the kept rows)``: called instead of :meth:`teacher_forward`
        when :attr:`chooses_rows`, before the student pass, which then sees the kept rows only."""
        raise NotImplementedError

    def on_train_start(self, model: nn.Module) -> None:
        """Called with the unwrapped student before the first step (after a resume restored its buffers)."""

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        pass


from vlp.data.batch import ViewGroup  # noqa: E402  (re-exported for objective files)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "RowsConfig", "BuildContext", "ViewGroup", "register"]
