"""Typed run configuration: YAML file -> validated :class:`Config`, with dotted command-line overrides.

Every mistake is reported before any work starts, as one line naming the key or the file::

    config error: optim.lr: Input should be a valid number (got 'fast')
    config error: data.sources[0].shards: no file matches '/data/x-{000..009}.tar'
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from vlp.data.format import KINDS, Kind, check_shards, expand_shards, is_local
from vlp.eval.config import EvalConfig
from vlp.strict import ConfigError, StrictModel

MASKING_OBJECTIVES = ("mae",)  # objectives that need masked patches: model.mask_ratio defaults to 0.75 with them


class KeyedError(ValueError):
    """Raised inside validation with a message that already starts with the key (``objectives.mae.x: ...``)."""


class SourceConfig(StrictModel):
    """One WebDataset: a shard spec (brace expansion, ``::``-separated specs, local paths or URLs)."""

    name: str = ""
    kind: Kind
    shards: str | list[str]
    weight: float = Field(1.0, gt=0)
    classnames: list[str] | str | None = None  # list, or a file (one name per line); default: classnames.txt beside the shards
    balance: Literal["none", "sqrt", "class"] = "none"  # labeled resampling for long tails (Mahajan et al. 2018)
    # label noise for robustness experiments: this fraction of the labels (each label of a multi-label sample) replaced
    # by a uniformly random other class, decided per (seed, source, sample key, position): the same in every worker,
    # rank and resume. Needs class names. 0: labels as written
    noise: float = Field(0.0, ge=0, lt=1)
    size: int | None = None  # samples; default: sizes.json beside the shards

    def shard_specs(self) -> list[str]:
        specs = [self.shards] if isinstance(self.shards, str) else list(self.shards)
        return [s for spec in specs for s in spec.split("::") if s]


class BatchConfig(StrictModel):
    """Samples of each kind in every step's batch, per process (the composition is the same on every rank)."""

    paired: int = Field(0, ge=0)
    labeled: int = Field(0, ge=0)
    unlabeled: int = Field(0, ge=0)

    @property
    def total(self) -> int:
        return self.paired + self.labeled + self.unlabeled


class DataConfig(StrictModel):
    sources: list[SourceConfig]
    batch: BatchConfig
    workers: int = Field(2, ge=0)
    # seconds without a batch (a stalled stream: a hung mount, a silent pipe: command) before the run ends with one
    # line, exit 7; a stop signal while waiting ends it within 10 s more. Needs workers >= 1 (0: the trainer reads)
    timeout_s: float = Field(600.0, gt=0)
    shuffle_buffer: int = Field(1000, ge=0)
    resampled: bool = True  # infinite resampled shards; False = exact epochs split by rank and worker
    templates: list[str] | str = "a photo of a {c}."  # label -> text prompts (UniCL), list or file or preset name
    augment: bool = True
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop scale range
    # JPEGs decoded at libjpeg's reduced scales (Pillow draft) when every crop still gets the pixels it outputs
    draft_decode: bool = True
    # where JPEGs are decoded and augmented: cpu (data workers: Pillow + open_clip's transform), or device (workers
    # read the header and draw the crop; the trainer decodes with torchvision's decode_jpeg on its device, then
    # crops, resizes, flips and normalizes there). Other formats, and rows of kinds an objective takes extra views
    # of, stay on the CPU path (vlp.data.device_decode)
    decode: Literal["cpu", "device"] = "cpu"

    @field_validator("scale")
    @classmethod
    def _scale_range(cls, v):
        if not 0 < v[0] <= v[1] <= 1:
            raise KeyedError(f"data.scale: needs 0 < min <= max <= 1 (RandomResizedCrop's area fraction), got {list(v)}")
        return v

    @field_validator("templates")
    @classmethod
    def _templates_name_the_class(cls, v):
        if isinstance(v, list):
            bad = [t for t in v if "{c}" not in t]
            if bad or not v:
                raise KeyedError(f"data.templates: every template needs {{c}} where the class name goes "
                                 f"(got {bad[0]!r})" if bad else "data.templates: empty list")
        return v


class TextConfig(StrictModel):
    lock: bool = False  # LiT: freeze the text tower
    lock_unlocked_layers: int = 0


class ModelConfig(StrictModel):
    name: str = "vlp-tiny-vit"  # open_clip config name, configs/models/<name>.json, or a path to a JSON file
    # open_clip weights to start from (open_clip_train's --pretrained): a folder (a `vlp export`, or any folder
    # holding open_clip_config.json + open_clip_model.safetensors; model.name then defaults to its config), a
    # .safetensors / .pt / .bin file (torch.load(weights_only=True)), or an open_clip pretrained tag for model.name
    # (e.g. laion2b_s34b_b88k: downloads). Loaded with open_clip.load_checkpoint (strict). Or a vlp run or checkpoint
    # folder (LiT's second stage): the newest readable checkpoint's student weights, strict; model.name must be its.
    pretrained: str | None = None
    # fraction of image patches dropped in the shared training pass (FLIP / MAE); default (null): 0.75 when an
    # objective reconstructs masked patches (mae), else 0 (open_clip_train drops none unless asked)
    mask_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    # which patches the masked pass keeps: random (FLIP / MAE: uniform), or attention (A-CLIP, Yang et al. 2023;
    # AttMask, Kakogeorgiou et al. 2022): the momentum teacher's last-block CLS-to-patch attention on the unmasked
    # image (mean over heads, no grad) keeps the most-attended patches; needs a teacher (an objective that uses one,
    # e.g. pseudolabel, or a teacher: section) and a ViT. The teacher pass is part of the step (and of its FLOPs)
    mask_policy: Literal["random", "attention"] = "random"
    # mask_policy attention: share of the kept patches drawn uniformly at random (seeded by seed, step, micro-batch,
    # rank) from the rest instead of by attention; 0: A-CLIP's top-k, 1: exactly the random policy's patches
    mask_random_fraction: float = Field(0.0, ge=0.0, le=1.0)
    clip_unmasked: bool = False  # run a separate unmasked image pass for the contrastive loss
    text: TextConfig = TextConfig()
    lock_image: bool = False  # LiT / open_clip_train --lock-image: freeze the image tower
    lock_image_unlocked_groups: int = Field(0, ge=0)  # --lock-image-unlocked-groups: leave the last N groups trainable
    grad_checkpointing: bool = False  # open_clip_train --grad-checkpointing (activation checkpointing in the towers)
    # MoCo v3 (Chen, Xie & He 2021, Sec. 4.1): the ViT's patch projection stays at its random init, against the
    # instability of self-supervised ViT training; a ViT tower only
    freeze_patch_embed: bool = False
    num_classes: int | None = None  # classifier head; default: number of labeled classnames
    # open_clip_train's --image-mean / --image-std; default: the preprocess_cfg of model.pretrained (an open_clip
    # folder or tag), else of the model JSON, else OpenAI's. A run records what it used; exports carry it
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "mae" in data:
            raise KeyedError("model.mae: moved to objectives.mae (e.g. objectives.mae.decoder_width)")
        if isinstance(data, dict) and data.get("pretrained") and not data.get("name"):
            export_cfg = Path(str(data["pretrained"])) / "open_clip_config.json"
            if export_cfg.is_file():  # an open_clip folder names its own architecture
                data = {**data, "name": str(export_cfg)}
        return data


class TeacherConfig(StrictModel):
    """The momentum teacher (an EMA of the student; BYOL, MoCo v3, DINO): tau from ``tau`` to ``tau_end``
    along a cosine (as solo-learn's ``MomentumUpdater``) or constant. ``scope``: ``image`` tracks the image tower,
    its projection and the heads objectives name; ``all`` tracks every parameter (an EMA of the whole model)."""

    tau: float = Field(0.996, ge=0, le=1)
    tau_end: float = Field(1.0, ge=0, le=1)
    schedule: Literal["cosine", "constant"] = "cosine"
    scope: Literal["image", "all"] = "image"


class OptimConfig(StrictModel):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v):
        if not all(0 <= b < 1 for b in v):
            raise KeyedError(f"optim.betas: each must be in [0, 1) (AdamW's moment decays), got {list(v)}")
        return v
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)  # shorthand: teacher {tau: x, schedule: constant, scope: all}
    fused: bool = True  # torch's single-kernel AdamW (CPU and CUDA); false: the multi-tensor (foreach) one


class TrainConfig(StrictModel):
    steps: int = Field(1000, gt=0)
    # open_clip_train's --epochs / --train-num-samples instead of steps: steps = ceil(epochs * num_samples /
    # global batch), resolved when the run starts (the world size is known then) and logged
    epochs: float | None = Field(None, gt=0)
    # samples per epoch, every kind counted; default: the sources' sizes (source size, or sizes.json beside the shards)
    num_samples: int | None = Field(None, gt=0)
    compile: bool = False  # torch.compile each transformer block, dynamic shapes (open_clip_train --torchcompile)
    # plain accumulation: every micro-batch's losses on its own rows, averaged (the contrastive loss sees
    # data.batch rows)
    grad_accum: int = Field(1, ge=1)
    # open_clip_train's --accum-freq: the contrastive loss of every micro-batch is over all accum_freq micro-batches'
    # features, cached by a no-grad pass (the gradients of one big batch)
    accum_freq: int = Field(1, ge=1)
    precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = Field(10, gt=0)
    save_every: int = Field(500, gt=0)
    keep_last: int = Field(2, ge=1)
    eval_every: int | None = Field(None, gt=0)
    max_bad_steps: int = Field(5, ge=1)  # consecutive non-finite losses before aborting
    cpu: bool = False  # force CPU even where an accelerator is present
    progress: bool = True  # a tqdm bar on a terminal; false (or not a terminal): a log line every log_every

    @model_validator(mode="after")
    def _epochs_or_steps(self):
        if self.epochs is not None:
            if "steps" in self.model_fields_set:
                raise KeyedError("train.epochs: give train.steps or train.epochs (+ train.num_samples), not both")
        return self

    def resolve_steps(self, samples_per_step: int, dataset_size: int | None = None) -> int | None:
        """Set ``steps`` from ``epochs`` x ``num_samples`` (``dataset_size`` when unset; then ``epochs`` is cleared:
        the saved config says the steps); returns the steps, or None when ``steps`` was given."""
        if self.epochs is None:
            return None
        if self.num_samples is None:
            if not dataset_size:
                raise KeyedError("train.epochs: needs train.num_samples (samples per epoch, as open_clip_train's "
                                 "--train-num-samples): no sizes.json beside the shards gives it")
            self.num_samples = dataset_size
        steps = max(1, math.ceil(self.epochs * self.num_samples / samples_per_step))
        self.epochs = None  # first: validate_assignment re-runs the checks
        self.steps = steps
        return steps

    @model_validator(mode="after")
    def _one_accumulation(self):
        if self.grad_accum > 1 and self.accum_freq > 1:
            raise KeyedError("train.accum_freq: choose train.grad_accum or train.accum_freq, not both "
                             "(accum_freq is grad_accum with the contrastive loss over the whole accumulated batch)")
        return self

    @property
    def micro_batches(self) -> int:
        """data.batch-sized micro-batches per optimizer step."""
        return self.grad_accum * self.accum_freq


class LogConfig(StrictModel):
    """Where metrics go besides metrics.jsonl and TensorBoard (``output_dir/tb``)."""

    wandb: bool = False  # open_clip_train --report-to wandb (needs the wandb package)
    wandb_project: str = "vlp"
    name: str | None = None  # the run's name in wandb (default: output_dir's folder name)

    @model_validator(mode="after")
    def _wandb_installed(self):
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise KeyedError("log.wandb: the wandb package is not installed (pip install wandb), "
                             "or set log.wandb: false")
        return self


class Config(StrictModel):
    output_dir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig
    objectives: dict[str, SerializeAsAny[StrictModel]]  # name -> that objective's own Config (vlp.objectives)
    teacher: TeacherConfig | None = None  # default: built when an objective uses one (or optim.ema_decay)
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_configs(cls, v):
        """Each objective's own ``Config`` validates its section, so errors name ``objectives.<name>.<key>``."""
        from vlp.objectives.base import OBJECTIVES, ObjectiveConfig

        if not isinstance(v, dict):
            return v
        out = {}
        for name, raw in v.items():
            if isinstance(raw, ObjectiveConfig):
                out[name] = raw
                continue
            if name not in OBJECTIVES:
                raise KeyedError(f"objectives.{name}: unknown objective (known: {', '.join(sorted(OBJECTIVES))})")
            if isinstance(raw, (int, float)) and not isinstance(raw, bool):
                raw = {"weight": raw}
            try:
                out[name] = OBJECTIVES[name].Config.model_validate(raw if raw is not None else {})
            except ValidationError as err:
                raise KeyedError(_format_error(err, prefix=f"objectives.{name}")) from None
        return out

    @field_validator("objectives")
    @classmethod
    def _some_objective(cls, v):
        if not v or not any(o.weight > 0 for o in v.values()):
            raise ValueError("at least one objective needs a weight > 0")
        return v

    @model_validator(mode="after")
    def _resolve_mask_ratio(self):
        """model.mask_ratio unset: 0.75 when an active objective reconstructs masked patches, else 0."""
        if self.model.mask_ratio is None:
            masked = any(o.weight > 0 and name in MASKING_OBJECTIVES for name, o in self.objectives.items())
            self.model.mask_ratio = 0.75 if masked else 0.0
        return self

    @model_validator(mode="after")
    def _objectives_have_rows(self):
        b = self.data.batch
        kinds = {s.kind for s in self.data.sources}
        for kind in KINDS:
            if getattr(b, kind) > 0 and kind not in kinds:
                raise ValueError(f"data.batch.{kind}: {getattr(b, kind)} samples asked but no source of kind '{kind}'")
        if b.total == 0:
            raise ValueError("data.batch: every kind is 0")
        from vlp.objectives.base import OBJECTIVES

        for name, o in self.objectives.items():
            if o.weight > 0:
                try:
                    OBJECTIVES[name].check(o, self)
                except ValueError as err:
                    raise KeyedError(str(err)) from None
        if self.optim.ema_decay is not None and self.teacher is not None:
            raise KeyedError("optim.ema_decay: set teacher.tau (with teacher.schedule: constant) instead of both")
        return self


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = re.sub(r"\[(\d+)\]", r".\1", dotted).split(".")  # data.sources[0].shards as errors print it
    node = tree
    for i, k in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(k)]
            continue
        if k not in node or node[k] is None:
            node[k] = {}
        node = node[k]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{'.'.join(keys[:i + 1])}: is a value, cannot set {dotted}")
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{key.strip()}: the value {raw!r} is not valid YAML ({problem}); quote the whole "
                              f"override for the shell, e.g. '{key.strip()}=[a, b]'") from None
        out.append((key.strip(), value))
    return out


def _format_error(err: ValidationError, prefix: str = "") -> str:
    e = err.errors()[0]
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, KeyedError):
        return str(cause)
    loc = prefix
    for part in e["loc"]:
        loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
    msg = e["msg"]
    if e["type"] in ("value_error", "assertion_error"):  # our own message, without pydantic's "Value error, "
        msg = str(cause) if cause is not None else msg.split(", ", 1)[-1]
        if not loc and re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):  # a model-level check that names its key
            return msg
    if e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "missing":
        msg = "required key missing"
    got = e.get("input")
    suffix = f" (got {got!r})" if e["type"] not in ("missing", "extra_forbidden") and not isinstance(got, (dict, list)) else ""
    return f"{loc or 'config'}: {msg}{suffix}"


def config_from_dict(tree: dict, base_dir: str | os.PathLike = ".", check_files: bool = True) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    if check_files:
        for i, src in enumerate(cfg.data.sources):
            check_shards(f"data.sources[{i}].shards", _absolute_specs(src.shard_specs(), base_dir))
        for task, spec in cfg.eval.tasks().items():
            for key in ("shards", "train_shards"):
                if getattr(spec, key, None):
                    check_shards(f"eval.{task}.{key}", _absolute_specs([getattr(spec, key)], base_dir))
    return cfg


def _absolute_specs(specs: list[str], base_dir) -> list[str]:
    return [s if not is_local(s) or os.path.isabs(s) else str(Path(base_dir) / s) for s in specs]


def load_config(path: str | os.PathLike, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read a YAML config, apply ``a.b.c=value`` overrides, validate. Relative shard paths stay relative to CWD."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    apply_overrides(tree, parse_overrides(list(overrides)))
    return config_from_dict(tree, check_files=check_files)


def apply_overrides(tree: dict, overrides: list[tuple[str, Any]]) -> dict:
    """Set each ``(dotted key, value)`` of :func:`parse_overrides` on a config tree, in place; a key that cannot be
    set is a ConfigError naming it."""
    keys = {k for k, _ in overrides}
    train = tree.get("train") if isinstance(tree.get("train"), dict) else {}
    for given, other in (("train.epochs", "steps"), ("train.steps", "epochs")):
        if given in keys and f"train.{other}" not in keys:  # the command line's length replaces the file's
            train.pop(other, None)
    for key, value in overrides:
        try:
            _set_dotted(tree, key, value)
        except (IndexError, ValueError, KeyError) as err:
            raise ConfigError(f"{key}: cannot set ({err})") from None
    return tree


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
