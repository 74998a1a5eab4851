"""VLPModel: an open_clip CLIP model plus an MAE decoder and a classifier head, sharing one image pass.

In training the ViT image tower runs once per step on the *visible* patches only (random masking, ratio from
config): the contrastive loss reads the pooled visible tokens (FLIP, Li et al. 2023), the MAE decoder reads the
visible tokens (He et al. 2022), and the classifier reads the pooled feature. Evaluation and export use
``model.clip``, a plain open_clip model, unmasked.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from vlp.config import ModelConfig
from vlp.models.heads import ClassifierHead
from vlp.models.mae import MAEDecoder, random_masking


class VLPModel(nn.Module):
    def __init__(self, clip: nn.Module, cfg: ModelConfig, num_classes: int = 0, use_mae: bool = True,
                 use_text: bool = True):
        super().__init__()
        self.clip = clip
        self.cfg = cfg
        self.use_text = use_text
        visual = clip.visual
        self.is_vit = isinstance(visual, VisionTransformer)
        if use_mae and not self.is_vit:
            raise ValueError(f"objectives.mae: the image tower {type(visual).__name__} is not a ViT; "
                             f"MAE needs a patch-token ViT (use an open_clip ViT config or drop the mae objective)")
        if self.is_vit and getattr(visual, "attn_pool", None) is not None:
            raise ValueError("model.name: ViTs with attentional pooling are not supported by the masked pass")
        self.patch = visual.patch_size[0] if self.is_vit else None
        self.width = visual.conv1.out_channels if self.is_vit else self._feature_width(visual)
        self.mae_decoder = None
        if use_mae:
            m = cfg.mae
            self.mae_decoder = MAEDecoder(self.width, visual.grid_size, self.patch, m.decoder_width,
                                          m.decoder_depth, m.decoder_heads)
        self.classifier = ClassifierHead(self.width, num_classes) if num_classes > 0 else None
        if cfg.lock_image:
            visual.lock(unlocked_groups=0, freeze_bn_stats=True)
        if cfg.text.lock:
            clip.lock_text_tower(unlocked_layers=cfg.text.lock_unlocked_layers, freeze_layer_norm=True)

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
        tokens gathered after the positional embedding, as PatchDropout and MAE do.
        """
        v = self.clip.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        pos = v.positional_embedding.to(x.dtype)
        x = x + pos[1:]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (v.class_embedding + pos[0]).to(x.dtype).expand(x.shape[0], 1, -1)
        x = v.ln_pre(torch.cat([cls, x], dim=1))
        x = v.transformer(x)
        pooled, tokens = v._pool(x)
        return pooled, tokens

    def image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Project a pooled feature into the contrastive space, as the image tower's own forward does."""
        v = self.clip.visual
        if not self.is_vit:
            return v.head(pooled)
        return pooled @ v.proj if v.proj is not None else pooled

    # ---- one step ---------------------------------------------------------------------------------------
    def forward(self, batch: dict, noise: torch.Tensor | None = None) -> dict:
        """Everything the objectives read, from one (masked) image pass.

        ``noise [B, N]`` fixes the masking (lowest values kept); by default it is drawn from torch's RNG.
        """
        images = batch["image"]
        out: dict = {}
        ratio = self.cfg.mask_ratio if self.training else 0.0
        if self.is_vit:
            ids_keep = ids_restore = None
            if ratio > 0:
                if noise is None:
                    noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
                ids_keep, mask, ids_restore = random_masking(noise, ratio)
                out["mae_mask"] = mask
            pooled, tokens = self.encode_visible(images, ids_keep)
            if self.mae_decoder is not None:
                out["mae_pred"] = self.mae_decoder(tokens, ids_restore if ids_restore is not None
                                                   else torch.arange(tokens.shape[1], device=images.device).expand(tokens.shape[0], -1))
                if "mae_mask" not in out:
                    out["mae_mask"] = torch.ones(tokens.shape[:2], device=images.device)
        else:
            pooled = self._timm_pooled(images)
        if self.classifier is not None:
            out["class_logits"] = self.classifier(pooled)
        if self.use_text:
            has_text = batch["has_text"]
            if self.cfg.clip_unmasked and ratio > 0:
                image_embed = self.clip.encode_image(images[has_text])
            else:
                image_embed = self.image_features(pooled[has_text])
            out["image_features"] = F.normalize(image_embed, dim=-1)
            out["text_features"] = F.normalize(self.clip.encode_text(batch["text"][has_text]), dim=-1)
            out["logit_scale"] = self.clip.logit_scale.exp()
            if getattr(self.clip, "logit_bias", None) is not None:
                out["logit_bias"] = self.clip.logit_bias
        return out

    def _timm_pooled(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk feature of a timm image tower (before open_clip's projection head)."""
        visual = self.clip.visual
        return visual.trunk(images)


def build_vlp_model(clip: nn.Module, cfg, num_classes: int) -> VLPModel:
    """VLPModel for a run config: the MAE decoder, classifier and text use follow the active objectives."""
    return VLPModel(clip, cfg.model,
                    num_classes=num_classes if cfg.objective_weight("supervised") > 0 else 0,
                    use_mae=cfg.objective_weight("mae") > 0,
                    use_text=cfg.objective_weight("contrastive") > 0)
