"""PretrainTask: the training step's home. It owns the student (open_clip CLIP + the heads objectives add), the
objectives, the optional momentum teacher and the masking policy; the trainer calls only this interface::

    task = PretrainTask(cfg, rank, world, classnames)
    model, opt, sched = task.prepare(accelerator, optimizer, scheduler)  # only the student enters DDP/FSDP
    loss, metrics = task.training_forward(batch, step, micro)            # inside autocast
    task.after_backward(step); optimizer.step(); task.after_optimizer_step(step)
    task.extra_state() / task.load_extra_state(state)                   # teacher + objective buffers
    task.on_train_start()                                               # after a resume, before step one

Anchors: open_clip's ``CLIPTask`` / ``DistillCLIPTask`` (a task owns model, loss and a frozen teacher), timm's
``timm/task`` (only the trainable module is wrapped), solo-learn's ``BaseMomentumMethod`` (momentum pairs, tau
schedule). Masking noise is seeded by (seed, step, micro-batch, rank), so a resumed run masks exactly as before.
"""
from __future__ import annotations

import contextlib

import torch

from vlp.config import Config, ConfigError, TeacherConfig
from vlp.data.batch import ViewGroup, merge_view_groups
from vlp.data.sources import stream_seed
from vlp.models.factory import create_clip
from vlp.models.model import VLPModel
from vlp.models.teacher import MomentumTeacher
from vlp.objectives import OBJECTIVES, BuildContext, Objective, build_objectives, combine


def build_context(model: VLPModel, cfg: Config | None = None, rank: int = 0, world_size: int = 1,
                  classnames: list[str] | None = None, num_classes: int = 0, tokenizer=None) -> BuildContext:
    """What objectives see of the student when they build heads and views."""
    v = model.clip.visual
    size = v.image_size if isinstance(v.image_size, int) else v.image_size[0]
    embed_dim = model.clip.text_projection.shape[1] if hasattr(model.clip, "text_projection") and \
        isinstance(model.clip.text_projection, torch.Tensor) else getattr(model.clip, "embed_dim", 0)
    return BuildContext(cfg=cfg, rank=rank, world_size=world_size, width=model.width, embed_dim=embed_dim,
                        patch=model.patch, grid=tuple(v.grid_size) if model.is_vit else None, is_vit=model.is_vit,
                        image_size=size, mean=tuple(v.image_mean or ()), std=tuple(v.image_std or ()),
                        classnames=classnames, num_classes=num_classes, tokenizer=tokenizer)


def add_heads(model: VLPModel, objectives: list[Objective], ctx: BuildContext) -> VLPModel:
    """Every head the objectives declare, added to the student."""
    for obj in objectives:
        for name, head in obj.heads(ctx).items():
            model.add_head(name, head)
    return model


def build_student(clip: torch.nn.Module, model_cfg, objectives: list[Objective], **ctx_kw) -> VLPModel:
    """The student for these objectives: text features only if one reads them, and every head they declare."""
    model = VLPModel(clip, model_cfg, use_text=any(o.needs_text for o in objectives))
    return add_heads(model, objectives, build_context(model, **ctx_kw))


def teacher_config(cfg: Config, objectives) -> TeacherConfig | None:
    if cfg.teacher is not None:
        return cfg.teacher
    if cfg.optim.ema_decay is not None:
        return TeacherConfig(tau=cfg.optim.ema_decay, schedule="constant", scope="all")
    if any(o.uses_teacher for o in objectives):
        return TeacherConfig()
    return None


def fsdp_ready(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` wrappable by FSDP1, which refuses 0-dim parameters: each one (open_clip's ``logit_scale``,
    ``logit_bias``) becomes shape [1], which broadcasts the same in every use. Call it before the optimizer is built;
    checkpoints give them their open_clip shape back (``vlp.checkpoint.clean_state``)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.ndim == 0:
                module._parameters[name] = torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad)
    return model


def full_params(model: torch.nn.Module):
    """A context in which an FSDP1-wrapped ``model``'s parameters are whole (``summon_full_params``, read-only;
    every rank must enter it); a no-op for any other model (FSDP2 parameters are gathered by their reader)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(model, FSDP):
        return FSDP.summon_full_params(model, writeback=False, recurse=True)
    return contextlib.nullcontext()


class PretrainTask:
    EXTRA_STATE = ("teacher", "objectives")  # the files extra_state() writes (<name>.safetensors)

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, classnames: list[str] | None = None):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        clip, self.model_cfg, self.tokenizer = create_clip(cfg.model.name)
        self.classnames = classnames
        self.num_classes = cfg.model.num_classes or (len(classnames) if classnames else 0)
        active = [name for name, o in cfg.objectives.items() if o.weight > 0]
        self.student = VLPModel(clip, cfg.model, use_text=any(OBJECTIVES[n].needs_text for n in active))
        self.ctx = build_context(self.student, cfg, rank, world_size, classnames, self.num_classes, self.tokenizer)
        try:
            self.objectives = build_objectives(cfg, self.ctx)
            objs = [o for o, _ in self.objectives.values()]
            for name, (obj, _) in self.objectives.items():
                if any(True for _ in obj.parameters()):
                    raise ValueError(f"objectives.{name}: an objective holds no trainable parameters; "
                                     f"declare them as heads")
            add_heads(self.student, objs, self.ctx)
            self.view_groups: list[ViewGroup] = merge_view_groups([g for o in objs for g in o.view_groups(self.ctx)])
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.labels_as_text = any(o.labels_as_text for o in objs)
        tcfg = teacher_config(cfg, objs)
        heads = tuple(h for o in objs for h in o.teacher_heads)
        self.teacher = MomentumTeacher(self.student, tcfg, cfg.train.steps, heads) if tcfg else None
        self.model: torch.nn.Module = self.student  # the wrapped student after prepare()
        self._unwrap = lambda m: m

    # ---- distributed --------------------------------------------------------------------------------------
    def prepare(self, accelerator, optimizer, scheduler):
        """Wrap only the trainable student (DDP/FSDP, mixed precision); teacher and objectives just move."""
        self.model, optimizer, scheduler = accelerator.prepare(self.student, optimizer, scheduler)
        self._unwrap = accelerator.unwrap_model
        for obj, _ in self.objectives.values():
            obj.to(accelerator.device)
        if self.teacher is not None:
            self.teacher.to(accelerator.device)
        return self.model, optimizer, scheduler

    @property
    def unwrapped(self) -> VLPModel:
        return self._unwrap(self.model)

    # ---- one step -----------------------------------------------------------------------------------------
    def masking_noise(self, batch, step: int, micro: int, text_ratio: float | None = None) -> torch.Tensor | None:
        """Per-step masking noise from a generator seeded by (seed, step, micro-batch, rank): exact on resume."""
        model = self.unwrapped
        if not model.is_vit or (self.cfg.model.mask_ratio == 0 and not text_ratio):
            return None
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "mask", step, micro, self.rank))
        return torch.rand(batch["image"].shape[0], model.num_patches, generator=g).to(batch["image"].device)

    def text_pass_ratio(self, step: int) -> float | None:
        """The contrastive rows' masking ratio at this step, where an objective sets one (None: shared pass)."""
        ratios = {r for obj, _ in self.objectives.values() if (r := obj.text_pass_ratio(step)) is not None}
        if len(ratios) > 1:
            raise ValueError(f"objectives ask for different text-pass masking ratios: {sorted(ratios)}")
        return ratios.pop() if ratios else None

    def training_forward(self, batch, step: int, micro: int = 0) -> tuple[torch.Tensor, dict]:
        text_ratio = self.text_pass_ratio(step)
        outputs = self.model(batch, noise=self.masking_noise(batch, step, micro, text_ratio), text_ratio=text_ratio)
        if self.teacher is not None:
            with torch.no_grad():
                for obj, _ in self.objectives.values():
                    if obj.uses_teacher:
                        outputs.update(obj.teacher_forward(self.teacher, batch, step))
        return combine(self.objectives, outputs, batch)

    def on_train_start(self) -> None:
        """Before the first step of this process (fresh or resumed): objectives may build state from the student."""
        for obj, _ in self.objectives.values():
            obj.on_train_start(self.unwrapped)

    def after_backward(self, step: int) -> None:
        for obj, _ in self.objectives.values():
            obj.after_backward(self.unwrapped, step)

    def after_optimizer_step(self, step: int) -> dict:
        model = self.unwrapped
        for obj, _ in self.objectives.values():
            obj.after_optimizer_step(model, step)
        if self.teacher is not None:
            with full_params(self.model):  # under FSDP1: every rank gathers the student for the EMA
                return {"teacher/tau": self.teacher.update(model, step)}
        return {}

    # ---- state --------------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors a checkpoint holds besides the student and optimizer, one safetensors file per entry:
        ``teacher`` (the tracked weights under the student's key names, what ``vlp export --weights teacher``
        reads) and ``objectives`` (every objective's buffers, ``<name>.<buffer>``)."""
        teacher, objectives = self.EXTRA_STATE
        state = {teacher: self.teacher.state_dict_tracked() if self.teacher is not None else {}, objectives: {}}
        for name, (obj, _) in self.objectives.items():
            state[objectives].update({f"{name}.{k}": v for k, v in obj.state_dict().items()})
        return state

    def load_extra_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if self.teacher is not None:
            if "teacher" not in state:
                raise FileNotFoundError("the checkpoint has no teacher.safetensors, but this run has a teacher")
            self.teacher.load_tracked(state["teacher"])
        saved = state.get("objectives", {})
        for name, (obj, _) in self.objectives.items():
            own = {k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(f"{name}.")}
            if own or obj.state_dict():
                obj.load_state_dict(own)
