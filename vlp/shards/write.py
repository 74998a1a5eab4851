"""Write WebDataset tar shards in the sample format of :mod:`vlp.data.format` (offline tooling, not run in training):
the writer core (:func:`write_samples`, the class files, JPEG encoding and resizing); the writers for each kind of
input (ImageFolder, tag list, captions table, Hugging Face dataset) are :mod:`vlp.shards.readers`.

A dataset is a folder of ``PREFIX-000000.tar, PREFIX-000001.tar, ...`` plus, beside them:

* ``sizes.json``: ``{"PREFIX-000000.tar": 1000, ...}`` (open_clip_train's format);
* labeled data only: ``classnames.txt`` (line i = class i) and ``class_counts.json`` (``{"0": n0, ...}``).

Samples: ``__key__`` (zero-padded running index), the image as JPEG bytes under ``jpg`` (JPEG input keeps its
bytes unless resized; transparent images are composited on white, as a viewer shows them, not with the alpha channel
dropped, which turns transparent pixels to whatever colour they hold, often black) and

* labeled: ``cls`` (class index as ASCII text; several, comma-separated, for a multi-label sample:
  :func:`write_tags`, whose ``class_counts.json`` counts each label);
* paired: ``txt`` (UTF-8 caption) and ``json`` (``{"caption", "key", "status": "success", "url"}``);
* unlabeled: nothing else.

Resizing (``image_size`` + ``resize_mode``, img2dataset's modes): ``no`` keeps the size; ``keep_ratio`` scales the
smaller side to ``image_size``; ``center_crop`` does that then crops the centre square; ``border`` scales the larger
side to ``image_size`` and pads the rest with white to a square.

Rewriting a dataset is all or nothing: new shards are staged in a hidden folder and swapped in (with sizes.json and
the class files) only once all are written, so an error or Ctrl-C midway leaves the old dataset whole.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from vlp.data.format import (CLASS_COUNTS_FILE, CLASSNAMES_FILE, MAX_ASPECT_RATIO, SIZES_FILE, ImageShapeError,
                             check_classnames, to_rgb)

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
RESIZE_MODES = ("no", "border", "keep_ratio", "center_crop")  # img2dataset's resize_mode
KEY_WIDTH = 9  # img2dataset's key width

# --------------------------------------------------------------------------------------------- images


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def check_resize(image_size: int | None, resize_mode: str) -> tuple[int, str] | None:
    """``(image_size, resize_mode)`` for the writers, None for no resizing; a clear error for bad values."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    if resize_mode == "no":
        return None
    if not image_size or image_size <= 0:
        raise ValueError(f"resize_mode {resize_mode!r} needs a positive image_size (--image-size)")
    return int(image_size), resize_mode


def resize_image(im: Any, size: int, mode: str) -> Any:
    """img2dataset's resize modes on a PIL image (bicubic; see the module docstring)."""
    from PIL import Image

    if mode == "no":
        return im
    w, h = im.size
    if mode in ("keep_ratio", "center_crop"):
        scale = size / min(w, h)
    elif mode == "border":
        scale = size / max(w, h)
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    if mode == "center_crop":
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
    elif mode == "border":
        im = _flatten(im)
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(im, ((size - nw) // 2, (size - nh) // 2))
        im = canvas
    return im


def image_to_jpeg_bytes(image: Any, resize: tuple[int, str] | None = None) -> bytes:
    """Image (path, bytes or PIL image) -> JPEG bytes; JPEG input keeps its original bytes unless ``resize``
    (``(image_size, resize_mode)``) changes it."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        with Image.open(io.BytesIO(data)) as im:  # header parse: rejects non-images cheaply
            _check_shape(im)
            if im.format == "JPEG" and _is_jpeg(data) and resize is None:
                return data
            im.load()
            return _pil_to_jpeg(resize_image(im, *resize) if resize else im)
    if isinstance(image, Image.Image):
        _check_shape(image)
        return _pil_to_jpeg(resize_image(image, *resize) if resize else image)
    raise TypeError(f"cannot convert {type(image).__name__} to an image")


def _check_shape(im: Any) -> None:
    """Refuse an image training would skip as too thin (and whose resize would take GBs): ImageShapeError."""
    w, h = im.size
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageShapeError(f"image too thin: {w}x{h} (over {MAX_ASPECT_RATIO}:1)")


def _flatten(im: Any) -> Any:
    """RGB: ``im`` itself if RGB, else :func:`vlp.data.format.to_rgb` (transparency composited on white)."""
    return im if im.mode == "RGB" else to_rgb(im)


def _pil_to_jpeg(im: Any) -> bytes:
    im = _flatten(im)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _key(index: int) -> str:
    return f"{index:0{KEY_WIDTH}d}"


# --------------------------------------------------------------------------------------------- writing


def shard_pattern(out_dir: str | os.PathLike, prefix: str = "shard") -> str:
    """The ``%``-pattern ShardWriter fills in: ``OUT/PREFIX-%06d.tar``."""
    return os.path.join(str(out_dir).replace("%", "%%"), prefix.replace("%", "%%") + "-%06d.tar")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_samples(
    samples: Iterable[dict],
    out_dir: str | os.PathLike,
    prefix: str = "shard",
    maxcount: int = 1000,
    sidecars: Callable[[], dict[str, str]] | None = None,
) -> list[str]:
    """Write sample dicts (``__key__`` + bytes/str/int values per extension) to shards and update sizes.json.

    The shards go to a hidden staging folder in ``out_dir`` (``.PREFIX.writing``) and are swapped in only once all
    are written: the old ``PREFIX-*.tar`` shards removed, the new ones renamed in, sizes.json (other prefixes'
    entries kept) and ``sidecars()`` (``{file name: text}``, e.g. classnames.txt) written, SIGINT / SIGTERM held
    back meanwhile. An error or an interrupt before the swap leaves the old dataset whole. Returns the shard paths
    written; no samples: none, and nothing changes.
    """
    import webdataset as wds

    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"bad shard prefix {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".{prefix}.writing"
    shutil.rmtree(stage, ignore_errors=True)  # one left by a killed writer
    stage.mkdir()
    try:
        counts: dict[str, int] = {}
        seen: set[str] = set()
        writer = None
        try:
            for sample in samples:
                key = sample.get("__key__")
                if not isinstance(key, str) or not key:
                    raise ValueError(f"sample without a string __key__: {sorted(sample)}")
                if "." in key or "/" in key:
                    raise ValueError(f"__key__ must not contain '.' or '/': {key!r}")
                if key in seen:
                    raise ValueError(f"duplicate __key__ {key!r}")
                seen.add(key)
                if writer is None:
                    # mtime an int: a float one adds slow PAX headers
                    writer = wds.ShardWriter(shard_pattern(stage, prefix), maxcount=maxcount, verbose=0, mtime=0)
                writer.write(sample)
                name = os.path.basename(writer.fname)
                counts[name] = counts.get(name, 0) + 1
        finally:
            if writer is not None:
                writer.close()
        if not counts:
            return []
        files = dict(sidecars()) if sidecars else {}
        with _signals_held():
            _swap_in(out, stage, prefix, counts, files)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return [str(out / name) for name in counts]


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends (off the main thread: a no-op)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _swap_in(out: Path, stage: Path, prefix: str, counts: dict[str, int], files: dict[str, str]) -> None:
    """Replace ``out``'s ``PREFIX-*.tar`` shards by the staged ones; update sizes.json; write ``files``."""
    own = re.compile(re.escape(prefix) + r"-\d{6,}\.tar$")
    sizes_path = out / SIZES_FILE
    sizes = {k: v for k, v in _read_json(sizes_path).items() if not own.match(k)}
    sizes.update(counts)
    for old in out.iterdir():
        if own.match(old.name) and old.name not in counts:
            old.unlink()
    for name in counts:
        os.replace(stage / name, out / name)
    _write_text_atomic(sizes_path, json.dumps(dict(sorted(sizes.items())), indent=1) + "\n")
    for name, text in files.items():
        _write_text_atomic(out / name, text)


def _class_files(classnames: list[str], class_counts: dict[int, int]) -> dict[str, str]:
    """The text of ``classnames.txt`` (line i = class i) and ``class_counts.json`` (``{"i": n}``)."""
    check_classnames(classnames)
    counts = {str(i): int(class_counts.get(i, 0)) for i in range(len(classnames))}
    return {CLASSNAMES_FILE: "".join(f"{name}\n" for name in classnames),
            CLASS_COUNTS_FILE: json.dumps(counts, indent=1) + "\n"}


def write_class_files(out_dir: str | os.PathLike, classnames: list[str], class_counts: dict[int, int]) -> None:
    """Write ``classnames.txt`` (line i = class i) and ``class_counts.json`` (``{"i": n}``) into ``out_dir``."""
    for name, text in _class_files(classnames, class_counts).items():
        _write_text_atomic(Path(out_dir) / name, text)


def _make_sample(
    index: int, image: Any, kind: str, label: int | None = None, caption: str | None = None, url: str = "",
    resize: tuple[int, str] | None = None,
) -> dict:
    key = _key(index)
    sample: dict[str, Any] = {"__key__": key, "jpg": image_to_jpeg_bytes(image, resize)}
    if kind == "labeled" and isinstance(label, (list, tuple)):  # multi-label: "3,17,42"
        sample["cls"] = ",".join(str(int(c)) for c in label).encode("ascii")
    elif kind == "labeled":
        sample["cls"] = str(int(label)).encode("ascii")
    elif kind == "paired":
        sample["txt"] = caption.encode("utf-8")
        meta = {"caption": caption, "key": key, "status": "success", "url": url}
        sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    return sample


class Collector:
    """Turns a reader's (image, label, caption, source) records into samples; records skips and class counts."""

    def __init__(self, kind: str, resize: tuple[int, str] | None = None):
        self.kind = kind
        self.resize = resize
        self.index = 0
        self.skipped: list[tuple[str, str]] = []
        self.class_counts: Counter = Counter()

    def samples(self, records: Iterable[tuple[Any, int | None, str | None, str]]) -> Iterator[dict]:
        for image, label, caption, source in records:
            try:
                sample = _make_sample(self.index, image, self.kind, label, caption, source, self.resize)
            except Exception as exn:  # unreadable / undecodable image
                self.skipped.append((source, f"{type(exn).__name__}: {exn}"))
                continue
            if self.kind == "labeled":
                self.class_counts.update(int(c) for c in (label if isinstance(label, (list, tuple)) else [label]))
            self.index += 1
            yield sample

    def sidecars(self, classnames: list[str] | None) -> Callable[[], dict[str, str]] | None:
        """What :func:`write_samples` writes beside the shards once they are all written (labeled: class files)."""
        if self.kind != "labeled":
            return None
        return lambda: _class_files(classnames, self.class_counts)

    def write(self, records: Iterable[tuple[Any, int | None, str | None, str]], out_dir: str | os.PathLike,
              prefix: str, maxcount: int, classnames: list[str] | None = None) -> dict:
        """:func:`write_samples` of ``records`` (labeled: with the class files), then :meth:`result`."""
        shards = write_samples(self.samples(records), out_dir, prefix=prefix, maxcount=maxcount,
                               sidecars=self.sidecars(classnames))
        return self.result(Path(out_dir), shards, classnames)

    def result(self, out_dir: Path, shards: list[str], classnames: list[str] | None = None) -> dict:
        if self.skipped:
            log.warning("skipped %d item(s), e.g. %s: %s", len(self.skipped), *self.skipped[0])
        if not shards:
            raise ValueError(f"no samples written to {out_dir} (skipped {len(self.skipped)})")
        result = {
            "out_dir": str(out_dir),
            "kind": self.kind,
            "shards": shards,
            "num_samples": self.index,
            "num_skipped": len(self.skipped),
            "skipped": self.skipped,
        }
        if self.kind == "labeled":
            assert classnames is not None
            result["classnames"] = classnames
            result["class_counts"] = {i: self.class_counts.get(i, 0) for i in range(len(classnames))}
        return result
