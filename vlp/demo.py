"""The embedded demo: real images bundled in a dependency, written as all three kinds of shards, then trained.

Images: scikit-learn's handwritten digits (1,797 scans, 8x8 grey levels; Alpaydin & Kaynak 1998), upsampled to
32x32 RGB JPEGs. Held out first (a fixed, class-stratified 300), the rest is split into labeled (20%),
image-text (35%; captions made from the label with varied templates, acceptable for a demo only) and unlabeled
(45%; labels dropped). ``vlp demo`` writes them, trains ``configs/demo.yaml``, prints zero-shot top-1 on the
held-out digits, and writes an export folder. The root of the shard folders is a clip_benchmark webdataset dataset
(split ``test``: ``test/nshards.txt``, ``test/0.tar ...``, ``classnames.txt`` and the templates file).
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from vlp.data.format import CLASSNAMES_FILE, SIZES_FILE
from vlp.eval.data import TEMPLATES_FILE
from vlp.shards.write import write_class_files, write_samples

CLASSNAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the digit {c}.", "a handwritten {c}.", "the number {c}, written by hand.",
    "a scan of a handwritten digit {c}.", "{c}", "a small grey picture of a {c}.",
    "someone wrote the number {c}.", "a blurry digit: {c}.",
]
TEST_TEMPLATES = ["a photo of the digit {c}.", "a handwritten {c}.", "the number {c}."]


def digit_jpeg(pixels: np.ndarray, size: int = 32) -> bytes:
    """8x8 grey levels 0..16 -> a ``size`` x ``size`` RGB JPEG (bicubic upsampling, white digit on black)."""
    img = Image.fromarray((pixels.reshape(8, 8) * (255.0 / 16.0)).astype(np.uint8), mode="L")
    img = img.resize((size, size), Image.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def split_digits(seed: int = 0, n_test: int = 300):
    """Indices for (test, labeled, paired, unlabeled); the test set is class-stratified."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(digits.target):
        by_class.setdefault(int(y), []).append(i)
    test = []
    for y, idx in sorted(by_class.items()):
        rng.shuffle(idx)
        test.extend(idx[: n_test // len(by_class)])
    rest = [i for i in range(len(digits.target)) if i not in set(test)]
    rng.shuffle(rest)
    n_lab, n_pair = int(0.20 * len(rest)), int(0.35 * len(rest))
    return digits, test, rest[:n_lab], rest[n_lab:n_lab + n_pair], rest[n_lab + n_pair:]


def write_demo_shards(out: str | Path, seed: int = 0, maxcount: int = 150) -> dict[str, int]:
    """Write ``test``, ``labeled``, ``paired`` and ``unlabeled`` shard folders under ``out``. Returns counts."""
    out = Path(out)
    digits, test, labeled, paired, unlabeled = split_digits(seed)
    rng = random.Random(seed + 1)

    def samples(indices, kind):
        for i in indices:
            y = int(digits.target[i])
            s = {"__key__": f"digit{i:05d}", "jpg": digit_jpeg(digits.data[i])}
            if kind in ("labeled", "test"):
                s["cls"] = str(y)
            elif kind == "paired":
                caption = rng.choice(CAPTION_TEMPLATES).format(c=CLASSNAMES[y])
                s["txt"] = caption
                s["json"] = f'{{"caption": "{caption}", "key": "digit{i:05d}", "status": "success"}}'
            yield s

    counts = {}
    for kind, idx in (("test", test), ("labeled", labeled), ("paired", paired), ("unlabeled", unlabeled)):
        if kind == "test":
            for old in (out / kind).glob("*.tar"):  # an earlier demo's 0.tar, 1.tar, ...
                old.unlink()
        shards = write_samples(samples(idx, kind), out / kind, prefix="digits", maxcount=maxcount)
        counts[kind] = len(idx)
        if kind in ("labeled", "test"):
            ys = [int(digits.target[i]) for i in idx]
            write_class_files(out / kind, CLASSNAMES, {c: ys.count(c) for c in range(10)})
        if kind == "test":
            clip_benchmark_split(out / kind, shards)
    (out / "test" / TEMPLATES_FILE).write_text("\n".join(TEST_TEMPLATES) + "\n")
    for name in (CLASSNAMES_FILE, TEMPLATES_FILE):  # clip_benchmark reads them beside the split folders
        shutil.copyfile(out / "test" / name, out / name)
    return counts


def clip_benchmark_split(folder: Path, shards: list[str]) -> None:
    """Make ``folder`` a split of clip_benchmark's webdataset layout: the shards renamed ``0.tar, 1.tar, ...``
    (sizes.json follows) and their number in ``nshards.txt``."""
    sizes_path = folder / SIZES_FILE
    sizes = json.loads(sizes_path.read_text()) if sizes_path.is_file() else {}
    for i, shard in enumerate(shards):
        os.replace(shard, folder / f"{i}.tar")
        if Path(shard).name in sizes:
            sizes[f"{i}.tar"] = sizes.pop(Path(shard).name)
    sizes_path.write_text(json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    (folder / "nshards.txt").write_text(f"{len(shards)}\n")
