"""Inspect and verify WebDataset shards (offline tooling).

``verify`` judges every sample with :mod:`vlp.data.format`, the parser training uses: a sample is bad exactly
when a training source of the same kind (and class names) would skip it, for the same reason (the keys of
``Source.bad.counts``), images decoded the way the mixer decodes them.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlp.data.format import (CLASS_COUNTS_FILE, KINDS, SIZES_FILE, Rejected, check_image, expand_shards, find_sidecar,
                             image_key, infer_kind, is_local, load_classnames, parse_sample)


def _sizes_for(shard: str, cache: dict[Path, dict]) -> int | None:
    """The shard's count in the sizes.json beside it (or one folder up), if any."""
    found = find_sidecar([shard], SIZES_FILE)
    if found is None:
        return None
    if found not in cache:
        try:
            cache[found] = json.loads(found.read_text())
        except (OSError, ValueError):
            cache[found] = {}
    value = cache[found].get(os.path.basename(shard)) if isinstance(cache[found], dict) else None
    return int(value) if value is not None else None


def iter_shard(shard: str, errors: list[str] | None = None) -> Iterator[dict]:
    """Samples of one shard via webdataset's tar iteration; read errors go to ``errors`` instead of raising."""
    from webdataset import tariterators

    def handler(exn: Exception) -> bool:
        if errors is None:
            raise exn
        detail = exn.strerror if isinstance(exn, OSError) and exn.strerror else exn.args[0] if exn.args else ""
        message = f"read error: {type(exn).__name__}: {str(detail).split(' @ <')[0]}"
        if message not in errors:  # a broken member is reported once by the member and once by the stream
            errors.append(message)
        return True

    sources = list(tariterators.url_opener([{"url": shard}], handler=handler))
    try:
        files = tariterators.tar_file_expander(iter(sources), handler=handler)
        yield from tariterators.group_by_keys(files, handler=handler)
    finally:
        for source in sources:
            source["stream"].close()


def tar_structure_error(shard: str) -> str | None:
    """None if the (uncompressed, local) tar reads to its end-of-archive marker, else what is wrong."""
    if not os.path.isfile(shard) or not shard.endswith(".tar"):
        return None
    try:
        with tarfile.open(shard, mode="r:") as tf:
            end = 0
            for member in tf:
                end = member.offset_data + ((member.size + 511) // 512) * 512
        size = os.path.getsize(shard)
        with open(shard, "rb") as f:
            f.seek(end)
            tail = f.read(1024)
    except (tarfile.TarError, OSError) as exn:
        return f"unreadable tar: {type(exn).__name__}: {exn}"
    if end > size:
        return f"truncated tar: last member ends at byte {end}, file has {size}"
    if len(tail) < 1024 or tail.strip(b"\0"):
        return f"truncated tar: no end-of-archive marker after byte {end} (file has {size})"
    return None


def _preview(sample: dict) -> dict:
    from PIL import Image

    info: dict[str, Any] = {"key": sample["__key__"], "keys": sorted(k for k in sample if not k.startswith("__"))}
    if "txt" in sample:
        info["caption"] = sample["txt"].decode("utf-8", errors="replace")
    if "cls" in sample:
        info["cls"] = sample["cls"].decode("ascii", errors="replace")
    key = image_key(sample)
    if key:
        try:
            with Image.open(io.BytesIO(sample[key])) as im:
                info["image_size"] = list(im.size)
        except Exception as exn:
            info["image_size"] = f"undecodable ({type(exn).__name__})"
    return info


def _shard_name(shard: str) -> str:
    return os.path.basename(shard) or shard


def inspect_shards(spec: str, n_preview: int = 3) -> dict:
    """Summary of a shard spec: shards, samples, extension counts, sizes.json total, classes, first samples."""
    shards = expand_shards(spec)
    missing = [s for s in shards if is_local(s) and not os.path.exists(s)]
    if not shards or missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"no such shard {missing[0]!r}{more}" if missing else f"no shards match {spec!r}")
    keys: Counter = Counter()
    per_shard: dict[str, int] = {}
    errors: list[tuple[str, str]] = []
    preview: list[dict] = []
    cache: dict[Path, dict] = {}
    sizes_total: int | None = 0
    for shard in shards:
        shard_errors: list[str] = []
        count = 0
        for sample in iter_shard(shard, shard_errors):
            count += 1
            keys.update(k for k in sample if not k.startswith("__"))
            if len(preview) < n_preview:
                preview.append({"shard": _shard_name(shard), **_preview(sample)})
        per_shard[shard] = count
        errors.extend((shard, e) for e in shard_errors)
        listed = _sizes_for(shard, cache)
        sizes_total = None if listed is None or sizes_total is None else sizes_total + listed
    classnames = load_classnames(shards)
    num_classes = len(classnames) if classnames is not None else None
    return {
        "spec": spec,
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(per_shard.values()),
        "samples_per_shard": per_shard,
        "keys": dict(sorted(keys.items())),
        "sizes_json_total": sizes_total if shards else None,
        "num_classes": num_classes,
        "preview": preview,
        "errors": errors,
    }


def judge_sample(sample: dict, kind: str | None = None, classnames: Sequence[str] | None = None,
                 class_index: dict[str, int] | None = None) -> Rejected | None:
    """None if training would use the sample, else why it would skip it (the image is decoded too).

    ``kind`` None judges each sample as :func:`vlp.data.format.infer_kind` guesses from its keys.
    """
    parsed = parse_sample(sample, kind or infer_kind(sample), classnames, class_index)
    if isinstance(parsed, Rejected):
        return parsed
    return check_image(parsed["image"], image_key(sample) or "image")


def check_sample(sample: dict, kind: str | None = None, classnames: Sequence[str] | None = None) -> str | None:
    """None if the sample is sound, else ``"reason: detail"`` (see :func:`judge_sample`)."""
    rejected = judge_sample(sample, kind, classnames)
    return None if rejected is None else str(rejected)


def guess_kind(shards: Sequence[str], n: int = 200) -> str:
    """The kind of a dataset from its first ``n`` samples: labeled if any has ``cls``, else paired if any has a
    caption key, else unlabeled (:func:`vlp.data.format.infer_kind`, taken over the dataset, not per sample)."""
    kinds = set()
    for shard in shards:
        for sample in iter_shard(shard, []):
            kinds.add(infer_kind(sample))
            n -= 1
            if n <= 0 or "labeled" in kinds:
                break
        if n <= 0 or "labeled" in kinds:
            break
    return next((k for k in ("labeled", "paired") if k in kinds), "unlabeled")


def class_counts_problems(shards: Sequence[str], names: Sequence[str] | None, tally: Counter,
                          all_ok: bool) -> list[tuple[str, str]]:
    """``(file, problem)`` for a ``class_counts.json`` beside labeled shards that disagrees with the class names (a
    class index that is not an integer, or not below the number of names) or, when the shards judged are all that
    sizes.json beside them lists and every sample is good, with the labels they hold (``tally``: each label of a
    multi-label sample counts, as :func:`vlp.shards.readers.write_tags` counts them)."""
    found = find_sidecar(shards, CLASS_COUNTS_FILE)
    if found is None or names is None:
        return []
    try:
        counts = json.loads(found.read_text())
        counts = {int(k): int(v) for k, v in counts.items()}
    except (OSError, ValueError, TypeError, AttributeError) as exn:
        return [(str(found), f"{CLASS_COUNTS_FILE}: unreadable ({type(exn).__name__}: {str(exn)[:80]})")]
    out = [(str(found), f"{CLASS_COUNTS_FILE}: class {k} is not among the {len(names)} class names")
           for k in sorted(counts) if not 0 <= k < len(names)]
    sizes = find_sidecar(shards, SIZES_FILE)
    try:
        listed = set(json.loads(sizes.read_text())) if sizes is not None and sizes.parent == found.parent else None
    except (OSError, ValueError):
        listed = None
    if not out and all_ok and listed is not None and listed == {os.path.basename(s) for s in shards}:
        wrong = [c for c in range(len(names)) if counts.get(c, 0) != tally.get(c, 0)]
        if wrong:
            c = wrong[0]
            out.append((str(found), f"{CLASS_COUNTS_FILE}: {len(wrong)} class(es) counted differently from the "
                                    f"shards' labels, e.g. class {c} ({names[c]!r}): {counts.get(c, 0)} listed, "
                                    f"{tally.get(c, 0)} in the shards"))
    return out


def verify_shards(spec: str, kind: str | None = None,
                  classnames: Sequence[str] | str | os.PathLike | None = None) -> dict:
    """Read and judge every sample of every shard; truncated/unreadable shards are reported, never raised.

    Samples are judged as a training source of ``kind`` would judge them (None: one kind guessed for the whole
    dataset from its first samples' keys, see :func:`guess_kind`, so a captioned dataset's sample without a caption
    is a bad ``paired`` sample, as training counts it, not a good ``unlabeled`` one), with ``classnames`` (a list or a file; default
    ``classnames.txt`` beside the shards or one folder up, as training finds it).

    Returns ``total`` (samples read), ``ok``, ``bad`` (samples training would skip), ``reasons`` (bad samples
    per reason, the keys of training's ``Source.bad.counts``), ``shard_errors`` (shard-level problems: read
    errors, truncation, sizes.json mismatches), ``bad_samples``: a list of ``(shard, key, reason)`` for both
    (key None for shard-level problems; ``class_counts.json`` problems, :func:`class_counts_problems`, count as
    shard errors too), ``num_classes`` and ``clean``.
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    shards = expand_shards(spec)
    names = load_classnames(shards, classnames)
    guessed = kind is None
    kind = kind or guess_kind(shards)
    class_index = {c: i for i, c in enumerate(names or [])}
    total = ok = 0
    shard_errors = 0
    reasons: Counter = Counter()
    bad_samples: list[tuple[str, str | None, str]] = []
    cache: dict[Path, dict] = {}
    tally: Counter = Counter()
    for shard in shards:
        read_errors: list[str] = []
        count = 0
        for sample in iter_shard(shard, read_errors):
            count += 1
            rejected = judge_sample(sample, kind, names, class_index)
            if rejected is None:
                ok += 1
                if kind == "labeled":
                    parsed = parse_sample(sample, kind, names, class_index)
                    tally.update(parsed.get("labels", [parsed["label"]]))
            else:
                reasons[rejected.reason] += 1
                bad_samples.append((shard, sample.get("__key__"), str(rejected)))
        total += count
        problems = list(read_errors)
        structure = tar_structure_error(shard)
        if structure and not read_errors:
            problems.append(structure)
        listed = _sizes_for(shard, cache)
        if listed is not None and listed != count:
            problems.append(f"sizes.json lists {listed} samples, read {count}")
        shard_errors += len(problems)
        bad_samples.extend((shard, None, p) for p in problems)
    if kind == "labeled":
        problems = class_counts_problems(shards, names, tally, ok == total and not shard_errors)
        shard_errors += len(problems)
        bad_samples.extend((where, None, p) for where, p in problems)
    bad = total - ok
    return {
        "spec": spec,
        "kind": kind,
        "kind_guessed": guessed,
        "num_shards": len(shards),
        "num_classes": len(names) if names is not None else None,
        "total": total,
        "ok": ok,
        "bad": bad,
        "reasons": dict(sorted(reasons.items())),
        "shard_errors": shard_errors,
        "bad_samples": bad_samples,
        "clean": bad == 0 and shard_errors == 0 and bool(shards),
    }
