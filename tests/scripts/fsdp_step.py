"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo). Accelerate refuses FSDP without an
accelerator, so the student is wrapped here with torch's FSDP1 itself, as configs/accelerate/fsdp.yaml asks
(FULL_SHARD, one unit per open_clip ResidualAttentionBlock, use_orig_params), after vlp's ``fsdp_ready``. One step
on this rank's half of grads_common's global batch: backward, SGD (lr 0.1), ``task.after_optimizer_step`` (the
momentum teacher's EMA against the sharded student). Then the trainer's gathered full state dict (rank 0) and a
SHARDED_STATE_DICT saved as accelerate's ``save_fsdp_model`` does (DCP ``{"model": state}`` into
``argv[1]/pytorch_model_fsdp_0``). Rank 0 writes the teacher's and the gathered weights to ``argv[1]/out.pt``."""
import functools
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from open_clip.transformer import ResidualAttentionBlock
from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from grads_common import build, global_batch, local_slice, loss_of  # noqa: E402

from vlp.checkpoint import clean_state  # noqa: E402
from vlp.task import fsdp_ready  # noqa: E402

acc = Accelerator(cpu=True)
rank, world = acc.process_index, acc.num_processes
out = Path(sys.argv[1])
task = build(rank, world)
batch, noise = global_batch(task.tokenizer)
local, local_noise = local_slice(batch, noise, rank, world)
model = FSDP(fsdp_ready(task.student), device_id=torch.device("cpu"), use_orig_params=True,
             auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                transformer_layer_cls={ResidualAttentionBlock}))
task.model, task._unwrap = model, acc.unwrap_model
opt = torch.optim.SGD(model.parameters(), lr=0.1)
loss_of(task, model, local, local_noise).backward()
opt.step()
task.after_optimizer_step(0)
with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True,
                                                                                    rank0_only=True)):
    full = model.state_dict()  # what accelerator.get_state_dict does for FSDP1
with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT):
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(out / "pytorch_model_fsdp_0"))
if rank == 0:
    torch.save({"teacher": task.teacher.state_dict_tracked(), "full": clean_state(full), "world": world,
                "sharded": sum(p.numel() for p in model.parameters())}, out / "out.pt")
acc.wait_for_everyone()
