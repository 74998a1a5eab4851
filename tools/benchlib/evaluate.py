"""A run's frozen features through ``vlp.eval``: kNN, linear-probe and zero-shot top-1 on the CIFAR-10 split, probes
fit on its labeled 10% (``tools/bench_quality.py``'s docstring has the protocol)."""
from __future__ import annotations

import time
from pathlib import Path

from benchlib.cifar import CAPTION_TEMPLATES, CLASSNAMES, SIMPLE_TEMPLATE


def pooled_and_embed(clip, loader):
    """(pooled [N, W], embed [N, D] normalized, labels [N]) over a labeled loader; one unmasked forward each.

    ``pooled`` is the ViT's pooled token (after ln_post, before the CLIP projection); ``embed`` is exactly
    ``clip.encode_image(x, normalize=True)`` (pooled @ proj, normalized). ``vlp.eval.probe.extract_features`` gives
    one of them per pass, normalized: the linear probe here standardizes the raw pooled token, and both come from
    the same forward."""
    import torch
    import torch.nn.functional as F

    from vlp.eval.zeroshot import input_dtype

    visual = clip.visual
    proj = visual.proj
    device = next(visual.parameters()).device
    pooled, embed, labels = [], [], []
    visual.proj = None
    try:
        with torch.no_grad():
            for images, y in loader:
                p = visual(images.to(device, input_dtype(clip))).float()
                pooled.append(p.cpu())
                embed.append(F.normalize(p @ proj.float() if proj is not None else p, dim=-1).cpu())
                labels.append(y)
    finally:
        visual.proj = proj
    return torch.cat(pooled), torch.cat(embed), torch.cat(labels)


def standardize(train, test):
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def evaluate_run(run_dir: Path, shards: Path, val: Path | None = None, batch_size: int = 256) -> dict:
    """``{"test": {...}, "val": {...}}``: probes fit on the labeled split; see the module docstring."""
    import torch

    from vlp.models.factory import load_clip

    t0 = time.time()
    torch.manual_seed(0)
    clip, _, tokenizer, preprocess = load_clip(run_dir)
    out = evaluate_clip(clip, tokenizer, preprocess, shards, val, batch_size)
    out["eval_s"] = round(time.time() - t0, 1)
    return out


def evaluate_clip(clip, tokenizer, preprocess, shards: Path, val: Path | None = None, batch_size: int = 256) -> dict:
    """:func:`evaluate_run` on a CLIP model in memory (``tools/bench_ssl.py``'s random-init row)."""
    import torch
    from threadpoolctl import threadpool_limits

    from vlp.eval.data import labeled_loader
    from vlp.eval.probe import knn_eval, linear_probe
    from vlp.eval.zeroshot import build_classifier

    if torch.cuda.is_available():  # features on the GPU; the probes run on the CPU copies
        clip = clip.cuda()
    feats = {split: pooled_and_embed(clip, labeled_loader(str(folder), preprocess, batch_size, 1))
             for split, folder in (("train", shards / "labeled"), ("test", shards / "test"), ("val", val)) if folder}
    tr_pooled, tr_embed, tr_y = feats["train"]
    device = next(clip.parameters()).device
    classifiers = {name: build_classifier(clip, tokenizer, CLASSNAMES, templates, device=device).cpu()  # [D, C]
                   for name, templates in (("templates", CAPTION_TEMPLATES), ("photo", SIMPLE_TEMPLATE))}
    out: dict = {}
    for split in ("test", "val"):
        if split not in feats:
            continue
        te_pooled, te_embed, te_y = feats[split]
        res: dict = {"n_probe_train": int(len(tr_y)), "n": int(len(te_y))}
        for name, tr, te in (("pooled", tr_pooled, te_pooled), ("embed", tr_embed, te_embed)):
            res[f"knn_top1/{name}"] = knn_eval(tr, tr_y, te, te_y, k=20, T=0.07, num_classes=len(CLASSNAMES))["top1"]
            if split == "test":
                a, b = standardize(tr, te)
                # one BLAS/OpenMP thread: on a busy 2-core machine sklearn's lbfgs spins ~100x slower with two
                with threadpool_limits(1):
                    res[f"linear_top1/{name}"] = linear_probe(a, tr_y, b, te_y, C=1.0, max_iter=2000)["top1"]
        for name, weights in classifiers.items():
            if split == "test" or name == "templates":
                res[f"zeroshot_top1/{name}"] = float(((te_embed @ weights).argmax(dim=1) == te_y).float().mean())
        out[split] = res
    return out
