"""BEiT masked image modeling (Bao, Dong, Piao & Wei 2021, "BEiT: BERT Pre-Training of Image Transformers",
arXiv:2106.08254): predict the discrete visual token of every masked patch. The loss is the paper's (Eq. 1)
``-sum_{i in M} log p(z_i | x^M)``, as its code computes it: the mean over the batch's masked positions of the
cross-entropy between the prediction at position ``i`` and the code ``z_i`` the tokenizer gives patch ``i`` of the
*unmasked* image.

Tokenizer: BEiT's DALL-E dVAE cannot be downloaded here, so the tokenizer is built in-project, a codebook of ``K``
centroids (``codebook_size``, default 512, capped to the first step's patches) over per-patch normalized pixel
patches (each patch minus its mean, over its standard deviation: MAE's ``norm_pix`` target, the patch normalization
of Coates, Lee & Ng 2011's k-means features); a patch's code is its nearest centroid. The default fits it by k-means
(random distinct patches as the initial centroids from a generator seeded by the run's seed, ``kmeans_iters`` Lloyd
iterations) on the first training step's patches: each rank's share of ``fit_patches`` (sampled with a generator
seeded by seed and rank), gathered from every rank; rank 0's result is broadcast, so every rank holds the same
codebook. It is the default because it needs no download, no other run and no extra encoder pass; it is saved with
the run (``beit.codebook`` in ``objectives.safetensors``) and a resume keeps it instead of refitting.
``codebook: PATH`` reuses a saved one instead (a safetensors file with ``codebook`` or a run's ``beit.codebook``).

Departures: the k-means pixel-patch codebook instead of the DALL-E dVAE (coarser tokens: local intensity patterns,
not a learned 8192-word vocabulary); the student's pass is vlp's shared masked pass (the encoder sees the visible
patches only, with ``model.mask_ratio``'s random masking, not BEiT's blockwise 40% with mask tokens in the encoder),
and a narrow decoder (MAE's, ``vlp.objectives.masked_decoder.MAEDecoder``, with mask tokens at the removed
positions) predicts the ``K`` logits of every position, as CAE / MAE with token targets do.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

from vlp.data.sources import stream_seed
from vlp.objectives.base import BuildContext, Objective, ObjectiveConfig, register
from vlp.objectives.gather import broadcast, gather_nograd, rank_and_world
from vlp.objectives.heads import Head
from vlp.objectives.masked_decoder import MAEDecoder, patchify, visible_layout

log = logging.getLogger("vlp.objectives.beit")


def patch_features(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``images [B, C, H, W]`` -> ``[B, N, p*p*C]`` float32 patches, each normalized to zero mean, unit variance
    (``(x - mean) / sqrt(var + 1e-6)``, MAE's ``norm_pix`` target): what the tokenizer quantizes."""
    x = patchify(images.float(), patch)
    return (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1.0e-6) ** 0.5


@torch.no_grad()
def assign(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 1 << 14) -> torch.Tensor:
    """``x [..., D]`` -> ``[...]`` index of the nearest centroid of ``codebook [K, D]`` (squared Euclidean:
    ``argmin_k |c_k|^2 - 2 x.c_k``, ``|x|^2`` being the same for every k)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    c = codebook.float()
    c2 = (c * c).sum(1)
    out = [(c2 - 2 * part @ c.T).argmin(1) for part in flat.split(chunk)]
    return torch.cat(out).reshape(x.shape[:-1])


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, list[float]]:
    """Lloyd's k-means of ``x [M, D]``: ``k`` distinct rows drawn with ``generator`` as initial centroids, then
    ``iters`` rounds of assign / mean (an empty cluster keeps its centroid). Returns the centroids ``[k, D]`` and
    the inertia (mean squared distance to the nearest centroid) before each round and after the last."""
    x = x.float()
    if x.shape[0] < k:
        raise ValueError(f"k-means: {k} centroids from only {x.shape[0]} points")
    c = x[torch.randperm(x.shape[0], generator=generator)[:k].to(x.device)].clone()
    inertia = []
    for _ in range(iters + 1):
        idx = assign(x, c)
        inertia.append(float(((x - c[idx]) ** 2).sum(1).mean()))
        if len(inertia) > iters:
            break
        sums = torch.zeros_like(c).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).to(x.dtype)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c, inertia


def beit_loss(logits: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions (``mask [B, N]``, 1 = masked) of ``-log softmax(logits [B, N, K])[code]``
    (BEiT Eq. 1, normalized by the number of masked patches, as the official code's ``CrossEntropyLoss``)."""
    m = mask.bool()
    return F.cross_entropy(logits[m].float(), codes[m])


class BEiTHead(Head):
    """MAE's decoder (visible tokens + mask tokens, 2-D sin-cos positions, a few blocks) with a ``K``-way
    classifier in place of the pixel predictor; writes ``beit/logits [B, N, K]`` and ``beit/mask``."""

    def __init__(self, encoder_width: int, grid, patch: int, n_codes: int, width: int, depth: int, heads: int):
        super().__init__()
        self.decoder = MAEDecoder(encoder_width, grid, patch, width, depth, heads)
        self.decoder.pred = nn.Linear(width, n_codes)
        nn.init.xavier_uniform_(self.decoder.pred.weight)
        nn.init.zeros_(self.decoder.pred.bias)

    def head_forward(self, model, outputs, batch) -> dict:
        tokens, ids_restore, mask = visible_layout(outputs)
        return {"beit/logits": self.decoder(tokens, ids_restore), "beit/mask": mask}


def read_codebook(path: str) -> torch.Tensor:
    """A saved ``[K, D]`` codebook: key ``codebook``, or ``beit.codebook`` (a run's ``objectives.safetensors``)."""
    state = load_file(str(Path(path).expanduser()))
    for key in ("codebook", "beit.codebook"):
        if key in state:
            return state[key].float()
    raise ValueError(f"objectives.beit.codebook: {path} holds no 'codebook' or 'beit.codebook' tensor "
                     f"(it has {sorted(state)[:5]})")


@register("beit")
class BEiTObjective(Objective):
    """Cross-entropy of the masked patches' predicted codes against the tokenizer's codes of the unmasked image."""

    class Config(ObjectiveConfig):
        codebook_size: int = Field(512, gt=1)      # K words (BEiT: 8192); default: <= the first step's patches
        codebook: str | None = None                # a saved [K, D] codebook to reuse (a run's objectives.safetensors)
        kmeans_iters: int = Field(20, ge=0)        # Lloyd iterations of the fit
        fit_patches: int = Field(65536, gt=0)      # at most this many patches of the first step (all ranks) fit it
        decoder_width: int = Field(128, gt=0)      # MAE's decoder (mask tokens, sin-cos positions): width
        decoder_depth: int = Field(2, gt=0)        # its transformer blocks
        decoder_heads: int = Field(4, gt=0)        # their attention heads

    head_names = ("beit_decoder",)

    def __init__(self, cfg=None, ctx=None):
        super().__init__(cfg, ctx)
        c, ctx = self.cfg, ctx or BuildContext()
        if not ctx.is_vit:
            raise ValueError("objectives.beit: the image tower is not a ViT; BEiT predicts a code per patch token "
                             "(use an open_clip ViT config or drop the beit objective)")
        self.patch, self.seed, channels = ctx.patch, ctx.seed, 3
        dim = self.patch * self.patch * channels
        saved = read_codebook(c.codebook) if c.codebook else None
        if saved is not None and (saved.ndim != 2 or saved.shape[1] != dim):
            raise ValueError(f"objectives.beit.codebook: {c.codebook} is {tuple(saved.shape)}, this model's patches "
                             f"need [K, {dim}] ({self.patch}x{self.patch}x{channels})")
        k = saved.shape[0] if saved is not None else self.codebook_words(c, ctx)
        self.register_buffer("codebook", saved.clone() if saved is not None else torch.zeros(k, dim))
        self.register_buffer("fitted", torch.tensor(float(saved is not None)))

    @staticmethod
    def codebook_words(c, ctx) -> int:
        """``codebook_size``; the default is capped to the patches of the first step, a value set is not."""
        k = c.codebook_size
        if ctx.cfg is not None:
            local = ctx.cfg.data.batch.total * ctx.grid[0] * ctx.grid[1]
            available = min(local, max(1, c.fit_patches // ctx.world_size)) * ctx.world_size
            if available < k:
                if "codebook_size" in c.model_fields_set:
                    raise ValueError(f"objectives.beit.codebook_size: {k} centroids, but the first step fits them "
                                     f"on {available} patches; lower it or raise the batch (or fit_patches)")
                log.warning("objectives.beit: the first step holds %d patches, fewer than the default codebook_size "
                            "%d: the codebook has %d words", available, k, available)
                k = available
        return k

    @classmethod
    def check(cls, o, cfg):
        super().check(o, cfg)
        if cfg.model.mask_ratio == 0:
            raise ValueError("objectives.beit: model.mask_ratio is 0, so no patch is masked to predict "
                             "(BEiT masks 40%; MAE-style decoders 75%)")

    @classmethod
    def card_settings(cls, o, cfg):
        return {"weight": o.weight, "mask_ratio": cfg.model.mask_ratio,
                "tokenizer": o.codebook or ("k-means of normalized pixel patches, K="
                                            + (str(o.codebook_size) if "codebook_size" in o.model_fields_set
                                               else f"{o.codebook_size} or the first step's patches if fewer")),
                "decoder": f"{o.decoder_depth} layers x {o.decoder_width}"}

    def heads(self, ctx):
        c = self.cfg
        return {"beit_decoder": BEiTHead(ctx.width, ctx.grid, ctx.patch, self.codebook.shape[0], c.decoder_width,
                                         c.decoder_depth, c.decoder_heads)}

    @torch.no_grad()
    def fit(self, patches: torch.Tensor) -> list[float]:
        """Fit the codebook on ``patches [M, D]``: each rank's (at most ``fit_patches / world`` of them, sampled
        with a generator seeded by (seed, rank)) gathered from every rank; rank 0's result is broadcast. Returns the
        k-means inertia curve."""
        x = patches.reshape(-1, patches.shape[-1]).float()
        rank, world = rank_and_world()
        per_rank = max(1, self.cfg.fit_patches // world)  # each rank's share, sampled before the gather
        if x.shape[0] > per_rank:
            pick = torch.Generator().manual_seed(stream_seed(self.seed, "beit-fit-sample", rank))
            x = x[torch.randperm(x.shape[0], generator=pick)[:per_rank].to(x.device)]
        x = gather_nograd(x)
        g = torch.Generator().manual_seed(stream_seed(self.seed, "beit-codebook"))
        centroids, inertia = kmeans(x, self.codebook.shape[0], self.cfg.kmeans_iters, g)
        self.codebook.copy_(broadcast(centroids.to(self.codebook.device), 0))
        self.fitted.fill_(1)
        return inertia

    def forward(self, outputs, batch):
        logits, mask = outputs["beit/logits"], outputs["beit/mask"]
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            x = patch_features(batch["image"], self.patch)
            if not self.fitted:
                self.fit(x)
            codes = assign(x, self.codebook)
        with torch.autocast(logits.device.type, enabled=False):
            loss = beit_loss(logits.float(), codes, mask)
        with torch.no_grad():
            m = mask.bool()
            acc = (logits[m].argmax(-1) == codes[m]).float().mean()
            used = codes.unique().numel() / self.codebook.shape[0]
        return loss, {"acc": acc, "codes_used": torch.tensor(used, device=logits.device)}
