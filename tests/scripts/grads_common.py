"""A fixed model and a fixed global mixed batch, shared by the single-process and 2-process gradient runs: CLIP/UniCL
(gathered features, own 50% masking ratio), MAE (75%), supervised, and teacher pseudo-labels (FlexMatch counters
all-reduced, fairness on the gathered mean prediction)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives import combine
from vlp.task import PretrainTask

PER_RANK = {"paired": 3, "labeled": 2, "unlabeled": 1}
CFG = {
    "data": {"sources": [{"kind": k, "shards": "x.tar"} for k in PER_RANK], "batch": PER_RANK},
    "model": {"name": "vlp-test-vit", "mask_ratio": 0.75},
    "objectives": {"contrastive": {"weight": 1.0, "labels_as_text": True, "mask_ratio": 0.5},
                   "mae": {"weight": 0.5}, "supervised": {"weight": 0.3},
                   "pseudolabel": {"weight": 0.7, "rampup_steps": 0}},
}


def build(rank=0, world=1):
    cfg = config_from_dict(CFG, check_files=False)
    torch.manual_seed(0)
    task = PretrainTask(cfg, rank, world, classnames=[f"class {i}" for i in range(4)])
    model = task.student
    torch.nn.init.normal_(model.classifier.fc.weight, std=0.1)  # zero-init head would hide its gradient path
    task.on_train_start()  # the pseudo-label class bank
    return task


def loss_of(task, model, batch, noise, step=0):
    """The task's step with explicit masking noise: student pass, teacher outputs, weighted objectives."""
    outputs = model(batch, noise=noise, text_ratio=task.text_pass_ratio(step))
    for obj, _ in task.objectives.values():
        if obj.uses_teacher:
            with torch.no_grad():
                outputs.update(obj.teacher_forward(task.teacher, batch, step))
    return combine(task.objectives, outputs, batch)[0]


def global_batch(tok, world=2):
    """World x per-rank rows; every rank's slice has the same composition (paired, labeled, unlabeled)."""
    g = torch.Generator().manual_seed(1)
    n = sum(PER_RANK.values())
    rows = []
    for r in range(world):
        for i in range(n):
            kind = 0 if i < 3 else (1 if i < 5 else 2)
            label = -1 if kind != 1 else (i + r) % 2  # a class shared across ranks: UniCL positives cross ranks
            text = f"a caption {r}-{i}" if kind == 0 else (f"a photo of class {label}" if kind == 1 else "")
            rows.append((kind, label, text))
    kind = torch.tensor([k for k, _, _ in rows])
    batch = Batch(image=torch.randn(world * n, 3, 32, 32, generator=g), text=tok([t for _, _, t in rows]),
                  has_text=torch.tensor([k in (0, 1) for k, _, _ in rows]),
                  label=torch.tensor([lab for _, lab, _ in rows]), kind=kind,
                  views={"pseudolabel": torch.randn(1, int((kind == 2).sum()), 3, 32, 32, generator=g)})
    batch.text[~batch.has_text] = 0
    noise = torch.rand(world * n, 16, generator=g)
    return batch, noise


def local_slice(batch, noise, rank, world):
    n = batch.image.shape[0] // world
    sl = slice(rank * n, (rank + 1) * n)
    u = batch.views["pseudolabel"].shape[1] // world  # the group's rows, in batch order
    return Batch(batch.image[sl], batch.text[sl], batch.has_text[sl], batch.label[sl], batch.kind[sl],
                 {"pseudolabel": batch.views["pseudolabel"][:, rank * u:(rank + 1) * u]}), noise[sl]


def views_slice(batch: Batch, rank: int, world: int) -> Batch:
    """This rank's rows of a global batch of view-only objectives (no masking noise)."""
    n = len(batch) // world
    sl = slice(rank * n, (rank + 1) * n)
    return Batch(batch.image[sl], batch.text[sl], batch.has_text[sl], batch.label[sl], batch.kind[sl],
                 {k: v[:, sl] for k, v in batch.views.items()})


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
