"""One shard writer per kind of input (offline tooling, not run in training): an ImageFolder
(:func:`write_image_folder`), a tag list (:func:`write_tags`), a table of captions (:func:`write_captions`), a Hugging
Face dataset (:func:`write_hf_dataset`).

Each reads its input into ``(image, label, caption, source)`` records and writes them with
:meth:`vlp.shards.write.Collector.write` (the layout, resize modes and all-or-nothing swap of :mod:`vlp.shards.write`);
an input it cannot use is skipped and listed under ``skipped``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterable, Iterator

from vlp.data.format import IMAGE_KEYS, KINDS, check_classnames, read_classnames
from vlp.shards.write import Collector, check_resize

IMAGE_EXTENSIONS = tuple(f".{k}" for k in IMAGE_KEYS)  # image files the folder writers pick up


def _check_kind(kind: str, allowed: Iterable[str] = KINDS) -> None:
    if kind not in allowed:
        raise ValueError(f"kind must be one of {tuple(allowed)}, got {kind!r}")


def find_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """ImageFolder scan of ``root/<class>/**/<image>``: (sorted class names, [(path, class index)])."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"not a folder: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    items: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        for dirpath, dirnames, filenames in sorted(os.walk(root / name, followlinks=True)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((Path(dirpath) / fname, index))
    return classes, items


def _find_images(root: Path) -> list[Path]:
    """All images anywhere under ``root`` (unlabeled folders need no class level)."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )


def write_image_folder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    kind: str = "labeled",
    prefix: str = "shard",
    maxcount: int = 1000,
    shuffle_seed: int | None = 0,
    image_size: int | None = None,
    resize_mode: str = "no",
) -> dict:
    """ImageFolder ``root/<class>/<file>`` -> labeled (cls + classnames.txt + class_counts.json) or unlabeled shards.

    Classes are the sorted subfolder names (torchvision order). Samples are shuffled with ``shuffle_seed``
    (None keeps folder order) so shards mix classes. Unlabeled takes every image under ``root``.
    Undecodable images are skipped and listed under ``skipped``.
    """
    _check_kind(kind, ("labeled", "unlabeled"))
    root, out = Path(root), Path(out_dir)
    if kind == "labeled":
        classnames, items = find_image_folder(root)
        if not classnames:
            raise ValueError(f"no class subfolders in {root}")
        check_classnames(classnames, f"the class folders of {root}")
    else:
        if not root.is_dir():
            raise FileNotFoundError(f"not a folder: {root}")
        classnames, items = None, [(p, None) for p in _find_images(root)]
    if not items:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    collector = Collector(kind, check_resize(image_size, resize_mode))
    records = ((path, label, None, str(path)) for path, label in items)
    return collector.write(records, out, prefix, maxcount, classnames)


def read_tag_list(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """``IMAGE<TAB>tag1,tag2,...`` lines (blank lines and ``#`` comments skipped) -> ``[(image, [tags])]``, tags
    stripped, in order. A line without a tab: ValueError naming it."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "\t" not in line:
            raise ValueError(f"{path}:{n}: want IMAGE<TAB>tag1,tag2,... (no tab in {line[:60]!r})")
        image, tags = line.split("\t", 1)
        rows.append((image.strip(), [t.strip() for t in tags.split(",") if t.strip()]))
    return rows


def write_tags(
    tag_list: str | os.PathLike,
    out_dir: str | os.PathLike,
    classnames: list[str] | str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    prefix: str = "shard",
    maxcount: int = 1000,
    shuffle_seed: int | None = 0,
    image_size: int | None = None,
    resize_mode: str = "no",
) -> dict:
    """A tag list (``IMAGE<TAB>tag1,tag2`` lines, :func:`read_tag_list`) -> multi-label labeled shards for weak
    supervision (hashtags; Mahajan et al. 2018): ``cls`` holds the tags' class indices, comma-separated, in the
    line's order; ``classnames.txt`` names the classes, ``class_counts.json`` counts each tag's occurrences (what
    ``balance: sqrt`` resamples by).

    Classes: ``classnames`` (a list or a file, in that order), else the sorted union of the tags. Skipped and listed
    under ``skipped``: a line whose image is missing or undecodable, with no tag, or (given ``classnames``) with a
    tag that is not a class name. A tag repeated on a line counts once. Relative paths resolve against
    ``image_root`` or the list's folder.
    """
    rows = read_tag_list(tag_list)
    base = Path(image_root) if image_root is not None else Path(tag_list).resolve().parent
    if classnames is None:
        classnames = sorted({t for _, tags in rows for t in tags})
        if not classnames:
            raise ValueError(f"no tags in {tag_list}")
    elif isinstance(classnames, (str, os.PathLike)):
        classnames = read_classnames(classnames)
    classnames = check_classnames(classnames, "the tag classes")
    index = {c: i for i, c in enumerate(classnames)}
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    collector = Collector("labeled", check_resize(image_size, resize_mode))

    def records() -> Iterator[tuple[Any, list[int], None, str]]:
        for image, tags in rows:
            path = Path(image).expanduser()
            path = path if path.is_absolute() else base / path
            unknown = [t for t in tags if t not in index]
            if not image or not path.is_file():
                collector.skipped.append((str(path), "missing image file"))
            elif not tags:
                collector.skipped.append((str(path), "no tag"))
            elif unknown:
                collector.skipped.append((str(path), f"unknown tag(s) {unknown[:5]} (not in the class names)"))
            else:
                yield path, list(dict.fromkeys(index[t] for t in tags)), None, str(path)

    return collector.write(records(), out_dir, prefix, maxcount, classnames)


def read_table(table: Any, image_col: str = "image", caption_col: str = "caption"):
    """CSV / TSV (by extension, optionally compressed) / parquet file, or a DataFrame -> DataFrame."""
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        df = table
    else:
        path = str(table)
        name = path.lower()
        for ext in (".gz", ".bz2", ".xz", ".zst", ".zip"):
            name = name.removesuffix(ext)
        if name.endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        elif name.endswith((".csv", ".tsv", ".tab")):
            sep = "," if name.endswith(".csv") else "\t"
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[])
        else:
            raise ValueError(f"unknown table format (want .csv, .tsv or .parquet): {path}")
    missing = [c for c in (image_col, caption_col) if c not in df.columns]
    if missing:
        raise KeyError(f"column(s) {missing} not in table; columns: {list(df.columns)}")
    return df


def write_captions(
    table: Any,
    out_dir: str | os.PathLike,
    image_col: str = "image",
    caption_col: str = "caption",
    image_root: str | os.PathLike | None = None,
    prefix: str = "shard",
    maxcount: int = 1000,
    shuffle_seed: int | None = None,
    image_size: int | None = None,
    resize_mode: str = "no",
) -> dict:
    """Table of (image path, caption) -> paired shards (txt + json), img2dataset layout.

    Relative paths resolve against ``image_root`` or the table's folder. Rows whose image is missing or
    undecodable, or whose caption is empty, are skipped and listed under ``skipped`` (count: ``num_skipped``).
    ``shuffle_seed=None`` keeps table order.
    """
    df = read_table(table, image_col, caption_col)
    if image_root is not None:
        base = Path(image_root)
    elif isinstance(table, (str, os.PathLike)):
        base = Path(table).resolve().parent
    else:
        base = Path.cwd()
    if shuffle_seed is not None:
        df = df.sample(frac=1.0, random_state=shuffle_seed)
    collector = Collector("paired", check_resize(image_size, resize_mode))

    def records() -> Iterator[tuple[Any, None, str, str]]:
        for image, caption in zip(df[image_col].tolist(), df[caption_col].tolist()):
            if image is None or (isinstance(image, float) and image != image) or str(image) == "":
                collector.skipped.append((str(image), "no image path"))
                continue
            path = Path(str(image)).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                collector.skipped.append((str(path), "missing image file"))
                continue
            if caption is None or (isinstance(caption, float) and caption != caption) or str(caption).strip() == "":
                collector.skipped.append((str(path), "empty caption"))
                continue
            yield path, None, str(caption), str(path)

    return collector.write(records(), out_dir, prefix, maxcount)


def load_hf_dataset(dataset: Any, split: str | None = None):
    """A ``datasets.Dataset``, a ``DatasetDict`` (+ ``split``) or a ``save_to_disk`` path -> ``datasets.Dataset``."""
    import datasets

    if isinstance(dataset, (str, os.PathLike)):
        dataset = datasets.load_from_disk(str(dataset))
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"dataset has splits {list(dataset)}; choose one with split=")
            split = next(iter(dataset))
        if split not in dataset:
            raise KeyError(f"split {split!r} not in {list(dataset)}")
        dataset = dataset[split]
    elif split is not None and not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"not a datasets.Dataset: {type(dataset).__name__}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"not a datasets.Dataset: {type(dataset).__name__}")
    return dataset


def _hf_image(value: Any) -> tuple[Any, str]:
    """An image cell (undecoded Image dict, path string, bytes or PIL image) -> (image, source)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"], value.get("path") or ""
        if value.get("path"):
            return value["path"], value["path"]
        raise ValueError("empty image cell")
    if isinstance(value, (str, os.PathLike)):
        return value, str(value)
    if value is None:
        raise ValueError("empty image cell")
    return value, ""


def write_hf_dataset(
    dataset: Any,
    out_dir: str | os.PathLike,
    image_col: str = "image",
    label_col: str | None = None,
    caption_col: str | None = None,
    split: str | None = None,
    classnames: list[str] | None = None,
    prefix: str = "shard",
    maxcount: int = 1000,
    shuffle_seed: int | None = 0,
    image_size: int | None = None,
    resize_mode: str = "no",
) -> dict:
    """A ``datasets.Dataset`` (or a ``load_from_disk`` path) -> labeled (``label_col``), paired (``caption_col``)
    or unlabeled shards.

    Class names: ``classnames``, else the ClassLabel feature's names, else the sorted distinct string labels,
    else ``"0".."max"`` for integer labels. Shuffled with ``shuffle_seed`` (None keeps dataset order).
    """
    import datasets

    if label_col and caption_col:
        raise ValueError("give label_col or caption_col, not both")
    ds = load_hf_dataset(dataset, split)
    for col in (image_col, label_col, caption_col):
        if col and col not in ds.column_names:
            raise KeyError(f"column {col!r} not in dataset; columns: {ds.column_names}")
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # keep the original (JPEG) bytes
    kind = "labeled" if label_col else "paired" if caption_col else "unlabeled"
    keep = [c for c in (image_col, label_col, caption_col) if c]
    ds = ds.select_columns(keep)

    label_map: dict[Any, int] | None = None
    if kind == "labeled":
        feature = ds.features[label_col]
        string_labels = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        if classnames is not None:
            classnames = list(classnames)
        elif isinstance(feature, datasets.ClassLabel):
            classnames = list(feature.names)
        elif string_labels:
            classnames = sorted({str(v) for v in ds[label_col] if v is not None})
        else:
            ints = [int(v) for v in ds[label_col] if v is not None]
            classnames = [str(i) for i in range(max(ints) + 1)] if ints else []
        check_classnames(classnames)
        if string_labels:
            label_map = {name: i for i, name in enumerate(classnames)}
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    collector = Collector(kind, check_resize(image_size, resize_mode))
    name = getattr(ds.info, "dataset_name", None) or "dataset"

    def records() -> Iterator[tuple[Any, int | None, str | None, str]]:
        for row_index, row in enumerate(ds):
            try:
                image, source = _hf_image(row[image_col])
            except ValueError as exn:
                collector.skipped.append((f"{name}[{row_index}]", str(exn)))
                continue
            source = source or f"{name}[{row_index}]"
            label = caption = None
            if kind == "labeled":
                value = row[label_col]
                label = label_map.get(value, -1) if label_map is not None else (-1 if value is None else int(value))
                if not 0 <= label < len(classnames):
                    collector.skipped.append((source, f"label {value!r} outside the {len(classnames)} classes"))
                    continue
            elif kind == "paired":
                caption = row[caption_col]
                if caption is None or str(caption).strip() == "":
                    collector.skipped.append((source, "empty caption"))
                    continue
                caption = str(caption)
            yield image, label, caption, source

    return collector.write(records(), out_dir, prefix, maxcount, classnames)
