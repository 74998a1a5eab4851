"""Pseudo-labels from the momentum teacher, in the label-text space: unlabeled images join the shared embedding.

MUST (Li et al. 2022, "Masked Unsupervised Self-training for Label-free Image Classification"): an EMA teacher
labels a weak view, the student learns the label on a masked view, with a fairness term; FixMatch (Sohn et al.
2020): weak -> strong consistency, loss normalized by all unlabeled rows; FlexMatch (Zhang et al. 2021): per-class
adaptive thresholds ``T_c = M(beta_c) tau``, ``beta_c = sigma_c / max(max_k sigma_k, N_unused)``,
``M(x) = x / (2 - x)``, so classes the teacher is unsure of are admitted earlier.

- **Teacher** (no grad): a weak, unmasked view of each row (``pseudolabel`` view group) through the EMA image
  tower, scored against the **class bank** (``source: bank``): the labeled classes' prompt-ensembled text
  embeddings from the student's current text tower, rebuilt every ``bank_every`` steps as a zero-shot classifier
  is built, at the student's CLIP temperature; and/or the teacher's classifier head (``classifier``; ``both``
  averages the two distributions).
- **Selection**: ``flexmatch`` (streaming: ``sigma`` and ``N_unused`` are EMAs of per-batch counts, all-reduced
  across ranks), ``topk`` (the ``topk`` most confident rows predicted as each class per batch), or ``threshold``
  (FixMatch's flat ``tau``); ``topk`` ranks within each rank's rows, the others decide row by row.
- **Student**: the row's strong view is the shared, masked pass. Its embedding against the class bank at the CLIP
  temperature is the image-to-text half of UniCL with the class prompts as text, so a selected row is a positive
  of its class's prompts in the contrastive space (plus the classifier head's CE when the source uses it).
  Loss ``ramp(step) * (sum_selected CE / rows + fairness * KL(uniform || mean student prediction))`` (MUST's
  fairness regularizer), ``ramp`` linear over ``rampup_steps``. ``target: soft`` replaces each selected row's
  hard label by the teacher's distribution sharpened at temperature ``sharpen`` (MixMatch, Berthelot et al. 2019,
  eq. 7: ``p^(1/T) / sum p^(1/T)``; soft pseudo-labels as Noisy Student's, Xie et al. 2020): a wrong but unsure
  teacher pulls less.
- **Teacher-first** (``keep``): the teacher scores and selects every row of its kinds *before* the student pass,
  and only the ``keep`` best of them (selected ones first, class-balanced, most confident first) go through the
  student; the others cost the teacher's forward only (online batch selection: Loshchilov & Hutter 2015; RHO-LOSS,
  Mindermann et al. 2022, select with a forward pass and train on what they select). The loss stays a mean over every
  scored row, so ``keep`` changes what the step costs, not the loss. Logged: ``scored/selected``, ``scored/kept``,
  ``scored/teacher_acc`` over every scored row.

Logged: the fraction selected (overall and per class for up to 32 classes), the mean threshold, and where rows
carry a withheld label (``Batch.hidden_label``, benchmarks only) the accuracy of the teacher and of the selected
pseudo-labels.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.data.transforms import resolve_templates
from vlp.data.views import view_transform
from vlp.objectives.base import OBJECTIVES, BuildContext, Objective, RowsConfig, ViewGroup, register
from vlp.objectives.gather import all_reduce_sum, gather_with_grad
from vlp.objectives.heads import CLASSIFIER


def flexmatch_thresholds(sigma: torch.Tensor, unused: torch.Tensor, tau: float, warmup: bool = True) -> torch.Tensor:
    """FlexMatch's per-class thresholds ``M(beta_c) * tau``, ``M(x) = x / (2 - x)`` (Zhang et al. 2021, eqs. 6-7)."""
    denom = torch.maximum(sigma.max(), unused) if warmup else sigma.max()
    beta = sigma / denom if denom > 0 else torch.zeros_like(sigma)
    return tau * beta / (2 - beta)


def topk_per_class(conf: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` most confident rows among those predicted as each class."""
    mask = torch.zeros_like(pred, dtype=torch.bool)
    for c in pred.unique():
        idx = (pred == c).nonzero().squeeze(1)
        mask[idx[conf[idx].topk(min(k, idx.numel())).indices]] = True
    return mask


def keep_order(selected: torch.Tensor, conf: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Row indices, best first: selected rows before the others; within each, class-balanced (every predicted
    class's most confident row, then every class's second, ...), ties by confidence."""
    rank, group = torch.empty_like(pred), 2 * pred + selected.long()  # a row's rank among its class's in its part
    for c in group.unique():
        idx = (group == c).nonzero().squeeze(1)
        rank[idx[conf[idx].argsort(descending=True, stable=True)]] = torch.arange(idx.numel(), device=pred.device)
    key = (~selected).to(conf.dtype) * (2 * pred.numel() + 2) + 2 * rank.to(conf.dtype) - conf  # conf in [0, 1]
    return key.argsort(stable=True)


def sharpen(probs: torch.Tensor, T: float) -> torch.Tensor:
    """MixMatch's sharpening ``p^(1/T) / sum_c p_c^(1/T)`` (Berthelot et al. 2019, eq. 7), row by row."""
    return (probs.clamp_min(1e-12).log() / T).softmax(-1)  # the same, without p^(1/T) underflowing at small T


def fairness(probs: torch.Tensor) -> torch.Tensor:
    """MUST's fairness term: ``KL(uniform || mean prediction) = -mean_c log pbar_c - log C`` (0 when balanced)."""
    mean = probs.mean(0)
    return -torch.log(mean.clamp_min(1e-8)).mean() - math.log(probs.shape[1])


@register("pseudolabel")
class PseudoLabelObjective(Objective):
    class Config(RowsConfig):
        source: Literal["bank", "classifier", "both"] = "bank"
        select: Literal["flexmatch", "topk", "threshold"] = "flexmatch"
        tau: float = Field(0.7, gt=0, lt=1)              # MUST's 0.7; FixMatch/FlexMatch use 0.95
        flex_warmup: bool = True                         # FlexMatch's threshold warm-up (N_unused term)
        count_momentum: float = Field(0.99, ge=0, lt=1)  # EMA of the per-class counters (streaming FlexMatch)
        topk: int = Field(4, gt=0)                       # rows per class per batch (select: topk)
        fairness: float = Field(0.5, ge=0)
        target: Literal["hard", "soft"] = "hard"         # soft: the sharpened teacher distribution
        sharpen: float = Field(0.5, gt=0)                # target: soft's temperature T (MixMatch's 0.5)
        rampup_steps: int | None = Field(None, ge=0)     # default: 10% of train.steps
        bank_every: int = Field(10, gt=0)
        # teacher-first: the teacher scores every row of its kinds before the student pass, and only this many of
        # them go through the student (selected ones first, class-balanced, most confident first); the others cost
        # the teacher's forward only (online batch selection: Loshchilov & Hutter 2015; Mindermann et al. 2022)
        keep: int | None = Field(None, gt=0)

    needs_text = True
    uses_teacher = True

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        c, ctx = self.cfg, ctx or BuildContext()
        if not ctx.classnames:
            raise ValueError("objectives.pseudolabel: needs the labeled sources' class names (classnames.txt)")
        if c.rampup_steps is None:  # 10% of train.steps
            c.rampup_steps = (ctx.cfg.train.steps if ctx.cfg is not None else 1000) // 10
        templates = resolve_templates(ctx.cfg.data.templates) if ctx.cfg is not None else ["a photo of a {c}."]
        n = len(ctx.classnames)
        self.n_templates = len(templates)
        prompts = [t.format(c=name) for name in ctx.classnames for t in templates]
        self.register_buffer("prompt_tokens", ctx.tokenizer(prompts), persistent=False)
        self.register_buffer("bank", torch.zeros(n, 0))  # [C, D] once built (resized on the first refresh)
        self.register_buffer("bank_scale", torch.tensor(0.0))
        self.register_buffer("sigma", torch.zeros(n))
        self.register_buffer("unused", torch.tensor(0.0))

    @property
    def teacher_heads(self) -> tuple[str, ...]:
        """The classifier head (another objective's) when the teacher's classifier scores the rows."""
        return (CLASSIFIER,) if self.cfg.source != "bank" else ()

    @classmethod
    def check(cls, o, cfg):
        super().check(o, cfg)
        if o.keep is not None and cfg.train.accum_freq > 1:
            raise ValueError("objectives.pseudolabel.keep: the rows it keeps differ between train.accum_freq's "
                             "feature pass and its grad pass; use train.grad_accum, or no keep")
        if o.source != "bank" and not any(CLASSIFIER in OBJECTIVES[n].head_names
                                          for n, c in cfg.objectives.items() if c.weight > 0):
            raise ValueError(f"objectives.pseudolabel.source: {o.source} reads the classifier head; add an objective "
                             f"that trains it (objectives.supervised or multilabel) or use source: bank")

    def view_groups(self, ctx):
        weak = view_transform("weak", ctx.image_size, ctx.mean, ctx.std)
        return [ViewGroup("pseudolabel", tuple(self.cfg.kinds), (weak,), recipe="weak")]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if "bank" in state_dict:  # the bank's width is known once built
            self.bank = torch.empty_like(state_dict["bank"], device=self.bank.device)
        return super().load_state_dict(state_dict, strict, assign)

    # ---- the class bank -----------------------------------------------------------------------------------
    @torch.no_grad()
    def refresh_bank(self, model) -> None:
        """Prompt-ensembled class embeddings from the student's text tower (as a zero-shot classifier is built)."""
        clip = model.clip
        text = F.normalize(clip.encode_text(self.prompt_tokens).float(), dim=-1)
        bank = F.normalize(text.view(self.sigma.numel(), self.n_templates, -1).mean(1), dim=-1)
        self.bank = bank
        self.bank_scale.fill_(float(clip.logit_scale.exp()))

    def on_train_start(self, model):
        if self.bank.shape[1] == 0:  # a fresh run (a resumed one restored its bank)
            self.refresh_bank(model)

    def after_optimizer_step(self, model, step):
        if (step + 1) % self.cfg.bank_every == 0:
            self.refresh_bank(model)

    # ---- teacher --------------------------------------------------------------------------------------------
    @property
    def chooses_rows(self) -> bool:
        return self.cfg.keep is not None

    def teacher_select(self, teacher, batch, step):
        """``keep``: the teacher scores and selects every row of its kinds; the ``keep`` best of them (selected
        first) stay in the batch with every row of other kinds. The kept rows' teacher outputs and selection, and the
        teacher's accuracy over every scored row (rows with a withheld label, benchmarks only)."""
        out = self.teacher_forward(teacher, batch, step)
        probs = out["teacher/pseudolabel/probs"]
        pred, mask, thr = self.choose(probs)
        kept = keep_order(mask, probs.max(-1)[0], pred)[:self.cfg.keep].sort().values
        rows = batch.rows_of(tuple(self.cfg.kinds))
        keep = ~rows
        keep[rows.nonzero().squeeze(1)[kept]] = True
        scored = {"selected": mask.float().mean(), "kept": torch.tensor(kept.numel() / max(1, len(pred)))}
        out.update({"teacher/pseudolabel/probs": probs[kept], "pseudolabel/scored": scored,
                    "teacher/pseudolabel/choice": (pred[kept], mask[kept], thr[kept], len(pred))})
        hidden = batch.hidden_label[rows] if batch.hidden_label is not None else None
        if hidden is not None and (hidden >= 0).any():
            known = hidden >= 0
            scored["teacher_acc"] = (pred == hidden)[known].float().mean()
        return keep, out

    def teacher_forward(self, teacher, batch, step):
        t = teacher.model
        pooled = t.encode_pooled(batch.views["pseudolabel"][0])
        probs = []
        if self.cfg.source != "classifier":
            if self.bank.shape[1] == 0:  # before the first refresh: no opinion (nothing is selected)
                probs.append(torch.full((pooled.shape[0], self.sigma.numel()), 1.0 / self.sigma.numel(),
                                        device=pooled.device))
            else:
                emb = F.normalize(t.image_features(pooled).float(), dim=-1)
                probs.append((self.bank_scale * emb @ self.bank.T).softmax(-1))
        if self.cfg.source != "bank":
            probs.append(teacher.head(CLASSIFIER)(pooled).float().softmax(-1))
        ramp = self.cfg.rampup_steps
        ramp = min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0
        return {"teacher/pseudolabel/probs": sum(probs) / len(probs),
                "pseudolabel/ramp": torch.tensor(ramp, device=pooled.device)}

    # ---- selection ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def choose(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pseudo-label, selected mask, per-row threshold); FlexMatch counters are updated after selecting."""
        c = self.cfg
        conf, pred = probs.max(-1)
        if c.select == "topk":
            return pred, topk_per_class(conf, pred, c.topk), torch.zeros_like(conf)
        if c.select == "threshold":
            thr = torch.full_like(conf, c.tau)
        else:
            thr = flexmatch_thresholds(self.sigma, self.unused, c.tau, c.flex_warmup)[pred]
            confident = conf > c.tau
            counts = all_reduce_sum(torch.cat([torch.bincount(pred[confident], minlength=self.sigma.numel()).float(),
                                               (~confident).sum().float().view(1)]))
            m = c.count_momentum
            self.sigma.mul_(m).add_(counts[:-1], alpha=1 - m)
            self.unused.mul_(m).add_(counts[-1], alpha=1 - m)
        return pred, conf > thr, thr

    # ---- student loss ---------------------------------------------------------------------------------------
    def forward(self, outputs, batch):
        probs = outputs["teacher/pseudolabel/probs"].float()
        # keep: chosen before the student pass, and the loss is over every scored row (as without keep: FixMatch's
        # mean over the unlabeled rows), so keep changes which rows cost the student, not the loss's scale
        pred, mask, thr, scored = outputs.get("teacher/pseudolabel/choice") or (*self.choose(probs), probs.shape[0])
        rows = batch.rows_of(tuple(self.cfg.kinds))
        n = max(1, scored)
        target = pred if self.cfg.target == "hard" else sharpen(probs, self.cfg.sharpen)
        losses, student_probs = [], []
        source = self.cfg.source
        if source != "classifier" and self.bank.shape[1] > 0:
            logits = outputs["logit_scale"].float() * outputs["embed"][rows].float() @ self.bank.T
            losses.append((F.cross_entropy(logits, target, reduction="none") * mask).sum() / n)
            student_probs.append(logits.softmax(-1))
        if source != "bank":
            logits = outputs["class_logits"][rows].float()
            losses.append((F.cross_entropy(logits, target, reduction="none") * mask).sum() / n)
            student_probs.append(logits.softmax(-1))
        if not losses:  # no bank yet: a zero that keeps the graph
            return outputs["embed"].sum() * 0.0, {"selected": mask.float().mean()}
        student = sum(student_probs) / len(student_probs)
        student = gather_with_grad(student)  # the global mean prediction
        loss = sum(losses) / len(losses) + self.cfg.fairness * fairness(student)
        metrics = {"selected": mask.float().mean(), "threshold": thr.mean(), "confidence": probs.max(-1)[0].mean()}
        metrics.update({f"scored/{k}": v for k, v in outputs.get("pseudolabel/scored", {}).items()})
        if self.sigma.numel() <= 32:
            for c in range(self.sigma.numel()):
                metrics[f"selected/{c}"] = (mask & (pred == c)).float().sum() / n
        hidden = batch.hidden_label[rows] if batch.hidden_label is not None else None
        if hidden is not None and (hidden >= 0).any():
            known = hidden >= 0
            metrics["teacher_acc"] = (pred == hidden)[known].float().mean()
            sel = known & mask
            metrics["selected_acc"] = (pred == hidden)[sel].float().sum() / sel.sum().clamp_min(1)
        return outputs["pseudolabel/ramp"] * loss, {k: v.detach() for k, v in metrics.items()}
