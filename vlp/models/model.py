"""VLPModel, the trainable student: an open_clip CLIP model plus the heads that objectives add, sharing one pass.

In training the image tower runs once per step on the *visible* patches of every row (random masking from the
task's noise; FLIP, Li et al. 2023; MAE, He et al. 2022). The forward returns what that pass made::

    pooled [B,W]            pooled pre-projection feature of every row (the masked pass in training)
    tokens [B,1+keep,W]     ViT tokens after the final norm (ViT towers only)
    mask   [B,N]            1 = removed patch (masked pass only); ids_restore [B,N] undoes the shuffle
    embed [B,D]             L2-normalized contrastive-space embedding of every row from the shared pass
    image_features, text_features [T,D]  L2-normalized, rows with text (when a text objective is active; the
                            image side from the text rows' own pass when the contrastive objective masks differently)
    logit_scale, logit_bias

then every head adds its own outputs: ``outputs.update(head.head_forward(model, outputs, batch))``. A head that
needs another pass (views of its rows) runs it through :meth:`encode_pooled`. The model knows no objective names;
objectives declare their heads (``Objective.heads``). Evaluation and export use ``model.clip``, unmasked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from vlp.config import ModelConfig


def random_masking(noise: torch.Tensor, mask_ratio: float):
    """Per-sample random subset of patches from uniform ``noise [B, N]`` (lowest noise kept, as in MAE).

    Returns ``ids_keep [B, N_keep]``, ``mask [B, N]`` (1 = removed) and ``ids_restore [B, N]``.
    """
    B, N = noise.shape
    keep = max(1, int(round(N * (1 - mask_ratio))))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    mask = torch.ones(B, N, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return ids_keep, mask, ids_restore


def interpolate_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """A ViT's ``[1 + gh*gw, D]`` positional embedding for another patch grid: the patch positions resampled
    bicubically over the 2D grid, the class-token position kept (DINO's ``interpolate_pos_encoding``; the target
    size is given exactly, as timm's ``resample_abs_pos_embed``, instead of DINO's scale factor + 0.1)."""
    patches = pos[1:].reshape(1, *grid, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


def cls_attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """The class token's attention to the patches in one ``nn.MultiheadAttention`` self-attention: ``x [B, 1+N, D]``
    (batch first, the block's input after ``ln_1``; token 0 the class token) -> ``[B, N]``, softmax over all 1+N keys,
    mean over heads, the patch columns: row 0 of ``attn(x, x, x, need_weights=True, average_attn_weights=True)[1]``
    without the patch rows. open_clip's blocks call attention with ``need_weights=False``, so the map is recomputed
    from ``in_proj_weight`` / ``in_proj_bias``: q of the class token against k of every token (AttMask, Kakogeorgiou
    et al. 2022, Sec. 3; DINO's ``get_last_selfattention``)."""
    if attn.in_proj_weight is None:
        raise ValueError("cls_attention: needs a packed in_proj_weight (query, key and value of one width)")
    B, L, D = x.shape
    H = attn.num_heads
    w_q, w_k = attn.in_proj_weight[:D], attn.in_proj_weight[D:2 * D]
    b_q, b_k = (attn.in_proj_bias[:D], attn.in_proj_bias[D:2 * D]) if attn.in_proj_bias is not None else (None, None)
    q = F.linear(x[:, :1], w_q, b_q).reshape(B, 1, H, D // H).transpose(1, 2)  # [B, H, 1, d]
    k = F.linear(x, w_k, b_k).reshape(B, L, H, D // H).transpose(1, 2)  # [B, H, L, d]
    weights = torch.softmax((q * (D // H) ** -0.5) @ k.transpose(-2, -1), dim=-1)  # [B, H, 1, L]
    return weights.mean(dim=1)[:, 0, 1:]


class VLPModel(nn.Module):
    def __init__(self, clip: nn.Module, cfg: ModelConfig, heads: dict[str, nn.Module] | None = None,
                 use_text: bool = True):
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        self.use_text = use_text
        visual = clip.visual
        self.is_vit = isinstance(visual, VisionTransformer)
        if self.is_vit and getattr(visual, "attn_pool", None) is not None:
            raise ValueError("model.name: ViTs with attentional pooling are not supported by the masked pass")
        self.patch = visual.patch_size[0] if self.is_vit else None
        self.width = visual.conv1.out_channels if self.is_vit else self._feature_width(visual)
        self.head_names: list[str] = []
        for name, head in (heads or {}).items():
            self.add_head(name, head)
        if not use_text:  # nothing reads the text tower or the projection: frozen, so DDP expects no gradient
            for name, p in clip.named_parameters():
                if not name.startswith("visual.") or name == "visual.proj":
                    p.requires_grad_(False)
        if cfg.freeze_patch_embed:
            if not self.is_vit:
                raise ValueError("model.freeze_patch_embed: needs a ViT image tower (open_clip's VisionTransformer)")
            visual.conv1.requires_grad_(False)
        if cfg.lock_image:
            visual.lock(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
        if cfg.text.lock:
            clip.lock_text_tower(unlocked_layers=cfg.text.lock_unlocked_layers, freeze_layer_norm=True)

    def add_head(self, name: str, head: nn.Module) -> None:
        """Register an objective's head as ``self.<name>`` (its parameters are then ``<name>.*``)."""
        if hasattr(self, name):
            raise ValueError(f"head name {name!r} is taken")
        self.add_module(name, head)
        self.head_names.append(name)

    @staticmethod
    def _feature_width(visual) -> int:
        trunk = getattr(visual, "trunk", None)
        return getattr(trunk, "num_features", None) or visual.head.proj.in_features

    @property
    def num_patches(self) -> int:
        g = self.clip.visual.grid_size
        return g[0] * g[1]

    # ---- image tower ------------------------------------------------------------------------------------
    def encode_visible(self, images: torch.Tensor, ids_keep: torch.Tensor | None):
        """Run open_clip's ViT on the kept patches. Returns (pooled pre-projection feature, patch tokens).

        Same arithmetic as ``VisionTransformer.forward`` (embeds, ln_pre, transformer, pool), with the patch
        tokens gathered after the positional embedding, as PatchDropout and MAE do. Images whose patch grid is
        not the model's (DINO's local crops) get the positional embedding interpolated to their grid.
        """
        v = self.clip.visual
        x = v.transformer(self._embed(images, ids_keep))
        pooled, tokens = v._pool(x)
        return pooled, tokens

    def _embed(self, images: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """The ViT's input tokens ``[B, 1+keep, W]``: patch embeds + positions, the kept ones, the class token, ln_pre."""
        v = self.clip.visual
        x = v.conv1(images)
        grid = tuple(x.shape[-2:])
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        pos = v.positional_embedding
        if grid != tuple(v.grid_size):
            pos = interpolate_pos_embed(pos, tuple(v.grid_size), grid)
        pos = pos.to(x.dtype)
        x = x + pos[1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (v.class_embedding + pos[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        return v.ln_pre(torch.cat([cls, x], dim=1))

    def cls_patch_attention(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, N]``: the last block's class-token-to-patch attention (mean over heads) on the unmasked images, the
        score ``model.mask_policy: attention`` ranks patches by (AttMask; A-CLIP). Runs every block but the last
        one's attention output and MLP, which the map does not need."""
        if not self.is_vit:
            raise ValueError("cls_patch_attention: needs a ViT image tower")
        t = self.clip.visual.transformer
        x = self._embed(images, None)
        batch_first = getattr(t, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in t.resblocks[:-1]:
            x = block(x)
        last = t.resblocks[-1]
        h = last.ln_1(x)
        return cls_attention(last.attn, h if batch_first else h.transpose(0, 1))

    def encode_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled pre-projection feature of unmasked images (any tower): what views and the teacher read."""
        if self.is_vit:
            return self.encode_visible(images, None)[0]
        return self.clip.visual.trunk(images)

    def image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Project a pooled feature into the contrastive space, as the image tower's own forward does."""
        v = self.clip.visual
        if not self.is_vit:
            return v.head(pooled)
        return pooled @ v.proj if v.proj is not None else pooled

    # ---- one step ---------------------------------------------------------------------------------------
    def forward(self, batch, noise: torch.Tensor | None = None, text_ratio: float | None = None) -> dict:
        """Everything the objectives read, from one (masked) image pass plus the heads.

        ``noise [B, N]`` fixes the masking (lowest values kept); by default it is drawn from torch's RNG.
        ``text_ratio``: the contrastive rows' own masking ratio (None: they share the pass); when it differs from
        the shared pass's, those rows get a second pass masked with the same noise (FLIP's ratio for CLIP, 0-50%,
        beside MAE's 75%; 0 is FLIP's unmasked tuning).
        """
        images = batch["image"]
        out: dict = {}
        ratio = (self.cfg.mask_ratio or 0.0) if self.training else 0.0  # None: a config never resolved
        if self.is_vit:
            ids_keep = None
            if ratio > 0 or (text_ratio or 0) > 0:
                if noise is None:
                    noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
            if ratio > 0:
                ids_keep, out["mask"], out["ids_restore"] = random_masking(noise, ratio)
            pooled, out["tokens"] = self.encode_visible(images, ids_keep)
        else:
            pooled = self.clip.visual.trunk(images)
        out["pooled"] = pooled
        if self.use_text:
            has_text = batch["has_text"]
            if self.cfg.clip_unmasked and text_ratio is None:
                text_ratio = 0.0
            out["embed"] = F.normalize(self.image_features(pooled), dim=-1)
            if not self.training or not self.is_vit or text_ratio is None or text_ratio == ratio:
                out["image_features"] = out["embed"][has_text]
            else:
                keep = random_masking(noise[has_text], text_ratio)[0] if text_ratio > 0 else None
                image_embed = self.image_features(self.encode_visible(images[has_text], keep)[0])
                out["image_features"] = F.normalize(image_embed, dim=-1)
            out["text_features"] = F.normalize(self.clip.encode_text(batch["text"][has_text]), dim=-1)
            out["logit_scale"] = self.clip.logit_scale.exp()
            if getattr(self.clip, "logit_bias", None) is not None:
                out["logit_bias"] = self.clip.logit_bias
        for name in self.head_names:
            out.update(getattr(self, name).head_forward(self, out, batch))
        return out
