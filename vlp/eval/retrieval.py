"""Image-text retrieval recall@k with clip_benchmark's conventions.

``image_retrieval_recall@k``: text -> image; the fraction of texts whose image is among the top-k images.
``text_retrieval_recall@k``: image -> text; the fraction of images for which ANY of their captions is among
the top-k texts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from vlp.eval.zeroshot import input_dtype, unwrap


@torch.no_grad()
def extract_retrieval_features(model, tokenizer, loader, device="cpu", text_batch_size: int = 256):
    """Normalized features of every image and every caption of a retrieval loader.

    Returns ``(image_feats [N, D], text_feats [T, D], text_to_image LongTensor [T])`` where ``text_to_image[t]``
    is the index of caption ``t``'s image.
    """
    model = unwrap(model)
    image_feats, texts, text_to_image = [], [], []
    n = 0
    for images, captions in loader:
        image_feats.append(
            model.encode_image(images.to(device=device, dtype=input_dtype(model)), normalize=True).float().cpu())
        for i, caps in enumerate(captions):
            if isinstance(caps, str):
                caps = [caps]
            texts.extend(caps)
            text_to_image.extend([n + i] * len(caps))
        n += len(images)
    text_feats = []
    for i in range(0, len(texts), text_batch_size):
        tokens = tokenizer(texts[i:i + text_batch_size]).to(device)
        text_feats.append(model.encode_text(tokens, normalize=True).float().cpu())
    dim = image_feats[0].shape[1] if image_feats else 0
    image_feats = torch.cat(image_feats) if image_feats else torch.zeros(0, dim)
    text_feats = torch.cat(text_feats) if text_feats else torch.zeros(0, dim)
    return image_feats, text_feats, torch.tensor(text_to_image, dtype=torch.long)


def _any_positive_in_topk(scores: torch.Tensor, positive: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """For each row of ``scores``, whether any of its top-k columns is positive. ``[rows]`` bool."""
    k = min(k, scores.shape[1])
    out = []
    for i in range(0, scores.shape[0], chunk):
        idx = scores[i:i + chunk].topk(k, dim=1).indices
        out.append(positive[i:i + chunk].gather(1, idx).any(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@torch.no_grad()
def retrieval_recall(image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways on (re)normalized features; see the module docstring for the conventions."""
    image_feats = F.normalize(image_feats.float(), dim=-1)
    text_feats = F.normalize(text_feats.float(), dim=-1)
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.long)
    n_img, n_txt = image_feats.shape[0], text_feats.shape[0]
    if text_to_image.shape[0] != n_txt:
        raise ValueError(f"text_to_image has {text_to_image.shape[0]} entries for {n_txt} texts")
    scores = text_feats @ image_feats.T  # [T, N]
    positive = torch.zeros(n_txt, n_img, dtype=torch.bool)
    positive[torch.arange(n_txt), text_to_image] = True
    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = float(_any_positive_in_topk(scores, positive, k).float().mean())
        metrics[f"text_retrieval_recall@{k}"] = float(
            _any_positive_in_topk(scores.T.contiguous(), positive.T.contiguous(), k).float().mean())
    return metrics


@torch.no_grad()
def retrieval_eval(model, tokenizer, loader, device="cpu", ks: Sequence[int] = (1, 5, 10)) -> dict:
    image_feats, text_feats, text_to_image = extract_retrieval_features(model, tokenizer, loader, device)
    if not len(image_feats) or not len(text_feats):  # recall over nothing is NaN, printed as a result
        raise ValueError(f"retrieval evaluation: the data yielded {len(image_feats)} images and {len(text_feats)} "
                         f"captions; it needs image-caption pairs (.txt / .json captions; check the shard spec)")
    metrics = retrieval_recall(image_feats, text_feats, text_to_image, ks)
    metrics["n_images"] = int(image_feats.shape[0])
    metrics["n_texts"] = int(text_feats.shape[0])
    return metrics
