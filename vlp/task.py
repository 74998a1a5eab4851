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
import logging

import torch

from vlp.config import Config, ConfigError, TeacherConfig
from vlp.data.batch import ViewGroup, merge_view_groups
from vlp.data.sources import sidecar_size, stream_seed
from vlp.models.factory import create_clip, run_clip_options
from vlp.models.model import VLPModel
from vlp.models.teacher import MomentumTeacher
from vlp.objectives import OBJECTIVES, BuildContext, Objective, build_objectives, combine

log = logging.getLogger("vlp.task")


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
                        classnames=classnames, num_classes=num_classes, tokenizer=tokenizer,
                        seed=cfg.seed if cfg is not None else 0)


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def dataset_size(cfg: Config) -> int | None:
    """Samples in all sources (each source's ``size``, else the ``sizes.json`` beside its shards); None when
    one is unknown."""
    from vlp.data.format import expand_shards

    total = 0
    for src in cfg.data.sources:
        size = src.size if src.size is not None else sidecar_size(
            [u for spec in src.shard_specs() for u in expand_shards(spec)])
        if size is None:
            return None
        total += size
    return total


def add_heads(model: VLPModel, objectives: list[Objective], ctx: BuildContext) -> VLPModel:
    """Every head the objectives declare (``head_names``), added to the student; then every head a teacher reads
    (``teacher_heads``) must be one of them."""
    for obj in objectives:
        heads = obj.heads(ctx)
        if tuple(heads) != obj.head_names:
            raise ValueError(f"objectives.{obj.name}: heads() built {tuple(heads)}, but head_names declares "
                             f"{obj.head_names}")
        for name, head in heads.items():
            model.add_head(name, head)
    for obj in objectives:
        missing = [h for h in obj.teacher_heads if h not in model.head_names]
        if missing:
            raise ValueError(f"objectives.{obj.name}: its teacher reads the head(s) {missing}, which no objective "
                             f"of this run adds")
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


def attention_noise(scores: torch.Tensor, uniform: torch.Tensor, keep: int, random_fraction: float = 0.0) -> torch.Tensor:
    """Masking noise ``[B, N]`` whose lowest ``keep`` values (what ``random_masking``'s argsort keeps) are the
    ``keep - r`` patches of highest ``scores`` plus ``r = round(keep * random_fraction)`` patches of lowest
    ``uniform`` noise among the rest: attention-guided masking (A-CLIP, Yang et al. 2023, keeps the EMA encoder's
    most-attended tokens; AttMask, Kakogeorgiou et al. 2022, ranks by the teacher's CLS attention) with a random share
    for diversity. The noise is a rank / N: first the top-scored patches (by descending score), then the random picks
    (by ascending ``uniform``), then the rest (by descending score), so a pass keeping more or fewer patches (a
    contrastive text-pass ratio) keeps a prefix of the same order. ``random_fraction`` 1 keeps exactly the patches
    ``uniform`` itself would; ties in ``scores`` break by patch index."""
    B, N = scores.shape
    n_random = int(round(keep * random_fraction))
    n_top = keep - n_random
    by_score = torch.argsort(scores.float(), dim=1, descending=True, stable=True)
    top = by_score[:, :n_top]
    rest_noise = uniform.clone().scatter_(1, top, float("inf"))  # the top patches are not drawn again
    picks = torch.argsort(rest_noise, dim=1, stable=True)[:, :n_random]
    chosen = torch.zeros(B, N, dtype=torch.bool, device=scores.device)
    chosen.scatter_(1, top, True).scatter_(1, picks, True)
    tail = by_score[~torch.gather(chosen, 1, by_score)].reshape(B, N - keep)  # unchosen, by descending score
    order = torch.cat([top, picks, tail], dim=1)  # order[b, i]: the patch ranked i
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    return ranks.to(uniform.dtype) / N


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of every tower in ``model`` (open_clip's ``ResidualAttentionBlock``, timm's ``Block``)."""
    from open_clip.transformer import ResidualAttentionBlock
    from timm.models.vision_transformer import Block

    return [m for m in model.modules() if isinstance(m, (ResidualAttentionBlock, Block))]


def compile_blocks(model: torch.nn.Module) -> int:
    """Regional compilation (PyTorch's "regional compilation" recipe): each transformer block compiled on its own,
    in place, with dynamic shapes. The masked pass keeps a varying number of tokens and view groups bring other
    crop sizes; one compiled block graph serves them all (a whole-model graph recompiles for each), and compile
    time is one block's, not the model's. Returns the number of blocks compiled."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


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
        m = cfg.model
        try:
            clip, self.model_cfg, self.tokenizer = create_clip(m.name, pretrained=m.pretrained,
                                                               **run_clip_options(cfg))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        # the saved config names the preprocessing used, so eval and export rebuild it without model.pretrained
        m.image_mean, m.image_std = tuple(clip.visual.image_mean), tuple(clip.visual.image_std)
        log.info("image mean %s, std %s (model.image_mean / model.image_std)", _fmt(m.image_mean), _fmt(m.image_std))
        if m.mask_ratio:
            log.info("patch masking on: ratio %g (model.mask_ratio)", m.mask_ratio)
        n_params = sum(p.numel() for p in clip.parameters())
        log.info("model %s (%.1fM parameters): %s", m.name, n_params / 1e6,
                 f"weights from model.pretrained {m.pretrained}" if m.pretrained else "randomly initialized")
        if m.lock_image and not m.pretrained:
            log.warning("model.lock_image: freezing a randomly initialized image tower (model.pretrained is not set)")
        if m.grad_checkpointing:
            clip.set_grad_checkpointing(True)
        self.classnames = classnames
        self.num_classes = cfg.model.num_classes or (len(classnames) if classnames else 0)
        epochs, global_batch = cfg.train.epochs, cfg.data.batch.total * cfg.train.micro_batches * world_size
        try:  # train.epochs: the world size is known now
            steps = cfg.train.resolve_steps(global_batch, dataset_size(cfg))
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if steps:
            log.info("train.steps = %d: ceil(%g epochs x %d samples / global batch %d)", steps, epochs,
                     cfg.train.num_samples, global_batch)
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
        choosers = [name for name, (o, _) in self.objectives.items() if o.chooses_rows]
        if len(choosers) > 1:
            raise ConfigError(f"objectives {', '.join(choosers)}: each chooses the student's rows before its pass; "
                              f"at most one may")
        self.group_kinds = {g.name: g.kinds for g in self.view_groups}
        tcfg = teacher_config(cfg, objs)
        heads = tuple(h for o in objs for h in o.teacher_heads)
        self.teacher = MomentumTeacher(self.student, tcfg, cfg.train.steps, heads) if tcfg else None
        if m.mask_policy == "attention":
            if self.teacher is None:
                raise ConfigError("model.mask_policy: attention ranks patches by the momentum teacher's attention, "
                                  "but this run has no teacher (add a teacher: section, or an objective that uses one)")
            if not self.student.is_vit:
                raise ConfigError("model.mask_policy: attention needs a ViT image tower")
            log.info("attention-guided masking (model.mask_policy): the teacher's CLS attention keeps patches, "
                     "%g of them at random (model.mask_random_fraction)", m.mask_random_fraction)
        self.model: torch.nn.Module = self.student  # the wrapped student after prepare()
        self._cache: tuple[int, list[dict]] | None = None  # (step, per-micro-batch features) under accum_freq
        self._unwrap = lambda m: m
        # model.mask_policy attention under train.accum_freq: (step, {micro: noise}) from cache_features, so the grad
        # pass reuses its teacher pass (the teacher changes only after the optimizer step)
        self._attn_noise: tuple[int, dict[int, torch.Tensor]] = (-1, {})

    # ---- distributed --------------------------------------------------------------------------------------
    def prepare(self, accelerator, optimizer, scheduler):
        """Wrap only the trainable student (DDP/FSDP, mixed precision); teacher and objectives just move."""
        self.model, optimizer, scheduler = accelerator.prepare(self.student, optimizer, scheduler)
        if self.cfg.train.compile:  # in place, per block: parameter names and checkpoints unchanged
            compile_blocks(self.student)
            if self.teacher is not None:
                compile_blocks(self.teacher)
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
        if not model.is_vit or (not self.cfg.model.mask_ratio and not text_ratio):
            return None
        g = torch.Generator().manual_seed(stream_seed(self.cfg.seed, "mask", step, micro, self.rank))
        noise = torch.rand(batch["image"].shape[0], model.num_patches, generator=g).to(batch["image"].device)
        if self.cfg.model.mask_policy == "random":
            return noise
        if self._attn_noise[0] == step and micro in self._attn_noise[1]:  # train.accum_freq: cache_features made it
            return self._attn_noise[1][micro]
        with torch.no_grad():
            scores = self.teacher.model.cls_patch_attention(batch["image"])
        keep = max(1, int(round(model.num_patches * (1 - (self.cfg.model.mask_ratio or text_ratio)))))
        return attention_noise(scores, noise, keep, self.cfg.model.mask_random_fraction)

    def text_pass_ratio(self, step: int) -> float | None:
        """The contrastive rows' masking ratio at this step, where an objective sets one (None: shared pass)."""
        ratios = {r for obj, _ in self.objectives.values() if (r := obj.text_pass_ratio(step)) is not None}
        if len(ratios) > 1:
            raise ValueError(f"objectives ask for different text-pass masking ratios: {sorted(ratios)}")
        return ratios.pop() if ratios else None

    def choose_rows(self, batch, step: int) -> tuple:
        """``(the rows the student's pass sees, teacher outputs of them)``: every row, or the rows an objective's
        teacher keeps (:meth:`Objective.teacher_select`, e.g. ``pseudolabel.keep``) with its outputs of those."""
        for obj, _ in self.objectives.values():
            if self.teacher is not None and obj.uses_teacher and obj.chooses_rows:
                with torch.no_grad():
                    keep, chosen = obj.teacher_select(self.teacher, batch, step)
                return batch.select(keep, self.group_kinds), chosen
        return batch, {}

    def training_forward(self, batch, step: int, micro: int = 0) -> tuple[torch.Tensor, dict]:
        """One micro-batch's loss (with grad) and metrics. The trainer backpropagates ``loss / micro-batches``."""
        text_ratio = self.text_pass_ratio(step)
        batch, chosen = self.choose_rows(batch, step)
        outputs = self.model(batch, noise=self.masking_noise(batch, step, micro, text_ratio), text_ratio=text_ratio)
        outputs.update(chosen)
        if self.teacher is not None:
            with torch.no_grad():
                for obj, _ in self.objectives.values():
                    if obj.uses_teacher and not obj.chooses_rows:
                        outputs.update(obj.teacher_forward(self.teacher, batch, step))
        if self._cache is not None and self._cache[0] == step:
            return self._combine_accumulated(outputs, batch, micro)
        return combine(self.objectives, outputs, batch)

    # ---- train.accum_freq (open_clip_train's --accum-freq) ---------------------------------------------------
    def cache_features(self, batches: list, step: int) -> None:
        """The first pass of open_clip_train's ``accum_freq``: every micro-batch's accumulated outputs (what the
        objectives' ``accumulates`` name) without grad. The same masking noise (seeded by step and micro-batch)
        makes :meth:`training_forward`'s grad pass of micro-batch j recompute exactly its cached features."""
        keys = {k for o, _ in self.objectives.values() for k in o.accumulates}
        text_ratio = self.text_pass_ratio(step)
        cache = []
        self._attn_noise = (-1, {})
        with torch.no_grad():
            for micro, batch in enumerate(batches):
                noise = self.masking_noise(batch, step, micro, text_ratio)
                if self.cfg.model.mask_policy == "attention":
                    self._attn_noise[1][micro] = noise
                out = self.model(batch, noise=noise, text_ratio=text_ratio)
                cache.append({k: out[k].detach() for k in keys if k in out} |
                             {k: batch[k] for k in ("label", "has_text", "kind")})
        self._cache = (step, cache)
        self._attn_noise = (step, self._attn_noise[1])

    def _combine_accumulated(self, outputs: dict, batch, micro: int) -> tuple[torch.Tensor, dict]:
        """The step's loss share of micro-batch ``micro`` under ``accum_freq``, scaled so that the trainer's mean
        over the n micro-batches is the step's loss: an accumulating objective (contrastive) sees the whole
        accumulated batch (its grad flows through this micro-batch's rows only; summed over j, as open_clip_train,
        hence the factor n); every other objective sees its micro-batch (mean losses: the mean over equal
        micro-batches is exact). Metrics are the losses themselves."""
        cache = self._cache[1]
        n = len(cache)
        total, metrics = 0.0, {}
        for name, (obj, weight) in self.objectives.items():
            if obj.accumulates:
                # every other output it reads (logit_scale, logit_bias) is shared by all n micro-batch losses:
                # its gradient counts 1/n per micro-batch (open_clip_train's counts it accum_freq times)
                out = {k: v.detach() + (v - v.detach()) / n if torch.is_tensor(v) and v.requires_grad else v
                       for k, v in outputs.items()}
                for k in obj.accumulates:
                    if k in outputs:
                        out[k] = torch.cat([c[k] for c in cache[:micro]] + [outputs[k]] + [c[k] for c in cache[micro + 1:]])
                rows = {k: torch.cat([c[k] for c in cache]) for k in ("label", "has_text", "kind")}
                loss, m = obj(out, rows)
                total = total + n * weight * loss
            else:
                loss, m = obj(outputs, batch)
                total = total + weight * loss
            metrics[f"loss/{name}"] = loss.detach()
            metrics.update({f"{name}/{k}": v for k, v in m.items()})
        metrics["loss/total"] = sum(w * metrics[f"loss/{name}"] for name, (_, w) in self.objectives.items())
        return total, metrics

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

    def per_process_state(self) -> dict[str, torch.Tensor]:
        """This process's own objective buffers (``Objective.per_process_state``, ``<name>.<buffer>``): every rank
        saves them; ``extra_state()`` holds rank 0's only."""
        return {f"{name}.{k}": getattr(obj, k) for name, (obj, _) in self.objectives.items()
                for k in obj.per_process_state if getattr(obj, k) is not None}

    def load_per_process_state(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            name, buf = key.split(".", 1)
            getattr(self.objectives[name][0], buf).copy_(value)

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
