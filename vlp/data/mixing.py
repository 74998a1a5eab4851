"""The mixer: one IterableDataset whose workers each yield whole mixed batches of a fixed composition.

Each item is ``(Batch, StreamMeta)`` (the contract lives in :mod:`vlp.data.batch`). Every rank builds the same
composition (``batch.paired`` + ``batch.labeled`` + ``batch.unlabeled`` rows), so no objective ever sees an empty
subset and distributed gathers line up. Each record is decoded once; the shared-pass image and every view group an
objective declared for its kind are cut from that one decode. Randomness is seeded from (seed, rank, worker, batch
index), so a run is reproducible and a resumed run can skip the batches it already consumed without decoding them
(:attr:`start_batch`). Records that replaced corrupt images shift a stream; a resume that also knows each stream's
``taken`` counts (:attr:`start_taken`) skips exactly what was consumed.
"""
from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import DataConfig
from vlp.data.format import KINDS, decode_image
from vlp.data.batch import KIND_ID, Batch, StreamMeta, ViewGroup, merge_view_groups
from vlp.data.device_decode import DevicePlanner, DeviceRow, PendingImages
from vlp.data.sources import NoUsableData, Source, build_sources, stream_seed
from vlp.data.transforms import decode_side


MAX_CORRUPT_IN_A_ROW = 1000


class MixedBatches(IterableDataset):
    """Infinite stream of mixed batches for one rank."""

    def __init__(self, cfg: DataConfig, transform: Callable, tokenizer: Callable, seed: int = 0,
                 rank: int = 0, world: int = 1, templates: list[str] | None = None,
                 labels_as_text: bool = False, sources: list[Source] | None = None,
                 view_groups: list[ViewGroup] = ()):
        self.cfg = cfg
        self.transform = transform
        self.tokenizer = tokenizer
        self.seed = seed
        self.rank = rank
        self.world = world
        self.templates = templates or ["a photo of a {c}."]
        self.labels_as_text = labels_as_text
        self.sources = sources if sources is not None else build_sources(cfg.sources)
        self.per_kind = {k: getattr(cfg.batch, k) for k in KINDS}
        self.view_groups = merge_view_groups(list(view_groups))
        # the short side JPEGs are decoded at: what the base transform and every view still need (None: whole)
        self.decode_side = decode_side([transform] + [t for g in self.view_groups for t in g.transforms]) \
            if cfg.draft_decode else None
        # data.decode device: JPEG rows of kinds without views are only planned here (header, crop), decoded on the
        # trainer's device (vlp.data.device_decode); the other rows take the CPU path below
        self.planner = DevicePlanner.for_mixer(transform, self.view_groups) if cfg.decode == "device" else None
        self._source_index = {id(s): n for n, s in enumerate(self.sources)}
        self.start_batch = 0  # global batches already consumed (set before iterating to resume)
        self.start_taken: dict[int, list[int]] = {}  # per stream: records consumed per kind (exact resume)
        if labels_as_text:
            for s in self.sources:
                if s.kind == "labeled" and not s.classnames:
                    raise ValueError(f"source {s.name}: labels as text need classnames (classnames.txt or config)")

    @property
    def batch_size(self) -> int:
        return sum(self.per_kind.values())

    # ---- streams ----------------------------------------------------------------------------------------
    def _kind_stream(self, kind: str, worker: int, workers: int) -> Iterator[tuple[Source, dict]]:
        """Records of one kind, each from a source drawn by weight among that kind's sources."""
        sources = [s for s in self.sources if s.kind == kind]
        streams = [s.records(self.seed, self.rank, self.world, worker, workers, resampled=self.cfg.resampled,
                             shuffle_buffer=self.cfg.shuffle_buffer) for s in sources]
        weights = [s.cfg.weight for s in sources]
        rng = random.Random(stream_seed(self.seed, "mix", kind, self.rank, worker))
        while True:
            i = rng.choices(range(len(sources)), weights)[0] if len(sources) > 1 else 0
            yield sources[i], next(streams[i])

    def __iter__(self) -> Iterator[tuple[Batch, StreamMeta]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # In a fresh run the DataLoader takes batches from workers round-robin, so global batch g is built by
        # stream g % workers. A resumed loader again starts at worker 0, which must therefore continue the
        # stream that builds batch start_batch: worker w runs stream (w + start_batch) % workers.
        stream = (worker + self.start_batch) % workers
        self._streams = {k: self._kind_stream(k, stream, workers) for k in KINDS if self.per_kind[k] > 0}
        self._taken = [0] * len(KINDS)
        local = 0
        skip = (self.start_batch - stream + workers - 1) // workers if self.start_batch > stream else 0
        if skip and stream in self.start_taken:  # exact position, replacements of corrupt images included
            for k, n in zip(KINDS, self.start_taken[stream]):
                for _ in range(n if self.per_kind[k] > 0 else 0):
                    self._next(k)
            local = skip
        while True:
            rows = [(k, *self._next(k)) for k in KINDS if self.per_kind[k] > 0 for _ in range(self.per_kind[k])]
            if local >= skip:
                yield self._collate(rows, stream, local, worker)
            local += 1

    def _next(self, kind: str) -> tuple[Source, dict]:
        self._taken[KIND_ID[kind]] += 1
        return next(self._streams[kind])

    # ---- one batch --------------------------------------------------------------------------------------
    def _collate(self, rows: list[tuple[str, Source, dict]], stream: int, local: int,
                 worker: int) -> tuple[Batch, StreamMeta]:
        batch_seed = stream_seed(self.seed, "batch", self.rank, stream, local)
        with torch.random.fork_rng(devices=[]):  # transforms draw from torch's global RNG; keep the caller's
            torch.manual_seed(batch_seed)
            batch = self._collate_seeded(rows, random.Random(batch_seed), worker)
        meta = StreamMeta(bad=torch.tensor([s.bad.total for s in self.sources], dtype=torch.long), worker=worker,
                          stream=stream, taken=list(self._taken))
        return batch, meta

    def _collate_seeded(self, rows: list[tuple[str, Source, dict]], rng: random.Random, worker: int) -> Batch:
        images, texts, has_text = [], [], []
        views: dict[str, list[list[torch.Tensor]]] = {g.name: [[] for _ in g.transforms] for g in self.view_groups}
        for i, (kind, source, rec) in enumerate(rows):
            image = self._decode(source, rec, kind, worker, rows, i,
                                 self.planner is not None and kind not in self.planner.cpu_kinds)
            if isinstance(image, DeviceRow):  # decoded on the trainer's device; no view group covers its kind
                images.append((image, self._source_index[id(rows[i][1])], rows[i][2]["key"]))
            else:
                images.append(self.transform(image))
            for g in self.view_groups:  # every view of this row from the same decode
                if kind in g.kinds:
                    for v, t in enumerate(g.transforms):
                        views[g.name][v].append(t(image))
            text = rows[i][2]["text"]
            if kind == "labeled" and self.labels_as_text:
                text = rng.choice(self.templates).format(c=source.classnames[rows[i][2]["label"]])
            has_text.append(text is not None)
            texts.append(text or "")
        tokens = self.tokenizer(texts)
        tokens[~torch.tensor(has_text)] = 0
        return Batch(
            image=PendingImages.pack(self.planner.recipe, images) if self.planner else torch.stack(images),
            text=tokens,
            has_text=torch.tensor(has_text),
            label=torch.tensor([r[2]["label"] for r in rows], dtype=torch.long),
            kind=torch.tensor([KIND_ID[r[0]] for r in rows], dtype=torch.long),
            views={name: torch.stack([torch.stack(v) for v in per_view]) for name, per_view in views.items()},
            hidden_label=torch.tensor([r[2].get("hidden_label", -1) for r in rows], dtype=torch.long),
            labels=padded_labels([r[2] for r in rows]),
        )

    def _decode(self, source: Source, rec: dict, kind: str, worker: int, rows: list, i: int,
                on_device: bool = False):
        """Decode a row's image; a corrupt one is counted and replaced by the next record of its kind (a source
        whose images are all corrupt is an error after ``MAX_CORRUPT_IN_A_ROW``, not an endless loop).
        ``on_device``: a JPEG the device decodes is only planned (a :class:`DeviceRow`)."""
        for _ in range(MAX_CORRUPT_IN_A_ROW):
            try:
                planned = self.planner.plan(rec["image"]) if on_device else None
                if planned is not None:
                    return planned
                return decode_image(rec["image"], self.decode_side)
            except Exception as exn:  # PIL raises many types for bad data
                source.bad.add("corrupt image", f"{source.name}/{rec['key']}: {exn!r}"[:200])
                source, rec = self._next(kind)
                rows[i] = (kind, source, rec)
        raise NoUsableData(f"{kind} data: {MAX_CORRUPT_IN_A_ROW} corrupt images in a row (last from source "
                           f"{source.name}); check data.sources (vlp shards verify lists what is wrong)")


def padded_labels(records: list[dict]) -> torch.Tensor | None:
    """``Batch.labels``: each record's classes (``labels``, else ``[label]``, else none) padded with -1 to the most
    of any row; None when no record is multi-label (single-label batches are as they always were)."""
    if not any("labels" in r for r in records):
        return None
    rows = [r.get("labels", [r["label"]] if r["label"] >= 0 else []) for r in records]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long)


def _absorb_first_stop_signal(signum, frame) -> None:
    signal.signal(signum, signal.SIG_DFL)  # the next one (the loader's own shutdown, a second kill) is fatal


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when its trainer dies (``prctl(PR_SET_PDEATHSIG)``). A SIGKILLed trainer's
    workers otherwise live on: for torch's 5 s status check, or for ever when stuck in a stalled read."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # no libc prctl: keep torch's own status check
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the trainer died before prctl took effect
        os._exit(1)


PR_SET_PDEATHSIG = 1


def _worker_init(worker_id: int) -> None:
    """Clusters, ``timeout``, systemd and torch's elastic agent signal the whole process group: the first SIGTERM /
    SIGINT reaching a worker is absorbed, so the trainer (which handles it) can checkpoint while its workers still
    feed it, then shut them down as usual. A worker dies with its trainer (:func:`_die_with_parent`)."""
    _die_with_parent()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _absorb_first_stop_signal)


# how often the trainer's wait for a batch wakes up (data.timeout_s and stop signals are checked between waits)
POLL_S = 1.0


def make_loader(dataset: MixedBatches, workers: int, poll_s: float = 0) -> DataLoader:
    """One DataLoader over whole batches (``batch_size=None``); workers keep their streams alive. With ``poll_s``
    (workers only), ``next`` raises torch's timeout error after that long without a batch (see
    :func:`is_poll_timeout`); the loader stays usable, so the caller can check its own deadline and wait again."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=_worker_init if workers > 0 else None, timeout=poll_s if workers > 0 else 0)


def close_loader(it, kill: bool = False) -> None:
    """Shut a ``make_loader`` iterator's workers down. ``kill``: SIGKILL them and the commands they run (a worker
    stuck in a stalled read holds torch's shutdown up, 5 s each; an orphaned ``pipe:`` command would hold the run's
    stdout and stderr open), with torch's SIGCHLD handler, which would call that a worker failure and raise, set
    aside meanwhile."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:  # no workers
        return
    if not kill:
        shutdown()
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        for w in getattr(it, "_workers", ()):
            for child in live_children(w.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            w.kill()
        shutdown()
    finally:
        signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)


def live_children(pid: int | None) -> list[int]:
    """The live (not zombie) child processes of ``pid`` (Linux's /proc; none elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if int(ppid) == pid and state != "Z":
            out.append(int(stat.parent.name))
    return out


def is_poll_timeout(err: BaseException) -> bool:
    """The error a ``make_loader(..., poll_s=...)`` iterator raises when no batch came within ``poll_s`` (raised
    before the iterator changes state). Workers' own errors are re-raised as their own types."""
    return type(err) is RuntimeError and str(err).startswith("DataLoader timed out")
