"""The masked decoder of MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners") and what reads the
shared masked pass: ``patchify`` (the pixel targets, MAE's and BEiT's), ``visible_layout`` (the pass's visible tokens,
restore order and mask) and :class:`MAEDecoder`, the narrow decoder that fills mask tokens and predicts every patch
(MAE's pixels; BEiT's codes, with another output layer). The random masking itself is the model's
(``vlp.models.model.random_masking``)."""
from __future__ import annotations

import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from vlp.objectives.heads import Head


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, N, patch*patch*C]``, patches in row-major order (the ViT token order)."""
    B, C, H, W = images.shape
    h, w = H // patch, W // patch
    x = images.reshape(B, C, h, patch, w, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, patch * patch * C)


class MAEDecoder(Head):
    """Embeds visible encoder tokens, fills mask tokens, adds fixed 2-D sin-cos positions, runs a few
    transformer blocks and predicts the pixels of every patch."""

    def __init__(self, encoder_width: int, grid: tuple[int, int], patch: int, width: int = 128, depth: int = 2,
                 heads: int = 4, channels: int = 3):
        super().__init__()
        self.grid = grid
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        assert grid[0] == grid[1], "MAE decoder expects a square patch grid"
        pos = torch.from_numpy(get_2d_sincos_pos_embed(width, grid[0])).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, patch * patch * channels)
        trunc_normal_(self.mask_token, std=0.02)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``visible [B, N_keep, encoder_width]`` -> pixel predictions ``[B, N, patch*patch*C]``."""
        x = self.embed(visible)
        B, keep, D = x.shape
        N = ids_restore.shape[1]
        x = torch.cat([x, self.mask_token.expand(B, N - keep, D).to(x.dtype)], dim=1)
        x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(B, N, D))
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))

    def head_forward(self, model, outputs, batch) -> dict:
        """Reads the shared pass's visible tokens; writes ``mae_pred`` and ``mae_mask`` (all ones unmasked)."""
        tokens, ids_restore, mask = visible_layout(outputs)
        return {"mae_pred": self(tokens, ids_restore), "mae_mask": mask}


def visible_layout(outputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared pass's visible tokens, the order that restores the full patch sequence and the mask (1 =
    masked); an unmasked pass is the identity order with every patch marked (the whole image is the target)."""
    tokens = outputs["tokens"]
    ids_restore = outputs.get("ids_restore")
    if ids_restore is None:
        ids_restore = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
    mask = outputs.get("mask")
    if mask is None:
        mask = torch.ones(tokens.shape[:2], device=tokens.device)
    return tokens, ids_restore, mask
