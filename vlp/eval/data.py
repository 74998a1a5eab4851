"""Evaluation data: webdataset shards in clip_benchmark's layout, class names and prompt templates.

A *spec* names shards: a tar file, a brace pattern (``data/shard-{000000..000009}.tar``), a folder holding
``*.tar`` files (or a ``test/`` sub-folder of them, as clip_benchmark writes), or several of these joined by
``::``. Each sample has an image under one of :data:`vlp.data.format.IMAGE_KEYS` (training's format) and either
``cls`` (the class index as ASCII text) or ``txt`` (one caption per line). ``classnames.txt`` and
``zeroshot_classification_templates.txt`` lie beside the shards or in their parent folder
(:func:`vlp.data.format.find_sidecar`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import braceexpand
import torch
import webdataset as wds

from vlp.data.format import (CLASSNAMES_FILE, IMAGE_KEYS, decode_image, expand_shards, find_sidecar, is_local,
                             is_multilabel, load_classnames, read_lines)

TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"


# ---------------------------------------------------------------------------------------------- shards


def _split_specs(spec: str | os.PathLike | Sequence) -> list[str]:
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(_split_specs(s))
        return out
    return [s for s in str(spec).split("::") if s.strip()]


def expand_urls(spec: str | os.PathLike | Sequence) -> list[str]:
    """:func:`vlp.data.format.expand_shards`, and FileNotFoundError when the spec names no shard."""
    urls = expand_shards(spec)
    if not urls:
        raise FileNotFoundError(f"no shards match data spec {spec!r}")
    return urls


def _sidecar_anchors(spec) -> list[str]:
    """Per ``::`` part, paths whose folder and its parent :func:`~vlp.data.format.find_sidecar` searches: a
    folder's own files and those of its ``test/`` folder (clip_benchmark), else the part's first file (its braces
    expanded, not its globs: the files need not exist)."""
    anchors: list[str] = []
    for part in _split_specs(spec):
        part = part.strip()
        if os.path.isdir(part):
            anchors += [os.path.join(part, "*.tar"), os.path.join(part, "test", "*.tar")]
        else:
            anchors.append(next(iter(braceexpand.braceexpand(part)), part))
    return anchors


def find_metadata_file(spec, filename: str) -> Path | None:
    """The file ``filename`` beside the shards of ``spec`` or one folder up, if any."""
    return find_sidecar(_sidecar_anchors(spec), filename)


def find_classnames(spec=None, given: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """Class names (:func:`vlp.data.format.load_classnames`): ``given`` (a list, or a file with one name per line),
    else ``classnames.txt`` near ``spec``; FileNotFoundError when there are none."""
    if isinstance(given, (str, os.PathLike)) and not os.path.isfile(given):
        raise FileNotFoundError(f"classnames file {given} not found")
    if given is None and spec is None:
        raise ValueError("no class names given and no data spec to look beside")
    names = load_classnames(_sidecar_anchors(spec) if given is None else [], given)
    if names is None:
        raise FileNotFoundError(f"no {CLASSNAMES_FILE} beside the shards of {spec!r} (pass classnames)")
    return names


def find_templates(spec=None, given: str | os.PathLike | Sequence[str] | None = None) -> list[str]:
    """Prompt templates as strings with a ``{c}`` placeholder.

    ``given`` may be a list, a preset name (``openai_imagenet``, ``simple``, ``photo``), a file with one template
    per line, or one template string containing ``{c}``. Otherwise ``zeroshot_classification_templates.txt`` near
    ``spec`` is read, falling back to the ``openai_imagenet`` preset.
    """
    from vlp.data.transforms import load_templates

    if given is not None:
        templates = load_templates(given)
    else:
        path = find_metadata_file(spec, TEMPLATES_FILE) if spec is not None else None
        templates = read_lines(path) if path is not None else load_templates("openai_imagenet")
    if not templates:
        raise ValueError("no templates")
    return templates


def template_fns(templates: Sequence[str | Callable]) -> list[Callable[[str], str]]:
    """Templates as callables ``c -> text`` (``{c}`` named placeholder, or a positional ``{}``)."""

    def make(t):
        if callable(t):
            return t
        if "{c}" in t:
            return lambda c, t=t: t.format(c=c)
        return lambda c, t=t: t.format(c)

    return [make(t) for t in templates]


def first_sample(spec, max_bytes: int = 1 << 16) -> dict[str, bytes] | None:
    """The members of the first sample of the first local shard (``{"jpg": b"...", "cls": b"3"}``; each read up
    to ``max_bytes``), read from the tar's first members; None when the first shard is remote or unreadable."""
    import tarfile

    try:
        url = expand_urls(spec)[0]
    except FileNotFoundError:
        return None
    if not is_local(url) or not os.path.isfile(url):
        return None
    members, first = {}, None
    try:
        with tarfile.open(url) as tar:
            for member in tar:
                if not member.isfile() or "." not in os.path.basename(member.name):
                    continue
                stem, ext = os.path.basename(member.name).split(".", 1)
                key = os.path.join(os.path.dirname(member.name), stem)
                if first is None:
                    first = key
                elif key != first:
                    break
                members[ext.lower()] = tar.extractfile(member).read(max_bytes)
    except (OSError, tarfile.TarError):
        return None
    return members or None


def first_sample_keys(spec) -> set[str] | None:
    """The extensions of :func:`first_sample` (``{"jpg", "cls"}``)."""
    sample = first_sample(spec, max_bytes=0)
    return set(sample) if sample else None


def is_multilabel_data(spec) -> bool:
    """Whether the first sample carries several labels (``cls`` ``3,17`` or a ``tags`` member)."""
    sample = first_sample(spec)
    return bool(sample) and is_multilabel(sample)


def find_dataset_type(spec) -> str | None:
    """The content of ``dataset_type.txt`` near the shards (e.g. ``retrieval``), if any."""
    path = find_metadata_file(spec, DATASET_TYPE_FILE)
    return path.read_text().strip() if path is not None else None


# ---------------------------------------------------------------------------------------------- loaders


def _all_nodes(urls):
    """Every process reads every shard (evaluation runs whole, on one or on each process)."""
    return urls


def _decode_label(value) -> int:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return int(str(value).strip())


def _decode_captions(value) -> list[str]:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    caps = [c.strip() for c in str(value).split("\n") if c.strip()]
    return caps


def _collate_labeled(samples):
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.long)
    return images, labels


def _collate_captions(samples):
    images = torch.stack([s[0] for s in samples])
    return images, [s[1] for s in samples]


class _Truncated:
    """Iterate batches of a loader, stopping after ``max_samples`` samples (the last batch cut)."""

    def __init__(self, loader, max_samples: int | None):
        self.loader = loader
        self.max_samples = max_samples

    def __iter__(self) -> Iterator:
        seen = 0
        for images, targets in self.loader:
            if self.max_samples is not None:
                left = self.max_samples - seen
                if left <= 0:
                    break
                if len(images) > left:
                    images, targets = images[:left], targets[:left]
            seen += len(images)
            yield images, targets
            if self.max_samples is not None and seen >= self.max_samples:
                break


def _loader(spec, preprocess, batch_size, workers, max_samples, target_key, target_fn, collate):
    urls = expand_urls(spec)
    workers = max(0, min(int(workers), len(urls)))
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=_all_nodes, handler=wds.warn_and_continue,
                        empty_check=False)
    if max_samples is not None:
        ds = ds.slice(int(max_samples))
    # raw bytes in, only the image and the target decoded here: webdataset's default decoders would unpickle
    # .pyd/.pkl members and torch.load .pth ones (code execution from a shard)
    ds = (ds.to_tuple(";".join(IMAGE_KEYS), target_key, handler=wds.warn_and_continue)
          .map_tuple(lambda data: preprocess(decode_image(data)), target_fn, handler=wds.warn_and_continue)
          .batched(batch_size, collation_fn=collate, partial=True))
    loader = wds.WebLoader(ds, batch_size=None, shuffle=False, num_workers=workers)
    return _Truncated(loader, max_samples)


def labeled_loader(spec, preprocess, batch_size: int = 64, workers: int = 0, max_samples: int | None = None):
    """Batches ``(images [B,3,H,W], labels [B] long)`` from classification shards (``cls``)."""
    return _loader(spec, preprocess, batch_size, workers, max_samples, "cls", _decode_label, _collate_labeled)


def retrieval_loader(spec, preprocess, batch_size: int = 64, workers: int = 0, max_samples: int | None = None):
    """Batches ``(images [B,3,H,W], [[caption, ...] per image])`` from retrieval shards (``txt``)."""
    return _loader(spec, preprocess, batch_size, workers, max_samples, "txt", _decode_captions,
                   _collate_captions)
