"""Frozen-feature probes: weighted kNN (as in DINO) and a logistic-regression linear probe."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlp.eval.zeroshot import input_dtype, unwrap


@torch.no_grad()
def extract_features(model, loader, device="cpu", feature: str = "embed"):
    """Normalized image features and labels of a labeled loader: ``(feats [N, D] float, labels [N] long)``.

    ``feature``: ``embed`` is ``encode_image`` (the contrastive embedding); ``pooled`` is a ViT's pooled token
    before the projection (the backbone feature: what SSL / supervised-only runs train, as DINO's kNN reads it)."""
    if feature not in ("embed", "pooled"):
        raise ValueError(f"feature must be 'embed' or 'pooled', got {feature!r}")
    model = unwrap(model)
    visual = model.visual
    proj = getattr(visual, "proj", None)
    if feature == "pooled" and proj is not None:
        visual.proj = None
    feats, labels = [], []
    try:
        for images, y in loader:
            feats.append(
                model.encode_image(images.to(device=device, dtype=input_dtype(model)), normalize=True).float().cpu())
            labels.append(torch.as_tensor(y, dtype=torch.long).cpu())
    finally:
        if feature == "pooled" and proj is not None:
            visual.proj = proj
    if not feats:
        raise ValueError("no samples")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_eval(train_feats, train_labels, test_feats, test_labels, k: int = 20, T: float = 0.07,
             num_classes: int | None = None, chunk: int = 1024) -> dict:
    """Weighted kNN: the k nearest train features by cosine similarity vote for their class with weight
    ``exp(sim / T)``; classes ranked by summed votes (only classes with a vote count towards top-5).
    Returns ``{"top1", "top5", "n"}``."""
    train_feats = F.normalize(torch.as_tensor(train_feats).float(), dim=-1)
    test_feats = F.normalize(torch.as_tensor(test_feats).float(), dim=-1)
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    test_labels = torch.as_tensor(test_labels, dtype=torch.long)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_feats.shape[0])
    top1 = top5 = 0
    for i in range(0, test_feats.shape[0], chunk):
        sim = test_feats[i:i + chunk] @ train_feats.T  # [B, Ntrain]
        sims, idx = sim.topk(k, dim=1)
        neighbors = train_labels[idx]  # [B, k]
        weights = (sims / T).exp()
        votes = torch.zeros(sim.shape[0], num_classes).scatter_add_(1, neighbors, weights)
        top = votes.topk(min(5, num_classes), dim=1)
        # a class without a vote is no prediction (ties among zero-vote classes would be arbitrary)
        hit = top.indices.eq(test_labels[i:i + chunk].view(-1, 1)) & (top.values > 0)
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(dim=1).sum())
    n = int(test_feats.shape[0])
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "n": n}


def linear_probe(train_feats, train_labels, test_feats, test_labels, C: float = 1.0, max_iter: int = 1000,
                 seed: int = 0, standardize: bool = True) -> dict:
    """Logistic regression (sklearn, L2, ``C``) on frozen features. Returns ``{"top1", "top5", "n"}``.

    ``standardize``: scale each feature by the training set's mean and std first (lbfgs converges in far fewer
    iterations). sklearn runs on one BLAS thread: on a small busy machine its lbfgs is much slower with more.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    xtr = np.asarray(torch.as_tensor(train_feats).float().numpy(), dtype=np.float64)
    xte = np.asarray(torch.as_tensor(test_feats).float().numpy(), dtype=np.float64)
    ytr = torch.as_tensor(train_labels).long().numpy()
    yte = torch.as_tensor(test_labels).long().numpy()
    if len(np.unique(ytr)) < 2:
        raise ValueError("linear probe needs at least two classes in the training set")
    if standardize:
        mean, std = xtr.mean(axis=0), xtr.std(axis=0) + 1e-6
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with threadpool_limits(1):
        clf.fit(xtr, ytr)
    proba = clf.predict_proba(xte)  # columns: clf.classes_
    order = np.argsort(-proba, axis=1)
    ranked = clf.classes_[order]
    top1 = float(np.mean(ranked[:, 0] == yte)) if len(yte) else 0.0
    top5 = float(np.mean((ranked[:, :5] == yte[:, None]).any(axis=1))) if len(yte) else 0.0
    return {"top1": top1, "top5": top5, "n": int(len(yte))}


def split_train_test(feats, labels, test_fraction: float = 0.2, seed: int = 0):
    """Deterministic per-class split: of each class's samples (shuffled by ``seed``), ``round(n * fraction)``
    go to test (at least one when the class has two or more, never all). Returns
    ``(train_feats, train_labels, test_feats, test_labels)``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    feats = torch.as_tensor(feats)
    labels = torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = torch.sort(torch.cat(train_idx)).values
    test_idx = torch.sort(torch.cat(test_idx)).values
    return feats[train_idx], labels[train_idx], feats[test_idx], labels[test_idx]
