"""MAE reconstruction (He et al. 2022): mean squared error on the masked patches only, against per-patch
normalized pixels (``norm_pix_loss``; the target patch minus its mean, over sqrt(var + 1e-6))."""
from __future__ import annotations

import torch

from vlp.models.mae import patchify
from vlp.objectives.base import Objective, register


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
    needs = ("mae_pred", "mae_mask")

    def __init__(self, patch: int, norm_pix: bool = True):
        super().__init__()
        self.patch = patch
        self.norm_pix = norm_pix

    @classmethod
    def from_config(cls, o, cfg, *, patch, rank, world_size):
        return cls(patch, cfg.model.mae.norm_pix_loss)

    @classmethod
    def card_settings(cls, o, cfg) -> dict:
        def get(name, older):  # the objective's own setting, else where older configs keep it (cfg.model[.mae])
            value = getattr(o, name, None)
            return value if value is not None else getattr(older, name)

        mae = getattr(cfg.model, "mae", None)
        return {"weight": o.weight, "mask_ratio": get("mask_ratio", cfg.model),
                "norm_pix_loss": get("norm_pix_loss", mae),
                "decoder": f"{get('decoder_depth', mae)} layers x {get('decoder_width', mae)}"}

    def forward(self, outputs, batch):
        loss = mae_loss(outputs["mae_pred"].float(), batch["image"].float(), outputs["mae_mask"], self.patch,
                        self.norm_pix)
        return loss, {}
