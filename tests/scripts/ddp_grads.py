"""Run under `accelerate launch --multi_gpu --num_processes 2`: one step's gradients of the full mixed loss
(grads_common: CLIP with gathered features, MAE, supervised, teacher pseudo-labels) on this rank's half of a fixed
global batch. Rank 0 writes the flattened gradient to the path given as argv[1]."""
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from grads_common import build, global_batch, local_slice, loss_of  # noqa: E402

acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
task = build(rank, world)
batch, noise = global_batch(task.tokenizer)
local, local_noise = local_slice(batch, noise, rank, world)
model = acc.prepare(task.student)
acc.backward(loss_of(task, model, local, local_noise))
grads = torch.cat([p.grad.flatten() for p in acc.unwrap_model(model).parameters() if p.grad is not None])
if rank == 0:
    torch.save({"grads": grads, "world": world}, sys.argv[1])
acc.wait_for_everyone()
