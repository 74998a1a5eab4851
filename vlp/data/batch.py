"""The batch contract: what the mixer yields, what the task and the objectives read.

A step's data is a pair ``(Batch, StreamMeta)``. ``Batch`` holds training tensors only (it goes to the device);
``StreamMeta`` holds where the stream stands (it never does)::

    Batch
      image     [B,3,H,W] float  input of the shared image pass, every row
      text      [B,L]     long   token ids, zeros where a row has no text
      has_text  [B]       bool   paired rows, and labeled rows when labels are used as text (UniCL)
      label     [B]       long   class index in the run's label space, -1 where absent
      kind      [B]       long   0 paired, 1 labeled, 2 unlabeled (rows are grouped in that order, KINDS)
      views     {group: [V,B_g,3,h,w]}  extra augmented views of the rows of the group's kinds (B_g rows, in
                                 batch order), each group at its own size; cut from the same decode as ``image``
      hidden_label [B] long  a benchmark's withheld label of unlabeled rows (``hidden.cls``), -1 where absent;
                                 diagnostics only (pseudo-label accuracy), never read by a loss
      labels    [B,K] long   every class of each row, padded with -1 (K: the most labels of a row in this batch);
                                 only when a row of the batch is multi-label (``.cls`` with several ids, ``.tags``),
                                 else None. A single-label row is ``[label, -1, ...]``; ``label`` holds each row's first
    StreamMeta
      bad       [S]  skipped samples so far per source, in this worker (cumulative)
      worker         the DataLoader worker that built the batch
      stream         the stream (worker slot of a fresh run) the batch belongs to
      taken     [3]  records this stream has consumed per kind, after this batch (resume position)

Every rank builds the same composition, so objectives never see an empty subset and gathers line up.
``batch["image"]`` reads a field, so code written against plain dicts of tensors keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from vlp.data.format import KINDS

KIND_ID = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class ViewGroup:
    """A named set of views an objective asks for: ``transforms[v]`` makes view ``v`` of each decoded image
    (PIL -> tensor ``[3,h,w]``) of the rows of ``kinds``. ``recipe`` describes the transforms: two objectives
    that ask for the same group name must describe it the same way, and then share it."""

    name: str
    kinds: tuple[str, ...]
    transforms: tuple[Callable, ...]
    recipe: str = ""

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"view group {self.name!r}: kinds must be among {KINDS}, got {self.kinds}")
        if not self.transforms:
            raise ValueError(f"view group {self.name!r}: needs at least one view")


def merge_view_groups(groups: list[ViewGroup]) -> list[ViewGroup]:
    """One entry per name; a name asked twice with different recipes is a configuration error."""
    out: dict[str, ViewGroup] = {}
    for g in groups:
        seen = out.get(g.name)
        if seen is None:
            out[g.name] = g
        elif (seen.kinds, seen.recipe, len(seen.transforms)) != (g.kinds, g.recipe, len(g.transforms)):
            raise ValueError(f"view group {g.name!r} is asked for twice with different recipes "
                             f"({seen.recipe!r} on {seen.kinds} vs {g.recipe!r} on {g.kinds})")
    return list(out.values())


@dataclass
class Batch:
    image: torch.Tensor
    text: torch.Tensor
    has_text: torch.Tensor
    label: torch.Tensor
    kind: torch.Tensor
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_label: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def __getitem__(self, key: str):
        if key not in _FIELDS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in _FIELDS

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.image), move(self.text), move(self.has_text), move(self.label), move(self.kind),
                     {k: move(v) for k, v in self.views.items()},
                     None if self.hidden_label is None else move(self.hidden_label),
                     None if self.labels is None else move(self.labels))

    def pin_memory(self) -> "Batch":
        return Batch(self.image.pin_memory(), self.text.pin_memory(), self.has_text.pin_memory(),
                     self.label.pin_memory(), self.kind.pin_memory(),
                     {k: v.pin_memory() for k, v in self.views.items()},
                     None if self.hidden_label is None else self.hidden_label.pin_memory(),
                     None if self.labels is None else self.labels.pin_memory())

    def __len__(self) -> int:
        return self.image.shape[0]

    def rows_of(self, kinds: tuple[str, ...] | list[str]) -> torch.Tensor:
        """Boolean mask of the rows of the given kinds (the rows a view group covers)."""
        ids = torch.tensor([KIND_ID[k] for k in kinds], device=self.kind.device)
        return torch.isin(self.kind, ids)

    def select(self, keep: torch.Tensor, group_kinds: dict[str, tuple[str, ...]]) -> "Batch":
        """The rows where ``keep [B]`` (bool) is true, in batch order; each view group (``group_kinds``: the kinds
        its rows are) keeps its views of those rows."""
        def rows(t):
            return None if t is None else t[keep]
        views = {g: v[:, keep[self.rows_of(group_kinds[g])]] for g, v in self.views.items()}
        return Batch(self.image[keep], self.text[keep], self.has_text[keep], self.label[keep], self.kind[keep],
                     views, rows(self.hidden_label), rows(self.labels))


_FIELDS = {f.name for f in fields(Batch)}


@dataclass
class StreamMeta:
    bad: torch.Tensor
    worker: int
    stream: int
    taken: list[int]

    def pin_memory(self) -> "StreamMeta":
        return self


def flatten(batch: Batch, meta: StreamMeta | None = None) -> dict[str, torch.Tensor]:
    """One flat dict of tensors (``views/<group>`` for views; meta fields as tensors), for inspection."""
    out = {name: getattr(batch, name) for name in ("image", "text", "has_text", "label", "kind")}
    out.update({f"views/{k}": v for k, v in batch.views.items()})
    if batch.labels is not None:
        out["labels"] = batch.labels
    if meta is not None:
        out.update(bad=meta.bad, worker=torch.tensor(meta.worker), stream=torch.tensor(meta.stream),
                   taken=torch.tensor(meta.taken))
    return out
