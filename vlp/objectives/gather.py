"""Cross-rank feature gathers and reductions for the self-supervised heads and losses (no objective here).

- :func:`gather_with_grad`: every rank's rows, differentiable (open_clip's ``gather_features(gather_with_grad=True)``,
  SLIP's ``GatherLayer``): the backward sums each rank's gradient for this rank's rows, so a loss that is a mean over
  the local rows, averaged by DDP, has the gradient of the same loss over the whole global batch in one process.
- :func:`gather_nograd`: every rank's rows as constants (MoCo v3's ``concat_all_gather``: the teacher's keys).
- :func:`all_reduce_sum`: a statistic summed over the ranks, in place, no gradient (DINO's center, SwAV's Sinkhorn
  sums, FlexMatch's and colorization's counts); :func:`broadcast`: rank ``src``'s tensor on every rank.

- :class:`GlobalBatchNorm1d`: BatchNorm over every rank's rows, statistics all-reduced with their gradient (torch's
  ``SyncBatchNorm``, which refuses CPU tensors, for any device and backend).

All are plain single-process operations outside an initialised process group of more than one rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x``, summed over the ranks in place (``dist.all_reduce``); returned for chaining."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """``x``, overwritten in place by rank ``src``'s; returned for chaining."""
    if rank_and_world()[1] > 1:
        dist.broadcast(x, src)
    return x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` (``[N, C]``) whose training statistics are those of the global batch: the per-channel sums
    (then the squared deviations from the global mean) are all-reduced with their gradient, so a DDP step equals one
    process on the whole batch (as ``SyncBatchNorm``, which the SwAV, SimCLR and BYOL reference heads use). In eval
    mode and in a single process it is ``BatchNorm1d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or rank_and_world()[1] == 1:
            return super().forward(x)
        import torch.distributed.nn

        total = torch.distributed.nn.all_reduce(torch.cat([x.sum(0), x.new_full((1,), x.shape[0])]))
        n = total[-1]
        mean = total[:-1] / n
        var = torch.distributed.nn.all_reduce(((x - mean) ** 2).sum(0)) / n  # two passes, as BatchNorm's own
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * n / (n - 1), m)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y
