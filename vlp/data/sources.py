"""One configured WebDataset source: shard list, rank/worker split, tar reading, shuffle, validation.

A source yields light records ``{"key", "image": bytes, "text": str | None, "label": int}`` (plus ``labels``, a
list, for a multi-label sample); images are
decoded later, by the mixer, only for batches that are really used (so resuming can fast-forward a stream
without decoding it). Problems in the data never stop a run: each is skipped and counted per source, by reason.
The sample format and the reasons are :mod:`vlp.data.format`'s (``vlp shards verify`` judges samples the same way).
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
from typing import TYPE_CHECKING, Iterator

import webdataset as wds

from vlp.data.format import (CLASS_COUNTS_FILE, SIZES_FILE, Rejected, expand_shards, find_sidecar, load_classnames,
                             parse_sample)

if TYPE_CHECKING:
    from vlp.config import SourceConfig

log = logging.getLogger(__name__)


def stream_seed(*parts) -> int:
    """A 63-bit seed derived from (seed, epoch, rank, worker, ...): reproducible and different per stream."""
    h = 1469598103934665603
    for p in parts:
        for byte in str(p).encode() + b"|":
            h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class NoUsableData(RuntimeError):
    """A source (or a kind's sources) can yield no usable sample: training stops with this one-line reason."""


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


def sidecar_size(urls: list[str]) -> int | None:
    """Samples in ``urls`` by the ``sizes.json`` beside them; None without one, or when it misses a shard."""
    found = find_sidecar(urls, SIZES_FILE)
    if not found:
        return None
    sizes = json.loads(found.read_text())
    try:
        return sum(int(sizes[os.path.basename(u)]) for u in urls)
    except KeyError:
        return None


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
        # the shards' own class names (what their labels index); ``classnames`` becomes the run's label space
        # (:func:`unify_label_space`), which the records' labels index
        self.own_classnames = self.classnames = self._classnames()
        self.class_index = {c: i for i, c in enumerate(self.own_classnames or [])}
        self.to_global: list[int] | None = None  # own class index -> run's class index (None: the same)
        self.size = cfg.size if cfg.size is not None else sidecar_size(self.urls)
        self.accept = self._balance_acceptance()
        self.noise = cfg.noise if self.kind == "labeled" else 0.0
        if self.noise and not self.own_classnames:
            raise ValueError(f"source {self.name}: noise={cfg.noise} needs class names (classnames.txt or "
                             f"classnames) to draw random classes from")
        self.bad = BadSamples()
        self._dry_shards: set[str] = set()  # shards read through without a usable record since the last one

    # ---- metadata ---------------------------------------------------------------------------------------
    def _classnames(self) -> list[str] | None:
        return load_classnames(self.urls, self.cfg.classnames)

    def _balance_acceptance(self) -> dict[int, float] | None:
        """Per-class acceptance probabilities that resample a long-tailed stream to n_c^(1/2) or uniform. A
        multi-label record (hashtags; Mahajan et al. 2018 resample them by 1/sqrt(frequency), ``class_counts.json``
        counting each tag) is accepted with the mean of its labels' probabilities (:func:`acceptance`)."""
        if self.cfg.balance == "none" or self.kind != "labeled":
            return None
        found = find_sidecar(self.urls, CLASS_COUNTS_FILE)
        if not found:
            raise ValueError(f"source {self.name}: balance={self.cfg.balance} needs class_counts.json beside the shards")
        counts = {int(k): int(v) for k, v in json.loads(found.read_text()).items() if int(v) > 0}
        power = 0.5 if self.cfg.balance == "sqrt" else 1.0
        w = {c: n ** -power for c, n in counts.items()}
        top = max(w.values())
        return {c: v / top for c, v in w.items()}

    def use_label_space(self, names: list[str]) -> None:
        """Map this source's class indices, by class name, to those of the run's label space ``names``."""
        if not self.own_classnames:
            return
        self.classnames = list(names)
        index = {c: i for i, c in enumerate(names)}
        mapping = [index[c] for c in self.own_classnames]
        self.to_global = None if mapping == list(range(len(mapping))) else mapping
        if self.to_global is not None and self.accept is not None:
            self.accept = {mapping[c]: p for c, p in self.accept.items() if c < len(mapping)}

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
            if self.noise:
                for record in self._read(shards, rng, shuffle_buffer, endless=epochs is None):
                    yield self.add_noise(record, seed)
            else:
                yield from self._read(shards, rng, shuffle_buffer, endless=epochs is None)
            epoch += 1
            if resampled:
                return

    def _read(self, shards, rng: random.Random, shuffle_buffer: int, endless: bool = False) -> Iterator[dict]:
        records = itertools.chain.from_iterable(self._shard_records(u, endless) for u in shards)
        if shuffle_buffer > 1:
            records = wds.filters._shuffle(records, shuffle_buffer, min(100, shuffle_buffer), rng)
        for record in records:
            if self.accept is not None and rng.random() >= acceptance(self.accept, record):
                continue
            yield record

    def add_noise(self, record: dict, seed: int) -> dict:
        """The record with each label, with probability ``noise``, replaced by a class drawn uniformly from those
        it does not hold (so that fraction of labels really changes). Decided by (seed, source, record key,
        position) alone: the same record gets the same labels in every worker, rank, epoch and resume."""
        labels = record.get("labels", [record["label"]])
        n = len(self.classnames)
        out = list(labels)
        for pos in range(len(out)):
            rng = random.Random(stream_seed(seed, "noise", self.index, record["key"], pos))
            if rng.random() < self.noise:
                held = set(out)
                others = [c for c in range(n) if c not in held]
                if others:
                    out[pos] = others[rng.randrange(len(others))]
        if out == list(labels):
            return record
        record = {**record, "label": out[0]}
        if "labels" in record:
            record["labels"] = out
        return record

    def _shard_records(self, url: str, endless: bool) -> Iterator[dict]:
        """Valid records of one tar. One tar at a time: webdataset drops its end-of-shard marker when a tar breaks
        off, and would then merge a truncated shard's last partial sample with the next shard's first one if their
        keys match. In an ``endless`` stream, once every shard of the source has been read through without a valid
        record (not a tar, empty, every sample rejected), it can never yield one: a clear error instead of an endless
        retry (an exact epoch over such shards simply ends)."""
        found = False
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=self._tar_error):
            record = self.to_record(sample)
            if record is not None:
                found = True
                self._dry_shards.clear()
                yield record
        if not found and endless:
            self._dry_shards.add(url)
            if len(self._dry_shards) >= len(set(self.urls)):
                raise NoUsableData(
                    f"source {self.name}: none of its {len(set(self.urls))} shard(s) holds a usable sample "
                    f"(skipped: {dict(self.bad.counts) or 'nothing readable'}); check data.sources "
                    f"(vlp shards verify SPEC --kind {self.kind} lists what is wrong)")

    def _tar_error(self, exn: Exception) -> bool:
        self.bad.add("unreadable tar", repr(exn)[:200])
        return True

    # ---- validation -------------------------------------------------------------------------------------
    def to_record(self, sample: dict) -> dict | None:
        """The sample as a record, or None (counted in :attr:`bad`) when :func:`parse_sample` rejects it."""
        key = sample.get("__key__", "?")
        parsed = parse_sample(sample, self.kind, self.own_classnames, self.class_index)
        if isinstance(parsed, Rejected):
            where = f"{self.name}/{key}"
            self.bad.add(parsed.reason, f"{where}: {parsed.detail}" if parsed.detail else where)
            return None
        if self.to_global is not None:
            for k in ("label", "hidden_label"):
                if parsed.get(k, -1) >= 0:
                    parsed[k] = self.to_global[parsed[k]]
            if "labels" in parsed:
                parsed["labels"] = [self.to_global[c] for c in parsed["labels"]]
        return {"key": f"{sample.get('__url__', '')}/{key}", **parsed}


def acceptance(accept: dict[int, float], record: dict) -> float:
    """The probability that class-balanced resampling keeps ``record``: its class's, or for a multi-label record
    the mean of its labels' (draw one of its tags, keep the image with that tag's probability; Mahajan et al. 2018
    resample hashtags by 1/sqrt(frequency))."""
    labels = record.get("labels")
    if labels is None:
        return accept.get(record["label"], 0.0)
    return sum(accept.get(c, 0.0) for c in labels) / len(labels)


def build_sources(cfgs: list[SourceConfig]) -> list[Source]:
    sources = [Source(c, i) for i, c in enumerate(cfgs)]
    unify_label_space(sources)
    return sources


def unify_label_space(sources: list[Source]) -> list[str] | None:
    """ONE label space for the run: the union of the labeled sources' class names (the first source's order, then
    each new name appended, in source order). Every source with class names then maps its own indices, by name, to
    the run's: ``vlp shards folder`` (sorted folder names) and ``vlp shards hf`` (ClassLabel order) shards of the
    same classes train one head. Sources without class names keep their integer labels (a warning when other
    labeled sources have names: indices cannot be matched by name). Returns the run's class names (or None)."""
    labeled = [s for s in sources if s.kind == "labeled"]
    named = [s for s in labeled if s.own_classnames]
    if not named:
        return None
    names: list[str] = []
    seen: set[str] = set()
    for s in named:
        for c in s.own_classnames:
            if c not in seen:
                seen.add(c)
                names.append(c)
    unnamed = [s.name for s in labeled if not s.own_classnames]
    if unnamed:
        log.warning("labeled source(s) %s have no class names: their integer labels are used as indices into the "
                    "run's %d classes without matching by name", unnamed, len(names))
    for s in sources:
        if s.own_classnames and any(c not in seen for c in s.own_classnames):  # an unlabeled source's hidden labels
            continue
        s.use_label_space(names)
    if len(named) > 1 and any(s.own_classnames != names for s in named):
        log.info("labeled sources %s: one label space of %d classes (union by class name; first source's order)",
                 [s.name for s in named], len(names))
    return names


def expected_steps_per_epoch(sources: list[Source], per_kind: dict[str, int]) -> float | None:
    """Steps until the smallest source of a kind has been seen once (for logging), if sizes are known."""
    best = None
    for s in sources:
        n = per_kind.get(s.kind, 0)
        if n and s.size:
            steps = s.size / n
            best = steps if best is None else min(best, steps)
    return math.floor(best) if best else None
