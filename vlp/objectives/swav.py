"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments"):
swapped prediction of online cluster codes. Each crop's projection (L2-normalised) is scored against ``n_prototypes``
prototypes (a bias-free linear layer whose rows are re-normalised to unit length before every step, as the
reference); the codes of each of the 2 global crops are computed with 3 Sinkhorn-Knopp iterations over the *global*
batch (``distributed_sinkhorn``: the sums all-reduced across ranks) and predicted from every other crop, global and
local (multi-crop, DINO's view machinery: local crops at half the image size through the interpolated positional
embedding): ``-sum_k q log softmax(s / T)``, averaged as the reference ``main_swav.py``. The prototypes' gradient
is dropped for the first ``freeze_prototypes_steps`` steps. For small batches, ``queue_length`` keeps each process's
last embeddings of the 2 global crops; once full, their scores against the current prototypes join the Sinkhorn
input, so the codes equipartition the prototypes over queue + batch (the reference's ``--queue_length``, per process).
The projector's hidden layer uses BatchNorm over the global batch (``projector_norm: batch``, the reference's SyncBN:
statistics all-reduced with their gradient, so a row's loss does not depend on its rank), or LayerNorm (``layer``).
``swav/code_entropy`` is the mean entropy of the first crop's codes (the targets the loss used): near ln K the codes
are uniform and the swapped prediction teaches nothing.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from vlp.objectives.base import Objective, RowsConfig, register
from vlp.objectives.gather import all_reduce_sum, rank_and_world
from vlp.objectives.heads import Head, mlp, multicrop_groups, multicrop_pooled


@torch.no_grad()
def distributed_sinkhorn(out: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Codes ``[B, K]`` for scores ``out [B, K]`` (this rank's rows): the reference's ``distributed_sinkhorn``,
    equal prototype mass over the global batch; every sum is all-reduced across ranks."""
    Q = torch.exp(out.float() / epsilon).t()  # K x B
    B, K = Q.shape[1] * rank_and_world()[1], Q.shape[0]
    Q /= all_reduce_sum(torch.sum(Q))
    for _ in range(iterations):
        Q /= all_reduce_sum(torch.sum(Q, dim=1, keepdim=True))  # each prototype: total mass 1/K
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)              # each sample: mass 1/B
        Q /= B
    Q *= B  # the columns sum to 1: a code per sample
    return Q.t()


def swav_codes(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
               queued: torch.Tensor | None = None) -> torch.Tensor:
    """``[2, B, K]``: the Sinkhorn codes of the 2 global crops' ``scores [V, B, K]`` (views 0, 1). ``queued [2, Q,
    K]``: scores of queued embeddings of crop ``i``, prepended to its Sinkhorn input (codes of the batch rows only
    are kept), as the reference's queue."""
    B = scores.shape[1]
    return torch.stack([distributed_sinkhorn(scores[i].detach() if queued is None else
                                             torch.cat([queued[i], scores[i].detach()]), epsilon, iterations)[-B:]
                        for i in range(2)])


def swav_loss(scores: torch.Tensor, temperature: float, epsilon: float = 0.05, iterations: int = 3,
              queued: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> torch.Tensor:
    """``scores [V, B, K]`` (views 0, 1 the global crops): for each global crop ``i`` its Sinkhorn codes
    (:func:`swav_codes`, or ``codes`` already computed) are the target of every other view ``v``; the sub-losses
    averaged over the ``V - 1`` predicting views, then over ``i``."""
    V = scores.shape[0]
    codes = swav_codes(scores, epsilon, iterations, queued) if codes is None else codes
    loss = scores.new_zeros(())
    for i in range(2):
        sub = sum(-(codes[i] * F.log_softmax(scores[v] / temperature, dim=-1)).sum(-1).mean()
                  for v in range(V) if v != i)
        loss = loss + sub / (V - 1)
    return loss / 2


class SwAVHead(Head):
    def __init__(self, width: int, hidden: int, dim: int, n_prototypes: int, n_local: int = 0, norm: str = "batch"):
        super().__init__()
        self.projector = mlp(width, hidden, dim, norm=norm)
        self.prototypes = nn.Linear(dim, n_prototypes, bias=False)
        self.n_local = n_local

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Unit-length prototype rows (the reference does this before every forward)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def head_forward(self, model, outputs, batch) -> dict:
        pooled = torch.cat(multicrop_pooled(model, batch, "swav", self.n_local))
        rows = batch.views["swav_global"].shape[1]
        z = F.normalize(self.projector(pooled), dim=-1).unflatten(0, (-1, rows))  # [2 + n_local, B, D]
        return {"swav/scores": self.prototypes(z), "swav/z": z[:2].detach(),
                "swav/prototypes": self.prototypes.weight.detach()}


@register("swav")
class SwAVObjective(Objective):
    class Config(RowsConfig):
        n_prototypes: int = Field(512, gt=0)    # 3000 in the paper (ImageNet)
        hidden_dim: int = Field(1024, gt=0)
        proj_dim: int = Field(128, gt=0)
        temperature: float = Field(0.1, gt=0)
        epsilon: float = Field(0.05, gt=0)
        sinkhorn_iterations: int = Field(3, ge=1)
        n_local: int = Field(4, ge=0)
        global_scale: tuple[float, float] = (0.14, 1.0)
        local_scale: tuple[float, float] = (0.05, 0.14)
        local_size: int | None = Field(None, gt=0)       # default: half the image size, a multiple of the patch
        freeze_prototypes_steps: int = Field(0, ge=0)
        queue_length: int = Field(0, ge=0)               # rows per process (the reference: 3840 / world size); 0: none
        projector_norm: Literal["batch", "layer"] = "batch"  # batch: over the global batch (the reference's SyncBN)

    head_names = ("swav_head",)
    per_process_state = ("queue",)  # each process queues its own rows, as the reference's queue<rank>.pth

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        queue = torch.zeros(2, self.cfg.queue_length, self.cfg.proj_dim) if self.cfg.queue_length else None
        self.register_buffer("queue", queue)  # saved in checkpoints, per rank (None: no queue, not saved)

    def heads(self, ctx):
        c = self.cfg
        return {"swav_head": SwAVHead(ctx.width, c.hidden_dim, c.proj_dim, c.n_prototypes, c.n_local,
                                      c.projector_norm)}

    def view_groups(self, ctx):
        strong = {"blur_p": 0.5, "solarize_p": 0.0}  # SwAV's colour distortion + PIL blur (p 0.5), no solarize
        return multicrop_groups("swav", self.cfg, ctx, (strong, strong), strong)

    def on_train_start(self, model):
        model.swav_head.normalize_prototypes()

    def after_backward(self, model, step):
        if step < self.cfg.freeze_prototypes_steps:  # the reference's freeze_prototypes_niters
            model.swav_head.prototypes.weight.grad = None

    def after_optimizer_step(self, model, step):
        model.swav_head.normalize_prototypes()

    def forward(self, outputs, batch):
        c, scores = self.cfg, outputs["swav/scores"]
        with torch.autocast(scores.device.type, enabled=False):
            queued = self.queued_scores(outputs)
            codes = swav_codes(scores.float(), c.epsilon, c.sinkhorn_iterations, queued)
            loss = swav_loss(scores.float(), c.temperature, codes=codes)
        with torch.no_grad():
            mean_p = F.softmax(scores[:2].float() / c.temperature, dim=-1).flatten(0, 1).mean(0)
        return loss, {"mean_entropy": torch.special.entr(mean_p).sum(),  # -> 0: one-prototype collapse
                      "code_entropy": torch.special.entr(codes[0]).sum(-1).mean()}  # ln K: uniform, no signal

    @torch.no_grad()
    def queued_scores(self, outputs) -> torch.Tensor | None:
        """The queue's scores against the current prototypes once it is full (its last row written), else None;
        then this batch's global-crop embeddings enter the queue at the front, the oldest leave at the back."""
        if self.queue is None:
            return None
        queued = self.queue @ outputs["swav/prototypes"].float().t() if bool(self.queue[:, -1].any()) else None
        z = outputs["swav/z"].float()
        self.queue.copy_(torch.cat([z, self.queue], dim=1)[:, :self.queue.shape[1]])
        return queued
