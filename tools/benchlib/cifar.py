"""CIFAR-10 from ``../shared/data/cifar10-train.tar.gz`` (``VLP_CIFAR_TARBALL``): extracted once, split (class-
stratified, seeded) and written as WebDataset shards: the quality bench's split, its validation slice, a subset."""
from __future__ import annotations

import json
import os
import random
import shutil
import tarfile
import time
from pathlib import Path

from benchlib import REPO
from benchlib.cli import log
from benchlib.shards import cached, class_files, written

DATA_TARBALL = Path(os.environ.get("VLP_CIFAR_TARBALL") or REPO.parent / "shared" / "data" / "cifar10-train.tar.gz")
CLASSNAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CAPTION_TEMPLATES = [
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a low resolution photo of a {c}.",
    "a close-up photo of the {c}.",
    "a small picture of a {c}.",
    "an image showing a {c}.",
    "a pixelated photo of the {c}.",
    "a cropped photo of a {c}.",
    "a good photo of a {c}.",
    "a snapshot of a {c} outdoors.",
    "there is a {c} in this picture.",
    "a tiny thumbnail of a {c}.",
    "{c}",
]
SIMPLE_TEMPLATE = ["a photo of a {c}."]


def ensure_cifar(cache: Path) -> Path | None:
    """Extract the CIFAR-10 tarball once into ``cache/cifar10``; returns the ImageFolder root (``.../train``)."""
    root = cache / "cifar10"
    done = root / ".extracted"
    if done.is_file():
        return root / "train"
    if not DATA_TARBALL.is_file():
        return None
    log(f"extracting {DATA_TARBALL} -> {root}")
    tmp = root.with_name("cifar10.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(DATA_TARBALL) as tf:
        tf.extractall(tmp, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    done.write_text("ok\n")
    return root / "train"


def by_class(train_root: Path) -> tuple[list[str], dict[int, list]]:
    """(class names, {label: image paths}) of an ImageFolder."""
    from vlp.shards import find_image_folder

    classes, items = find_image_folder(train_root)
    out: dict[int, list] = {}
    for path, y in items:
        out.setdefault(y, []).append(path)
    return classes, out


def split_cifar(train_root: Path, n_test: int, limit_per_class: int | None, seed: int):
    """Class-stratified, seeded split: (test, labeled, paired, unlabeled), each a list of (path, label)."""
    classes, paths_of = by_class(train_root)
    if classes != CLASSNAMES:
        raise SystemExit(f"unexpected CIFAR-10 classes in {train_root}: {classes}")
    rng = random.Random(seed)
    test, labeled, paired, unlabeled = [], [], [], []
    per_test = n_test // len(classes)
    for y in sorted(paths_of):
        paths = sorted(paths_of[y])
        rng.shuffle(paths)
        if limit_per_class:
            paths = paths[:limit_per_class]
        test += [(p, y) for p in paths[:per_test]]
        rest = paths[per_test:]
        n_lab, n_pair = round(0.10 * len(rest)), round(0.20 * len(rest))
        labeled += [(p, y) for p in rest[:n_lab]]
        paired += [(p, y) for p in rest[n_lab:n_lab + n_pair]]
        unlabeled += [(p, y) for p in rest[n_lab + n_pair:]]
    for part in (test, labeled, paired, unlabeled):
        rng.shuffle(part)  # shards mix classes
    return test, labeled, paired, unlabeled


def write_split_shards(out: Path, parts: dict[str, list], seed: int, maxcount: int = 1000) -> dict[str, int]:
    from vlp.shards import write_samples

    rng = random.Random(seed + 1)

    def samples(items, kind):
        for i, (path, y) in enumerate(items):
            s = {"__key__": f"{i:09d}", "jpg": Path(path).read_bytes()}  # CIFAR JPEGs keep their bytes
            if kind in ("labeled", "test"):
                s["cls"] = str(y)
            elif kind == "unlabeled":  # withheld: read only to measure pseudo-label accuracy (Batch.hidden_label)
                s["hidden.cls"] = str(y)
            elif kind == "paired":
                caption = rng.choice(CAPTION_TEMPLATES).format(c=CLASSNAMES[y])
                s["txt"] = caption
                s["json"] = json.dumps({"caption": caption, "key": s["__key__"], "status": "success",
                                        "url": f"cifar10/{Path(path).parent.name}/{Path(path).name}"})
            yield s

    counts = {}
    for kind, items in parts.items():
        write_samples(samples(items, kind), out / kind, prefix="cifar10", maxcount=maxcount)
        counts[kind] = len(items)
        if kind in ("labeled", "test"):
            class_files(out / kind, CLASSNAMES, [y for _, y in items])
    (out / "test" / "zeroshot_classification_templates.txt").write_text("\n".join(CAPTION_TEMPLATES) + "\n")
    (out / "paired" / "caption_templates.txt").write_text("\n".join(CAPTION_TEMPLATES) + "\n")
    return counts


def prepare(cache: Path, shards: Path, n_test: int, limit_per_class: int | None, seed: int) -> dict | None:
    """Extract CIFAR-10 and write the four shard folders (skipped when already written with these settings).

    Existing shards are never replaced: shards of the same split written by another version of this tool (a
    later one adds fields this bench does not read) are used as they are; a different split is an error."""
    params = {"n_test": n_test, "limit_per_class": limit_per_class, "seed": seed, "templates": CAPTION_TEMPLATES,
              "version": 2}
    marker = shards / "split.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        same = lambda a, b: {k: v for k, v in a.items() if k != "version"} == \
            {k: v for k, v in b.items() if k != "version"}  # noqa: E731
        if same(info.get("params", {}), params):
            log(f"shards already written in {shards} ({info['counts']}, version {info['params'].get('version')})")
            return info
        raise SystemExit(f"{shards} holds shards of another split ({info.get('params')}); delete that folder "
                         f"or pass another --cache-dir")
    train_root = ensure_cifar(cache)
    if train_root is None:
        return None
    t0 = time.time()
    test, labeled, paired, unlabeled = split_cifar(train_root, n_test, limit_per_class, seed)
    log(f"writing shards to {shards}: test {len(test)}, labeled {len(labeled)}, paired {len(paired)}, "
        f"unlabeled {len(unlabeled)}")

    def write(folder: Path) -> dict:
        counts = write_split_shards(folder, {"test": test, "labeled": labeled, "paired": paired,
                                             "unlabeled": unlabeled}, seed)
        return {"counts": counts, "seconds": round(time.time() - t0, 1)}

    info = cached(shards, params, write, marker="split.json")
    log(f"shards written in {info['seconds']} s")
    return info


def prepare_val(cache: Path, out: Path, split: dict, n_val: int) -> int | None:
    """The validation split: ``n_val`` images (class-stratified, seeded) of the unlabeled training pool, written
    with their labels to ``out`` (labeled WebDataset shards). Returns the count, or None without the images."""
    from vlp.shards import write_samples

    params = {"split": split["params"], "n_val": n_val, "version": 1}
    if written(out, params, marker="val.json"):
        return n_val
    train_root = ensure_cifar(cache)
    if train_root is None:
        return None
    p = split["params"]
    _, _, _, unlabeled = split_cifar(train_root, p["n_test"], p["limit_per_class"], p["seed"])
    if len(unlabeled) != split["counts"]["unlabeled"]:
        raise SystemExit(f"the recomputed unlabeled split ({len(unlabeled)}) does not match the shards' "
                         f"({split['counts']['unlabeled']})")
    rng = random.Random(p["seed"] + 2)
    per_class = n_val // len(CLASSNAMES)
    val = []
    for y in range(len(CLASSNAMES)):
        items = sorted(it for it in unlabeled if it[1] == y)
        val += rng.sample(items, per_class)
    rng.shuffle(val)

    def write(folder: Path) -> dict:
        samples = ({"__key__": f"{i:09d}", "jpg": Path(path).read_bytes(), "cls": str(y)}
                   for i, (path, y) in enumerate(val))
        write_samples(samples, folder, prefix="cifar10-val", maxcount=1000)
        class_files(folder, CLASSNAMES, [y for _, y in val])
        return {"count": len(val)}

    cached(out, params, write, marker="val.json")
    log(f"validation split written to {out}: {len(val)} images of the unlabeled pool")
    return len(val)


def stratified_subset(train_root: Path, n_images: int, seed: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """The class names and ``n_images`` (path, class) pairs of an ImageFolder: the same number of each class
    (seeded), shuffled."""
    classes, paths_of = by_class(train_root)
    rng = random.Random(seed)
    chosen = []
    for y in sorted(paths_of):
        paths = sorted(paths_of[y])
        rng.shuffle(paths)
        chosen += [(p, y) for p in paths[: n_images // len(paths_of)]]
    rng.shuffle(chosen)
    return classes, chosen


def subset_shards(train_root: Path, out: Path, n_images: int, seed: int = 0) -> dict:
    """The first ``n_images`` (stratified) as paired / labeled / unlabeled shards; skipped when already there."""
    from vlp.shards import write_samples

    def write(folder: Path) -> dict:
        classes, chosen = stratified_subset(train_root, n_images, seed)
        log(f"writing {len(chosen)} images as paired / labeled / unlabeled shards to {folder}")

        def samples(kind):
            for i, (path, y) in enumerate(chosen):
                s = {"__key__": f"{i:09d}", "jpg": Path(path).read_bytes()}
                if kind == "paired":
                    caption = f"a photo of a {classes[y]}."
                    s["txt"] = caption
                    s["json"] = json.dumps({"caption": caption, "key": s["__key__"], "status": "success", "url": ""})
                elif kind == "labeled":
                    s["cls"] = str(y)
                yield s

        tars = {kind: write_samples(samples(kind), folder / kind, prefix="cifar10", maxcount=1000)
                    for kind in ("paired", "labeled", "unlabeled")}
        class_files(folder / "labeled", classes, [y for _, y in chosen])
        return {"shards": tars}

    return cached(out, {"n_images": n_images, "seed": seed, "version": 1}, write)


def tar_jpegs(path: Path, n: int) -> list[tuple[bytes, str]]:
    """n JPEGs from an ImageFolder tar.gz (train/<class>/*.jpg), spread evenly over the classes."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isreg() or len(parts) < 3 or not parts[-1].lower().endswith((".jpg", ".jpeg")):
                continue
            found.setdefault(parts[-2], []).append((m.name, tf.extractfile(m).read()))
    classes = sorted(found)
    for c in classes:
        found[c].sort()
    out, i = [], 0
    while len(out) < n and any(found.values()):
        c = classes[i % len(classes)]
        if found[c]:
            out.append((found[c].pop(0)[1], c))
        i += 1
    return out
