"""The one sample format: what training (:mod:`vlp.data.sources`), ``vlp shards verify`` and evaluation read.

A dataset is a set of WebDataset tars. A sample is a dict ``{"__key__", ext: bytes, ...}``; the extensions
that count are:

* image (every kind): the bytes under the first of :data:`IMAGE_KEYS` present (jpg jpeg png webp bmp ppm tif
  tiff), decoded by PIL to RGB with :func:`decode_image`. No such key: ``"no image"``; bytes PIL cannot fully
  decode, or an image thinner than 1:``MAX_ASPECT_RATIO`` (its short side scaled to the model's input would make
  a huge image): ``"corrupt image"`` (training finds this late, when a batch decodes the record).
* caption (``paired``): ``txt`` (UTF-8), else the ``caption`` of ``json`` (img2dataset's layout); stripped.
  Reasons: ``"no caption"``, ``"caption not UTF-8"``, ``"bad caption json"`` (not a JSON object, or a
  caption that is not a string), ``"empty caption"``.
* label (``labeled``): ``cls`` holding a class index or a class name; when class names are known, ``txt`` may
  hold it instead. Reasons: ``"no label"``, ``"label not UTF-8"``, ``"unknown label"`` (neither an integer nor
  a known class name), ``"label out of range"`` (negative, or not below the number of known classes).
* several labels (``labeled``; weak multi-label supervision, Mahajan et al. 2018): ``cls`` holding two or more class
  indices separated by commas or spaces (``3,17,42``), or a ``tags`` member of class names (one per line or
  comma-separated; needs the class names; with ``cls`` too, the tags follow its labels). The record then has
  ``labels`` (the list, in order) and ``label`` its first. Reasons as above per label (a tag that is not a class
  name: ``"unknown label"``), and ``"duplicate label"`` (a class twice in one sample).
* ``unlabeled``: the image only; other keys are ignored, as they are for the other kinds, except an optional
  ``hidden.cls`` (a benchmark's withheld label): it becomes ``Batch.hidden_label``, read only to measure the
  accuracy of pseudo-labels, never by a loss.

Sidecar files lie beside the shards or one folder up (:func:`find_sidecar`): ``classnames.txt`` (line i names
class i), ``sizes.json`` (``{"<shard file name>": samples}``), ``class_counts.json`` (``{"i": n}``).

Parsers return the value, or a :class:`Rejected` whose ``reason`` is the key of the bad-sample counter
(training's ``Source.bad.counts`` and verify's ``reasons`` use the same keys) and whose ``detail`` is for logs.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import braceexpand

from vlp.strict import ConfigError

KINDS = ("paired", "labeled", "unlabeled")  # the three kinds of data, in the order rows are grouped
Kind = Literal["paired", "labeled", "unlabeled"]

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
CAPTION_KEYS = ("txt", "json")
CLASSNAMES_FILE = "classnames.txt"
SIZES_FILE = "sizes.json"
CLASS_COUNTS_FILE = "class_counts.json"
HIDDEN_LABEL_KEY = "hidden.cls"
TAGS_KEY = "tags"
REASONS = ("no image", "no caption", "caption not UTF-8", "bad caption json", "empty caption", "no label",
           "label not UTF-8", "unknown label", "label out of range", "corrupt image", "duplicate label")

__all__ = ["KINDS", "Kind", "expand_shards", "check_shards", "is_local", "IMAGE_KEYS", "REASONS", "Rejected",
           "image_key", "parse_image", "parse_caption", "parse_label", "parse_labels", "parse_sample", "infer_kind",
           "decode_image", "to_rgb", "check_image", "find_sidecar", "read_lines", "load_classnames", "read_classnames",
           "check_classnames", "ClassnamesError", "MAX_ASPECT_RATIO", "ImageShapeError"]


@dataclass(frozen=True)
class Rejected:
    """Why a sample is skipped: ``reason`` (a counter key, one of :data:`REASONS`) and a ``detail`` for logs."""

    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


def _keys(sample: Mapping) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def image_key(sample: Mapping) -> str | None:
    """The sample's image extension: the first of :data:`IMAGE_KEYS` it has, else None."""
    return next((k for k in IMAGE_KEYS if k in sample), None)


def parse_image(sample: Mapping) -> bytes | Rejected:
    """The image bytes (not decoded), or ``no image``."""
    key = image_key(sample)
    if key is None:
        return Rejected("no image", f"keys {_keys(sample)}")
    return sample[key]


def parse_caption(sample: Mapping) -> str | Rejected:
    """The stripped caption from ``txt``, else from ``json``'s ``caption``."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8")
        elif "json" in sample:
            meta = json.loads(sample["json"].decode("utf-8"))
            text = meta.get("caption") if isinstance(meta, dict) else None
            if not isinstance(meta, dict) or not isinstance(text, (str, type(None))):
                return Rejected("bad caption json", f"json {sample['json'][:60]!r}")
            text = text or ""
        else:
            return Rejected("no caption", f"keys {_keys(sample)}")
    except UnicodeDecodeError as exn:
        return Rejected("caption not UTF-8", str(exn))
    except ValueError as exn:
        return Rejected("bad caption json", str(exn)[:100])
    text = text.strip()
    if not text:
        return Rejected("empty caption")
    return text


def parse_label(sample: Mapping, classnames: Sequence[str] | None = None,
                class_index: Mapping[str, int] | None = None) -> int | Rejected:
    """The class index from ``cls`` (or ``txt`` when class names are known): an integer or a class name.

    ``class_index`` maps names to indices (built from ``classnames`` when not given).
    """
    if class_index is None:
        class_index = {c: i for i, c in enumerate(classnames or [])}
    key = "cls" if "cls" in sample else "txt" if class_index and "txt" in sample else None
    if key is None:
        return Rejected("no label", f"keys {_keys(sample)}")
    try:
        value = sample[key].decode("utf-8").strip()
    except UnicodeDecodeError as exn:
        return Rejected("label not UTF-8", f"{key}: {exn}")
    if re.fullmatch(r"-?[0-9]+", value):  # ASCII digits only: "²".isdigit() is true, int("²") raises
        label = int(value)
    elif value in class_index:
        label = class_index[value]
    else:
        return Rejected("unknown label", f"{key} {value[:40]!r}")
    n = len(classnames) if classnames else None
    if label < 0 or (n is not None and label >= n):
        return Rejected("label out of range", f"{key} {label}" + (f" (classes: {n})" if n is not None else ""))
    return label


_MULTI_IDS = re.compile(r"-?[0-9]+(?:\s*[,\s]\s*-?[0-9]+)+")  # two or more ASCII integers, "," or space between


def is_multilabel(sample: Mapping) -> bool:
    """Whether the sample carries several labels: a ``tags`` member, or ``cls`` with two or more integers."""
    if TAGS_KEY in sample:
        return True
    try:
        value = sample["cls"].decode("utf-8").strip() if "cls" in sample else ""
    except (UnicodeDecodeError, AttributeError):
        return False
    return bool(_MULTI_IDS.fullmatch(value))


def parse_labels(sample: Mapping, classnames: Sequence[str] | None = None,
                 class_index: Mapping[str, int] | None = None) -> list[int] | Rejected:
    """The class indices of a multi-label sample (weak supervision: hashtags, JFT-style noisy labels; Mahajan et
    al. 2018): ``cls`` with several integers (``3,17,42`` or ``3 17 42``), then the class names of ``tags`` (one per
    line or comma-separated). Each is judged as :func:`parse_label` judges one; a class twice: ``duplicate label``."""
    if class_index is None:
        class_index = {c: i for i, c in enumerate(classnames or [])}
    labels: list[int] = []
    if "cls" in sample:
        try:
            value = sample["cls"].decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            return Rejected("label not UTF-8", f"cls: {exn}")
        for part in (p for p in re.split(r"[,\s]+", value) if p):
            one = parse_label({"cls": part.encode()}, classnames, class_index)
            if isinstance(one, Rejected):
                return one
            labels.append(one)
    if TAGS_KEY in sample:
        try:
            text = sample[TAGS_KEY].decode("utf-8")
        except UnicodeDecodeError as exn:
            return Rejected("label not UTF-8", f"{TAGS_KEY}: {exn}")
        for tag in (t.strip() for t in re.split(r"[,\n]", text)):
            if not tag:
                continue
            if tag not in class_index:
                why = "not a class name" if class_index else "tags need class names (classnames.txt)"
                return Rejected("unknown label", f"{TAGS_KEY} {tag[:40]!r}: {why}")
            labels.append(class_index[tag])
    if not labels:
        return Rejected("no label", f"keys {_keys(sample)}")
    seen: set[int] = set()
    for label in labels:
        if label in seen:
            name = f" ({classnames[label]!r})" if classnames and label < len(classnames) else ""
            return Rejected("duplicate label", f"class {label}{name} twice in {labels}")
        seen.add(label)
    return labels


def parse_sample(sample: Mapping, kind: str, classnames: Sequence[str] | None = None,
                 class_index: Mapping[str, int] | None = None) -> dict | Rejected:
    """``{"image": bytes, "text": str | None, "label": int}`` (label -1 unless labeled) for a sample of ``kind``;
    a multi-label sample (:func:`is_multilabel`) adds ``labels`` (all its classes; ``label`` is the first)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    image = parse_image(sample)
    if isinstance(image, Rejected):
        return image
    record: dict[str, Any] = {"image": image, "text": None, "label": -1}
    if kind == "paired":
        record["text"] = parse_caption(sample)
        if isinstance(record["text"], Rejected):
            return record["text"]
    elif kind == "labeled" and is_multilabel(sample):
        labels = parse_labels(sample, classnames, class_index)
        if isinstance(labels, Rejected):
            return labels
        record["label"], record["labels"] = labels[0], labels
    elif kind == "labeled":
        record["label"] = parse_label(sample, classnames, class_index)
        if isinstance(record["label"], Rejected):
            return record["label"]
    elif HIDDEN_LABEL_KEY in sample:  # diagnostics only (pseudo-label accuracy); never a training label
        hidden = parse_label({"cls": sample[HIDDEN_LABEL_KEY]}, classnames, class_index)
        record["hidden_label"] = -1 if isinstance(hidden, Rejected) else hidden
    return record


def infer_kind(sample: Mapping) -> str:
    """A guess for when no kind is given: ``cls`` or ``tags`` -> labeled, ``txt``/``json`` -> paired, else unlabeled."""
    if "cls" in sample or TAGS_KEY in sample:
        return "labeled"
    return "paired" if any(k in sample for k in CAPTION_KEYS) else "unlabeled"


MAX_ASPECT_RATIO = 50  # long side / short side; a 1x1,000,000 PNG resized to 224 on its short side took 6.75 GB


class ImageShapeError(ValueError):
    """An image too thin to resize: its long side over :data:`MAX_ASPECT_RATIO` times its short side."""


def decode_image(data: bytes, min_side: int | None = None):
    """Decode image bytes fully to an RGB PIL image (raises on corrupt or truncated data). Transparency is composited
    on white (:func:`to_rgb`), as the shard writers do, not dropped (``convert("RGB")`` alone turns transparent pixels
    into whatever colour they store, often black).

    ``min_side``: a JPEG is decoded at the smallest of libjpeg's scales 1/2, 1/4, 1/8 (Pillow's ``draft``) that
    keeps both sides at least ``min_side`` (:func:`vlp.data.transforms.decode_side` says what the transforms need);
    the DCT does the downscaling, several times faster than a full decode and a resize. Other formats decode whole."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):  # checked before decoding or resizing it
            raise ImageShapeError(f"image too thin: {w}x{h} (over {MAX_ASPECT_RATIO}:1; its short side scaled to "
                                  f"the model's input would take {max(w, h) // max(min(w, h), 1)}x the memory "
                                  f"of a square image)")
        if min_side and img.format == "JPEG" and min(w, h) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(img)


def to_rgb(img):
    """An RGB copy of a PIL image, transparency (RGBA, LA, PA, palette transparency) composited on white."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def check_image(data: bytes, key: str = "image") -> Rejected | None:
    """None if :func:`decode_image` decodes ``data``, else ``corrupt image``."""
    try:
        decode_image(data)
    except ImageShapeError as exn:
        return Rejected("corrupt image", f"{key}: {exn}")
    except Exception as exn:  # PIL raises many types for bad data
        return Rejected("corrupt image", f"{key}: undecodable image: {type(exn).__name__}: {exn}"[:300])
    return None


def find_sidecar(urls: Sequence[str], name: str) -> Path | None:
    """The file ``name`` beside the first local shard that has one, or one folder up from it."""
    for url in urls:
        if "://" in url:
            continue
        for folder in (Path(url).parent, Path(url).parent.parent):
            if (folder / name).is_file():
                return folder / name
    return None


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


class ClassnamesError(ValueError):
    """A class-name list that would mislabel classes: a duplicate name, a blank name, a line break in a name."""


def check_classnames(names: Sequence[str], where: str = "class names") -> list[str]:
    """``names`` as strings, or :class:`ClassnamesError` naming each duplicate and
    blank entry by its 1-based position: two classes with one name train as one, a blank one shifts the rest."""
    names = [str(n) for n in names]
    problems = [f"line {i} has a line break" for i, n in enumerate(names, 1) if "\n" in n or "\r" in n]
    problems += [f"line {i} is blank" for i, n in enumerate(names, 1) if not n.strip()]
    first: dict[str, int] = {}
    for i, n in enumerate(names, 1):
        key = n.strip()
        if key and key in first:
            problems.append(f"line {i} repeats line {first[key]} ({key!r})")
        first.setdefault(key, i)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise ClassnamesError(f"{where}: {shown} (each class needs its own non-blank name, line i naming class i)")
    return names


def read_classnames(path: str | os.PathLike) -> list[str]:
    """The class names of a file, one per line (line i names class i); blank lines only at the end.
    :class:`ClassnamesError` names the file and the lines of a duplicate or an interior blank line."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return [n.strip() for n in check_classnames(lines, str(path))]


def load_classnames(urls: Sequence[str], given: Sequence[str] | str | os.PathLike | None = None) -> list[str] | None:
    """Class names: ``given`` (a list, or a file with one per line), else ``classnames.txt`` near the shards."""
    if isinstance(given, (str, os.PathLike)):
        return read_classnames(given)
    if given is not None:
        return check_classnames(given)
    found = find_sidecar(urls, CLASSNAMES_FILE)
    return read_classnames(found) if found else None


def expand_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard paths/URLs of a spec, in order: ``::`` separates several specs (a list is several too), braces
    expand, local globs expand, and a folder means its ``*.tar`` files (or those of its ``test/`` folder, the
    clip_benchmark layout)."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_shards(s)]
    urls = []
    for part in (p.strip() for p in str(spec).split("::")):
        for url in braceexpand.braceexpand(part) if part else ():
            if "://" not in url and os.path.isdir(url):
                tars = sorted(glob.glob(os.path.join(url, "*.tar")))
                urls.extend(tars or sorted(glob.glob(os.path.join(url, "test", "*.tar"))))
            elif "://" not in url and any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_shards(key: str, spec: str | list[str]) -> list[str]:
    """Expand a shard spec and fail, naming the key and the path, when a local shard does not exist."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for s in specs for p in str(s).split("::") if p.strip()]
    if not parts:
        raise ConfigError(f"{key}: no file matches {spec!r}")
    urls = []
    for part in parts:  # each `::` part must match: a typo in one would silently drop that dataset
        found = expand_shards(part)
        if not found:
            where = f" (one of the '::' parts of {spec!r})" if len(parts) > 1 else ""
            raise ConfigError(f"{key}: no file matches {part!r}{where}")
        urls.extend(found)
    missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"{key}: no such shard {missing[0]!r}{more}")
    return urls
