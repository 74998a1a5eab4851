"""DINO alone on a fixed model, teacher, center and global batch of views, shared by the single-process and the
2-process gradient runs. Under `accelerate launch --multi_gpu --num_processes 2`: one `task.training_forward` on this
rank's half of the batch (the center all-reduced after the loss); rank 0 writes the student's gradients and the
updated center to the path given as argv[1]."""
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

PER_RANK, STEP = 3, 1  # STEP inside the teacher-temperature warm-up
CFG = {
    "data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": PER_RANK}},
    "model": {"name": "vlp-test-vit", "mask_ratio": 0.0},
    "objectives": {"dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 2,
                            "warmup_teacher_temp": 0.02, "warmup_teacher_temp_steps": 4}},
    "train": {"steps": 10},
}


def build(rank=0, world=1, **dino) -> PretrainTask:
    """The task, with a teacher that is not a copy of the student and a non-zero center."""
    cfg = copy.deepcopy(CFG)
    cfg["objectives"]["dino"].update(dino)
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(cfg, check_files=False), rank, world)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in task.teacher.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        task.objectives["dino"][0].center.copy_(0.05 * torch.randn(1, 64, generator=g))
    return task


def global_batch(world=2) -> Batch:
    g = torch.Generator().manual_seed(1)
    n = world * PER_RANK
    return Batch(image=torch.randn(n, 3, 32, 32, generator=g), text=torch.zeros(n, 16, dtype=torch.long),
                 has_text=torch.zeros(n, dtype=torch.bool), label=torch.full((n,), -1), kind=torch.full((n,), 2),
                 views={"dino_global": torch.randn(2, n, 3, 32, 32, generator=g),
                        "dino_local": torch.randn(2, n, 3, 16, 16, generator=g)})


if __name__ == "__main__":
    import sys

    from accelerate import Accelerator, DistributedDataParallelKwargs

    # an image-only student leaves the text tower (and the contrastive projection) without gradients
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    rank, world = acc.process_index, acc.num_processes
    task = build(rank, world)
    task.model, task._unwrap = acc.prepare(task.student), acc.unwrap_model
    loss, _ = task.training_forward(views_slice(global_batch(world), rank, world), STEP)
    acc.backward(loss)
    if rank == 0:
        torch.save({"grads": grads(task.student), "center": task.objectives["dino"][0].center, "world": world},
                   sys.argv[1])
    acc.wait_for_everyone()
