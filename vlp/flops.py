"""Training FLOPs per step of a run config, counted by ``torch.utils.flop_counter.FlopCounterMode``.

One step is what the trainer runs per optimizer step (``grad_accum`` 1)::

    loss, _ = task.training_forward(batch, step)   # student pass, heads, every no-grad teacher forward
    loss.backward(); task.after_backward(step)
    task.after_optimizer_step(step)                # objective hooks (periodic work included), teacher EMA

counted on a synthetic :class:`~vlp.data.batch.Batch` of the run's exact composition: ``data.batch`` rows per kind
in the mixer's order (paired, labeled, unlabeled), real tokenized text on the rows that carry text (captions from
the run's templates; labeled rows too when an objective uses labels as text), labels on labeled rows, and every
view group the objectives asked for at the size its transforms produce. The student is in train mode, so the
masked pass is the one counted. The mean over ``steps`` consecutive steps amortizes hooks that run periodically.

FlopCounterMode counts matmuls, convolutions and attention (forward and backward), which is where a transformer
spends its arithmetic; element-wise work (norms, activations, the optimizer update, the EMA) is not counted.
"""
from __future__ import annotations

import random
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from vlp.config import Config
from vlp.data.format import KINDS
from vlp.data.batch import KIND_ID, Batch
from vlp.data.transforms import resolve_templates


def synthetic_batch(task, classnames: list[str] | None, seed: int = 0) -> Batch:
    """A batch with the run's composition, text, labels and view groups (random pixels; shapes are what count)."""
    cfg: Config = task.cfg
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    size = task.ctx.image_size
    names = classnames or [str(i) for i in range(max(1, task.num_classes))]
    templates = resolve_templates(cfg.data.templates)
    kinds = [k for k in KINDS for _ in range(getattr(cfg.data.batch, k))]
    labels, texts, has_text = [], [], []
    for i, kind in enumerate(kinds):
        y = i % len(names)
        labels.append(y if kind == "labeled" else -1)
        text = rng.choice(templates).format(c=names[y])
        carries = kind == "paired" or (kind == "labeled" and task.labels_as_text)
        has_text.append(carries)
        texts.append(text if carries else "")
    tokens = task.tokenizer(texts)
    tokens[~torch.tensor(has_text)] = 0
    kind = torch.tensor([KIND_ID[k] for k in kinds], dtype=torch.long)
    batch = Batch(image=torch.randn(len(kinds), 3, size, size, generator=g), text=tokens,
                  has_text=torch.tensor(has_text), label=torch.tensor(labels, dtype=torch.long), kind=kind)
    dummy = Image.new("RGB", (size, size), (128, 128, 128))
    for group in task.view_groups:
        rows = int(batch.rows_of(group.kinds).sum())
        shapes = {tuple(t(dummy).shape) for t in group.transforms}
        if len(shapes) != 1:
            raise ValueError(f"view group {group.name!r}: views of different sizes {sorted(shapes)}")
        batch.views[group.name] = torch.randn(len(group.transforms), rows, *shapes.pop(), generator=g)
    return batch


def count_training_flops(task, batch: Batch, steps: int = 10, start_step: int = 0) -> float:
    """Mean FLOPs per training step over ``steps`` consecutive steps (forward, backward, hooks)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    task.student.train()
    counter = FlopCounterMode(display=False)
    with counter:
        for step in range(start_step, start_step + steps):
            loss, _ = task.training_forward(batch, step)
            loss.backward()
            task.after_backward(step)
            task.after_optimizer_step(step)
            task.student.zero_grad(set_to_none=True)
    return counter.get_total_flops() / steps


def forward_split(task, batch: Batch, step: int = 0) -> dict[str, float]:
    """FLOPs of one training forward by part: ``image tower`` (every student pass through it, views included),
    ``text tower``, ``head <name>`` (each head's own modules), ``student other``, ``teacher`` (the no-grad teacher
    forwards), ``losses`` (the objectives' own arithmetic). Forward only: FlopCounterMode attributes backward FLOPs
    to modules unreliably, so no split of the whole step is given."""
    task.student.train()
    student, full = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad():
        seen = task.choose_rows(batch, step)[0]  # the rows the student's pass sees (a teacher may choose them)
        with student:
            task.model(seen, noise=task.masking_noise(seen, step, 0))
        with full:
            task.training_forward(batch, step)
    root = type(task.student).__name__
    per = {name: sum(ops.values()) for name, ops in student.get_flop_counts().items()}
    parts = {"image tower": _module_flops(per, f"{root}.clip.visual"),
             "text tower": _module_flops(per, f"{root}.clip.transformer")}
    for head in task.student.head_names:
        parts[f"head {head}"] = _module_flops(per, f"{root}.{head}")
    parts["student other"] = per.get(root, 0) - sum(parts.values())  # e.g. the text projection, the logit scale
    full_per = {name: sum(ops.values()) for name, ops in full.get_flop_counts().items()}
    parts["losses"] = sum(full_per.get(type(obj).__name__, 0) for obj, _ in task.objectives.values())
    # teacher forwards call its submodules directly (not under one name): the rest of the training forward
    parts["teacher"] = full.get_total_flops() - student.get_total_flops() - parts["losses"]
    return {k: float(v) for k, v in parts.items() if v}


def _module_flops(per: dict[str, int], name: str) -> int:
    """FLOPs under module ``name``; a module whose forward was not called (the masked pass calls the ViT's
    children directly) counts as the sum of its children's."""
    if name in per:
        return per[name]
    children = {k[:k.index(".", len(name) + 1)] if "." in k[len(name) + 1:] else k
                for k in per if k.startswith(name + ".")}
    return sum(_module_flops(per, c) for c in children)


def training_flops_per_step(cfg: Config, classnames: list[str] | None = None, steps: int = 10,
                            breakdown: bool = False, seed: int = 0):
    """Training FLOPs per step of ``cfg`` (mean over ``steps`` steps; see the module docstring). With
    ``breakdown`` returns ``(total, forward_split)``: the split of one forward by part (:func:`forward_split`)."""
    from vlp.task import PretrainTask

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        task = PretrainTask(cfg, 0, 1, classnames)
        batch = synthetic_batch(task, classnames, seed)
        total = count_training_flops(task, batch, steps)
        if not breakdown:
            return total
        return total, forward_split(task, batch)
