"""SimCLR, MoCo v3, SwAV and MSN, each alone, on a fixed model (and teacher) and a fixed global batch of views, shared
by the single-process and the 2-process gradient runs. Under `accelerate launch --multi_gpu --num_processes 2`: for each
method one `task.training_forward` on this rank's half of the batch and a backward; rank 0 writes every method's
student gradients to the path given as argv[1] (one launch for all)."""
import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.task import PretrainTask

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grads_common import grads, views_slice  # noqa: E402,F401  (grads: used by the tests)

PER_RANK, STEP = 3, 0
METHODS = {
    "simclr": {"hidden_dim": 32, "proj_dim": 16, "temperature": 0.2},         # NT-Xent, gathered with grad
    "mocov3": {"hidden_dim": 32, "proj_dim": 16, "temperature": 0.2},         # teacher keys gathered
    "swav": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 24, "n_local": 2,  # distributed Sinkhorn
             "projector_norm": "layer"},
    "swav-batchnorm": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 24, "n_local": 2,
                       "projector_norm": "batch"},                  # and BatchNorm over the global batch
    "msn": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 24},  # distributed Sinkhorn, me-max on the gathered mean
}
BASE = {
    "data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": PER_RANK}},
    "model": {"name": "vlp-test-vit", "mask_ratio": 0.0},
    "train": {"steps": 10},
}


def objective(case: str) -> str:
    """The objective a case of METHODS runs ("swav-batchnorm": swav)."""
    return case.split("-")[0]


def build(method: str, rank=0, world=1) -> PretrainTask:
    """The task for ``method`` alone; a teacher (MoCo v3) that is not a copy of the student."""
    cfg = copy.deepcopy(BASE)
    cfg["objectives"] = {objective(method): METHODS[method]}
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(cfg, check_files=False), rank, world)
    if task.teacher is not None:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in task.teacher.model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    task.on_train_start()  # SwAV: unit-length prototypes
    return task


def running_stats(model) -> dict[str, torch.Tensor]:
    """The BatchNorm running statistics (SwAV's projector): updated from the global batch's."""
    return {n: b.detach().clone() for n, b in model.named_buffers() if "running_" in n}


def global_batch(world=2) -> Batch:
    g = torch.Generator().manual_seed(1)
    n = world * PER_RANK
    views = {name: torch.randn(2, n, 3, 32, 32, generator=g) for name in ("simclr", "mocov3", "swav_global")}
    views["swav_local"] = torch.randn(2, n, 3, 16, 16, generator=g)
    views["msn"] = torch.randn(1, n, 3, 32, 32, generator=g)
    return Batch(image=torch.randn(n, 3, 32, 32, generator=g), text=torch.zeros(n, 16, dtype=torch.long),
                 has_text=torch.zeros(n, dtype=torch.bool), label=torch.full((n,), -1), kind=torch.full((n,), 2),
                 views=views)


if __name__ == "__main__":
    import sys

    from accelerate import Accelerator, DistributedDataParallelKwargs

    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = acc.process_index, acc.num_processes
    out = {"world": world}
    for method in METHODS:
        task = build(method, rank, world)
        task.model, task._unwrap = acc.prepare(task.student), acc.unwrap_model
        loss, _ = task.training_forward(views_slice(global_batch(world), rank, world), STEP)
        acc.backward(loss)
        out[method] = grads(task.student)
        out[f"{method}/running"] = running_stats(task.student)
        acc.wait_for_everyone()
    if rank == 0:
        torch.save(out, sys.argv[1])
    acc.wait_for_everyone()
