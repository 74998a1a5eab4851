"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations"): two strong
views of each row, a projection MLP on the pooled feature, and the NT-Xent loss: each view's positive is the other
view of its row, its negatives the ``2N - 2`` other views of the *global* batch (features gathered across ranks with
their gradient, as SLIP's ``SIMCLRLoss`` and open_clip's ``gather_with_grad``). Beside the CLIP objective on
image-text rows this is SLIP (Mu et al. 2022). The MLP uses LayerNorm instead of BatchNorm (as BYOL here), so the
loss of a row does not depend on which rank holds the others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from vlp.data.views import view_transform
from vlp.objectives.base import Objective, RowsConfig, ViewGroup, register
from vlp.objectives.gather import gather_with_grad, rank_and_world
from vlp.objectives.heads import Head, mlp

LARGE_NUM = 1e9  # SimCLR / SLIP mask a view's similarity with itself by subtracting this


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over this rank's rows ``z1, z2 [n, D]`` (the two views) against every rank's (SLIP's SIMCLRLoss):
    for view ``a`` of row ``i`` the logits are ``cos(a_i, b_j) / T`` for all ``j`` and ``cos(a_i, a_j) / T`` for
    ``j != i`` (``j`` over the global batch), the target ``b_i``; the mean cross-entropy over both views."""
    z1, z2 = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    k1, k2 = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device) + rank_and_world()[0] * n
    self_mask = F.one_hot(labels, k1.shape[0]).to(z1.dtype) * LARGE_NUM
    logits_aa = z1 @ k1.T / temperature - self_mask
    logits_bb = z2 @ k2.T / temperature - self_mask
    logits_ab, logits_ba = z1 @ k2.T / temperature, z2 @ k1.T / temperature
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
    return (loss_a + loss_b) / 2


class SimCLRHead(Head):
    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__()
        self.projector = mlp(width, hidden, dim)

    def head_forward(self, model, outputs, batch) -> dict:
        views = batch.views["simclr"]                                  # [2, B, 3, H, W]
        z = self.projector(model.encode_pooled(views.flatten(0, 1)))
        return {"simclr/z": z.unflatten(0, views.shape[:2]).transpose(0, 1)}  # [B, 2, D]: rows first


@register("simclr")
class SimCLRObjective(Objective):
    class Config(RowsConfig):
        hidden_dim: int = Field(1024, gt=0)
        proj_dim: int = Field(128, gt=0)
        temperature: float = Field(0.2, gt=0)   # 0.1-0.5 in the paper (0.5 for CIFAR-10 at batch 512)
        crop_scale: tuple[float, float] = (0.2, 1.0)
        blur_p: float = Field(0.5, ge=0, le=1)  # the paper drops blur for CIFAR-10

    head_names = ("simclr_head",)
    # under train.accum_freq the negatives are the whole accumulated batch, as CLIP's (open_clip_train's feature
    # cache): one big batch's gradient
    accumulates = ("simclr/z",)

    def heads(self, ctx):
        return {"simclr_head": SimCLRHead(ctx.width, self.cfg.hidden_dim, self.cfg.proj_dim)}

    def view_groups(self, ctx):
        c = self.cfg
        t = view_transform("strong", ctx.image_size, ctx.mean, ctx.std, scale=c.crop_scale, blur_p=c.blur_p,
                           solarize_p=0.0)
        return [ViewGroup("simclr", tuple(c.kinds), (t, t), recipe=f"simclr{c.crop_scale}-blur{c.blur_p}")]

    def forward(self, outputs, batch):
        z = outputs["simclr/z"]
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            loss = nt_xent(z[:, 0], z[:, 1], self.cfg.temperature)
        with torch.no_grad():
            pos = F.cosine_similarity(z[:, 0], z[:, 1], dim=-1).mean()
        return loss, {"pos_cos": pos}
