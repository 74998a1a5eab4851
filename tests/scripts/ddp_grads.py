"""Run under `accelerate launch --multi_gpu --num_processes 2` (one machine, or two "nodes" of one process each):
one step's gradients of the full mixed loss (grads_common: CLIP with gathered features, MAE, supervised, teacher
pseudo-labels) on this rank's half of a fixed global batch. Rank 0 writes the flattened gradient to the path given
as argv[1]; with a shard spec as argv[2], also the keys each rank read in one exact epoch of those shards (the
trainer's rank split) and where each rank ran."""
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

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
out = {"grads": grads, "world": world}
if len(sys.argv) > 2:
    from vlp.config import SourceConfig
    from vlp.data.sources import Source

    source = Source(SourceConfig(kind="unlabeled", shards=sys.argv[2]))
    keys = [r["key"] for r in source.records(0, rank, world, resampled=False, epochs=1)]
    out["ranks"] = gather_object([{"rank": rank, "local_rank": acc.local_process_index, "keys": keys}])
if rank == 0:
    torch.save(out, sys.argv[1])
acc.wait_for_everyone()
