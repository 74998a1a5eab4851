"""Cross-rank feature gathers for the self-supervised losses (no objective here).

- :func:`gather_with_grad`: every rank's rows, differentiable (open_clip's ``gather_features(gather_with_grad=True)``,
  SLIP's ``GatherLayer``): the backward sums each rank's gradient for this rank's rows, so a loss that is a mean over
  the local rows, averaged by DDP, has the gradient of the same loss over the whole global batch in one process.
- :func:`gather_nograd`: every rank's rows as constants (MoCo v3's ``concat_all_gather``: the teacher's keys).

Both are the identity outside an initialised process group of more than one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[world * n, ...]``: the ranks' ``x`` in rank order, with gradients flowing back to every rank."""
    if rank_and_world()[1] == 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """``[world * n, ...]``: the ranks' ``x`` in rank order, detached."""
    world = rank_and_world()[1]
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
