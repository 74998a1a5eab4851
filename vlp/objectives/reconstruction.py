"""MAE reconstruction (He et al. 2022): mean squared error on the masked patches only, against per-patch
normalized pixels (``norm_pix_loss``; the target patch minus its mean, over sqrt(var + 1e-6))."""
from __future__ import annotations

import torch

from pydantic import Field

from vlp.objectives.base import BuildContext, Objective, ObjectiveConfig, register
from vlp.objectives.masked_decoder import MAEDecoder, patchify


def mae_loss(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int,
             norm_pix: bool = True) -> torch.Tensor:
    """``pred [B, N, p*p*C]``, ``images [B, C, H, W]``, ``mask [B, N]`` (1 = masked) -> scalar loss."""
    if pred.shape[:2] != mask.shape:
        raise ValueError(f"MAE: prediction {tuple(pred.shape)} and mask {tuple(mask.shape)} disagree")
    target = patchify(images, patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum().clamp_min(1)


@register("mae")
class MAEObjective(Objective):
    """Reconstruct the masked patches of every row from the shared masked pass (a narrow decoder head)."""

    class Config(ObjectiveConfig):
        decoder_width: int = Field(128, gt=0)
        decoder_depth: int = Field(2, gt=0)
        decoder_heads: int = Field(4, gt=0)
        norm_pix_loss: bool = True

    head_names = ("mae_decoder",)

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        self.patch = (ctx or BuildContext()).patch

    @classmethod
    def check(cls, o, cfg):
        super().check(o, cfg)
        if cfg.model.mask_ratio == 0:
            raise ValueError("objectives.mae: model.mask_ratio is 0, so nothing is left to reconstruct "
                             "(MAE uses 0.75; FLIP-style runs 0.5)")

    @classmethod
    def card_settings(cls, o, cfg):
        return {"weight": o.weight, "mask_ratio": cfg.model.mask_ratio, "norm_pix_loss": o.norm_pix_loss,
                "decoder": f"{o.decoder_depth} layers x {o.decoder_width}"}

    def heads(self, ctx):
        if not ctx.is_vit:
            raise ValueError("objectives.mae: the image tower is not a ViT; MAE needs a patch-token ViT "
                             "(use an open_clip ViT config or drop the mae objective)")
        c = self.cfg
        return {"mae_decoder": MAEDecoder(ctx.width, ctx.grid, ctx.patch, c.decoder_width, c.decoder_depth,
                                          c.decoder_heads)}

    def forward(self, outputs, batch):
        loss = mae_loss(outputs["mae_pred"].float(), batch["image"].float(), outputs["mae_mask"], self.patch,
                        self.cfg.norm_pix_loss)
        return loss, {}
