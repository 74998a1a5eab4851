"""One configured WebDataset source: shard list, rank/worker split, tar reading, shuffle, validation.

A source yields light records ``{"key", "image": bytes, "text": str | None, "label": int}``; images are
decoded later, by the mixer, only for batches that are really used (so resuming can fast-forward a stream
without decoding it). Problems in the data never stop a run: each is skipped and counted per source, by reason.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import webdataset as wds

from vlp.config import SourceConfig, expand_shards

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def stream_seed(*parts) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, worker, ...): reproducible and different per stream."""
    h = 1469598103934665603
    for p in parts:
        for byte in str(p).encode() + b"|":
            h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


@dataclass
class BadSamples:
    """Counts of skipped samples by reason (corrupt image, truncated tar, missing caption, ...)."""

    counts: Counter = field(default_factory=Counter)

    def add(self, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= 3:
            log.warning("skipped sample (%s) %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _sidecar(urls: list[str], name: str) -> Path | None:
    for url in urls:
        if "://" in url:
            continue
        p = Path(url).parent / name
        if p.is_file():
            return p
        p = Path(url).parent.parent / name
        if p.is_file():
            return p
    return None


def read_lines(path: str | os.PathLike) -> list[str]:
    return [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


class Source:
    """A dataset of one kind, read from its shards (see :class:`vlp.config.SourceConfig`)."""

    def __init__(self, cfg: SourceConfig, index: int = 0, kind: str | None = None):
        self.cfg = cfg
        self.index = index
        self.name = cfg.name or f"{cfg.kind}{index}"
        self.kind = kind or cfg.kind  # a labeled or paired source may be used as unlabeled
        self.urls = [u for spec in cfg.shard_specs() for u in expand_shards(spec)]
        if not self.urls:
            raise ValueError(f"source {self.name}: no shards match {cfg.shards!r}")
        self.classnames = self._classnames()
        self.class_index = {c: i for i, c in enumerate(self.classnames or [])}
        self.size = cfg.size if cfg.size is not None else self._size_from_sidecar()
        self.accept = self._balance_acceptance()
        self.bad = BadSamples()

    # ---- metadata ---------------------------------------------------------------------------------------
    def _classnames(self) -> list[str] | None:
        c = self.cfg.classnames
        if isinstance(c, list):
            return c
        if isinstance(c, str):
            return read_lines(c)
        found = _sidecar(self.urls, "classnames.txt")
        return read_lines(found) if found else None

    def _size_from_sidecar(self) -> int | None:
        found = _sidecar(self.urls, "sizes.json")
        if not found:
            return None
        sizes = json.loads(found.read_text())
        try:
            return sum(int(sizes[os.path.basename(u)]) for u in self.urls)
        except KeyError:
            return None

    def _balance_acceptance(self) -> dict[int, float] | None:
        """Per-class acceptance probabilities that resample a long-tailed stream to n_c^(1/2) or uniform."""
        if self.cfg.balance == "none" or self.kind != "labeled":
            return None
        found = _sidecar(self.urls, "class_counts.json")
        if not found:
            raise ValueError(f"source {self.name}: balance={self.cfg.balance} needs class_counts.json beside the shards")
        counts = {int(k): int(v) for k, v in json.loads(found.read_text()).items() if int(v) > 0}
        power = 0.5 if self.cfg.balance == "sqrt" else 1.0
        w = {c: n ** -power for c, n in counts.items()}
        top = max(w.values())
        return {c: v / top for c, v in w.items()}

    # ---- shard order ------------------------------------------------------------------------------------
    def epoch_shards(self, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int) -> list[str]:
        """This (rank, worker)'s shards for one exact epoch: a shuffled order shared by all, then split."""
        urls = list(self.urls)
        random.Random(stream_seed(seed, "shards", self.index, epoch)).shuffle(urls)
        return urls[rank::world][worker::workers]

    def records(self, seed: int, rank: int = 0, world: int = 1, worker: int = 0, workers: int = 1,
                resampled: bool = True, shuffle_buffer: int = 0, epochs: int | None = None) -> Iterator[dict]:
        """Valid records forever (or for ``epochs`` exact epochs when not resampled)."""
        epoch = 0
        while epochs is None or epoch < epochs:
            rng = random.Random(stream_seed(seed, self.index, epoch, rank, worker))
            if resampled:
                shards = (rng.choice(self.urls) for _ in iter(int, 1))
            else:
                shards = self.epoch_shards(epoch, seed, rank, world, worker, workers)
                if not shards:
                    raise RuntimeError(
                        f"source {self.name}: {len(self.urls)} shards cannot be split over {world} ranks x "
                        f"{workers} workers without resampling; set data.resampled: true or write more shards")
            yield from self._read(shards, rng, shuffle_buffer)
            epoch += 1
            if resampled:
                return

    def _read(self, shards, rng: random.Random, shuffle_buffer: int) -> Iterator[dict]:
        # One tar at a time: webdataset drops its end-of-shard marker when a tar breaks off, and would then
        # merge a truncated shard's last partial sample with the next shard's first one if their keys match.
        samples = itertools.chain.from_iterable(
            wds.tariterators.tarfile_samples([{"url": u}], handler=self._tar_error) for u in shards)
        if shuffle_buffer > 1:
            samples = wds.filters._shuffle(samples, shuffle_buffer, min(100, shuffle_buffer), rng)
        for sample in samples:
            record = self.to_record(sample)
            if record is None:
                continue
            if self.accept is not None and rng.random() >= self.accept.get(record["label"], 0.0):
                continue
            yield record

    def _tar_error(self, exn: Exception) -> bool:
        self.bad.add("unreadable tar", repr(exn)[:200])
        return True

    # ---- validation -------------------------------------------------------------------------------------
    def to_record(self, sample: dict) -> dict | None:
        key = sample.get("__key__", "?")
        where = f"{self.name}/{key}"
        image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        if image is None:
            self.bad.add("no image", where)
            return None
        record = {"key": f"{sample.get('__url__', '')}/{key}", "image": image, "text": None, "label": -1}
        if self.kind == "paired":
            text = self._caption(sample, where)
            if text is None:
                return None
            record["text"] = text
        elif self.kind == "labeled":
            label = self._label(sample, where)
            if label is None:
                return None
            record["label"] = label
        return record

    def _caption(self, sample: dict, where: str) -> str | None:
        try:
            if "txt" in sample:
                text = sample["txt"].decode("utf-8")
            elif "json" in sample:
                text = json.loads(sample["json"].decode("utf-8")).get("caption") or ""
            else:
                self.bad.add("no caption", where)
                return None
        except (UnicodeDecodeError, ValueError, AttributeError):
            self.bad.add("caption not UTF-8", where)
            return None
        text = text.strip()
        if not text:
            self.bad.add("empty caption", where)
            return None
        return text

    def _label(self, sample: dict, where: str) -> int | None:
        raw = sample.get("cls")
        if raw is None:
            raw = sample.get("txt") if self.class_index else None
        if raw is None:
            self.bad.add("no label", where)
            return None
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.bad.add("label not UTF-8", where)
            return None
        if value.lstrip("-").isdigit():
            label = int(value)
        elif value in self.class_index:
            label = self.class_index[value]
        else:
            self.bad.add("unknown label", f"{where}: {value[:40]!r}")
            return None
        n = len(self.classnames) if self.classnames else None
        if label < 0 or (n is not None and label >= n):
            self.bad.add("label out of range", f"{where}: {label}")
            return None
        return label


def build_sources(cfgs: list[SourceConfig]) -> list[Source]:
    return [Source(c, i) for i, c in enumerate(cfgs)]


def expected_steps_per_epoch(sources: list[Source], per_kind: dict[str, int]) -> float | None:
    """Steps until the smallest source of a kind has been seen once (for logging), if sizes are known."""
    best = None
    for s in sources:
        n = per_kind.get(s.kind, 0)
        if n and s.size:
            steps = s.size / n
            best = steps if best is None else min(best, steps)
    return math.floor(best) if best else None
