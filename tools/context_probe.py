"""Why context prediction (Doersch et al. 2015, ``vlp/objectives/context.py``) does not clear random init on the
CIFAR-10 bench: its pretext task and the kNN of its features, step by step, in a bare loop.

The loop trains the real student and :class:`~vlp.objectives.context.ContextHead` (its geometry, sampling of the
center patch and a neighbour, and 8-way cross-entropy) on the bench's unlabeled images, without the trainer's shared
masked pass (which context prediction does not read), at a constant lr after a linear warm-up; every
``--knn-every`` steps it prints the validation kNN top-1 (the ``pooled`` feature on whole 32px images, k=20, memory:
the labeled split; never the test set) beside the pretext accuracy (chance 1/8). Variants of the encoding, each a
question the README's context row asks:

* ``tiles`` (the objective's: each patch encoded alone, the pooled feature); ``tiles-up``: each patch resized to the
  model's image size first, so the encoder sees the token grid it sees at evaluation;
* ``pair`` (the objective's ``encode: pair``): the two patches side by side as one image, each patch's feature the
  mean of its tokens (as Jigsaw's ``encode: image``); ``pair-cls``: the same image, classified from its pooled token;
* ``--tile-norm`` (the objective's ``tile_norm``): each patch's channels normalized alone (Jigsaw's guard against
  low-level shortcuts);
* ``--encoder cnn``: a 2-layer CNN instead of the ViT, to ask whether the task is learnable at this geometry at all.

    python tools/bench_quality.py --prepare-only          # the shards; bench_quality's runs write a val/ split
    python tools/context_probe.py --encode pair --tile-norm --steps 6000 --knn-every 1500
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.evaluate import pooled_and_embed  # noqa: E402


def load_images(shards: str, n: int) -> torch.Tensor:
    """The first ``n`` images of ``shards`` as uint8 ``[n, 3, H, W]``, read by webdataset."""
    import glob

    import numpy as np
    import webdataset as wds

    files = sorted(glob.glob(shards))
    if not files:
        raise SystemExit(f"no shards match {shards}: run python tools/bench_quality.py --prepare-only first")
    out = []
    for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False).decode("pil"):
        image = next(sample[k] for k in ("jpg", "png", "webp", "jpeg") if k in sample)
        out.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
        if len(out) == n:
            break
    return torch.stack(out)


class SmallCNN(torch.nn.Module):
    """Two 3x3 conv layers and global pooling: a context-free patch encoder with no positional anything."""

    def __init__(self, width: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, width))

    def encode_pooled(self, x):
        return self.net(x)


def logits_of(args, model, head, pair_cls, patches: torch.Tensor) -> torch.Tensor:
    """The 8 logits of ``patches [B, 2, 3, t, t]`` (center, neighbour) under ``args.encode``."""
    if args.encode == "tiles-up":
        size = model.clip.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        patches = F.interpolate(patches.flatten(0, 1), size=size, mode="bilinear", antialias=True,
                                align_corners=False).unflatten(0, patches.shape[:2])
    if args.encode == "pair-cls":
        return pair_cls(model.encode_visible(torch.cat([patches[:, 0], patches[:, 1]], dim=-1), None)[0])
    return head.classify(model, patches)                                 # the objective's tiles or pair


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shards", default="bench_out/quality/shards")
    p.add_argument("--val", default="bench_out/quality/val", help="labeled validation shards (kNN queries)")
    p.add_argument("--model", default="vlp-tiny-vit")
    p.add_argument("--encode", choices=("tiles", "tiles-up", "pair", "pair-cls"), default="tiles")
    p.add_argument("--encoder", choices=("vit", "cnn"), default="vit")
    p.add_argument("--tile-norm", action="store_true")
    p.add_argument("--patch-size", type=int, default=None, help="tile side (default: the objective's)")
    p.add_argument("--gap", type=int, default=None)
    p.add_argument("--jitter", type=int, default=None)
    p.add_argument("--crop-min", type=float, default=0.5, help="the view's random-crop scale lower bound")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=8000, help="unlabeled images held in memory")
    p.add_argument("--knn-every", type=int, default=0, help="validation kNN every N steps (0: start and end)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.encoder == "cnn" and args.encode != "tiles":
        p.error("--encoder cnn encodes tiles alone")
    if args.threads:
        torch.set_num_threads(args.threads)

    from torchvision.transforms import v2

    from vlp.config import config_from_dict
    from vlp.eval.data import labeled_loader
    from vlp.eval.probe import knn_eval
    from vlp.models.factory import image_transforms
    from vlp.task import PretrainTask

    shards = Path(args.shards)
    images = load_images(str(shards / "unlabeled" / "*.tar"), args.images)
    context = {k: v for k, v in (("patch_size", args.patch_size), ("gap", args.gap), ("jitter", args.jitter)) if v}
    context.update(tile_norm=args.tile_norm, encode="pair" if args.encode == "pair" else "tiles")
    cfg = {"data": {"sources": [{"kind": "unlabeled", "shards": "unused.tar"}], "batch": {"unlabeled": args.batch}},
           "model": {"name": args.model, "mask_ratio": 0.0}, "objectives": {"context": context}}
    torch.manual_seed(args.seed)
    task = PretrainTask(config_from_dict(cfg, check_files=False))
    student, ctx = task.student, task.ctx
    head = student.context_head
    pair_cls = torch.nn.Sequential(torch.nn.Linear(student.clip.visual.transformer.width, 512), torch.nn.GELU(),
                                   torch.nn.Linear(512, 8))
    encoder = SmallCNN(student.clip.visual.transformer.width) if args.encoder == "cnn" else student
    params = [*student.parameters(), *(pair_cls.parameters() if args.encode == "pair-cls" else ()),
              *(encoder.parameters() if args.encoder == "cnn" else ())]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    view = 3 * head.tile + 2 * head.gap + 2 * head.jitter
    crop = v2.RandomResizedCrop(view, scale=(args.crop_min, 1.0), antialias=True)
    mean, std = torch.tensor(ctx.mean)[:, None, None], torch.tensor(ctx.std)[:, None, None]  # the context view's
    preprocess = image_transforms(student.clip)[1]

    def val_knn() -> float:
        student.eval()
        memory = pooled_and_embed(student.clip, labeled_loader(str(shards / "labeled"), preprocess, 256, 1))
        queries = pooled_and_embed(student.clip, labeled_loader(args.val, preprocess, 256, 1))
        student.train()
        return knn_eval(memory[0], memory[2], queries[0], queries[2], k=20, T=0.07, num_classes=10)["top1"]

    def say(**record):
        print(json.dumps(record), flush=True)
        return record

    history = [say(step=0, val_knn=val_knn())]
    losses, hits, t0 = [], [], time.time()
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
        idx = torch.randint(0, len(images), (args.batch,))
        views = torch.stack([crop(images[i]) for i in idx]).float().div(255).sub(mean).div(std)
        patches, target = head.sample(views)                             # with the objective's tile_norm
        logits = logits_of(args, encoder if args.encoder == "cnn" else student, head, pair_cls, patches)
        loss = F.cross_entropy(logits, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        losses.append(loss.item())
        hits.append((logits.argmax(-1) == target).float().mean().item())
        knn_now = step == args.steps or (args.knn_every and step % args.knn_every == 0)
        if step % args.log_every == 0 or knn_now:
            n = min(len(losses), args.log_every)
            record = {"step": step, "loss": round(sum(losses[-n:]) / n, 4), "acc": round(sum(hits[-n:]) / n, 4),
                      "s": round(time.time() - t0, 1)}
            if knn_now:
                record["val_knn"] = val_knn()
                history.append(record)
            say(**record)
    return {"args": vars(args), "history": history}


if __name__ == "__main__":
    main()
