"""vlp.data: real shards -> Source -> MixedBatches -> real DataLoader workers, asserted on values.

Shards are written with ``vlp.shards.write_samples`` from small PIL JPEGs whose colour encodes their class,
batches go through the real open_clip tokenizer and train transform of the tiny test model (32 px).
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import json
import tarfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlp.config import (
    ConfigError,
    BatchConfig,
    DataConfig,
    SourceConfig,
    config_from_dict,
    load_config,
)
from vlp.data.format import check_shards
from vlp.data.batch import flatten
from vlp.data.mixing import KIND_ID, MixedBatches, make_loader
from vlp.shards import write_class_files, write_samples
from vlp.data.sources import Source
from vlp.data.transforms import train_transform
from vlp.models.factory import create_clip

SEED = 0
CLASSNAMES = ["red apple", "green leaf", "blue sky"]
COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]  # class i -> dominant channel i
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]
IMAGE = 32  # vlp-test-vit's image size


# ---------------------------------------------------------------------------------------------- helpers


def jpeg(colour=(128, 128, 128), seed=0, size=16) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour, np.float32) + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def grey(i: int) -> tuple[int, int, int]:
    v = 60 + (i * 37) % 140
    return (v, v, v)


def key_of(record_key: str) -> str:
    """A Source record key is '<shard url>/<sample key>'."""
    return record_key.rsplit("/", 1)[1]


def read_epoch(source: Source, **kw) -> list[dict]:
    return list(source.records(SEED, resampled=False, epochs=1, **kw))


def take(cfg: DataConfig, clip, n: int, workers: int, seed: int = SEED, start: int = 0,
         start_taken: dict | None = None, **kw) -> list[dict]:
    _, tokenizer, transform = clip
    ds = MixedBatches(cfg, transform, tokenizer, seed=seed, **kw)
    ds.start_batch = start
    ds.start_taken = start_taken or {}
    it = iter(make_loader(ds, workers))
    return [flatten(*next(it)) for _ in range(n)]


def data_config(sources: list[dict], **kw) -> DataConfig:
    return DataConfig.model_validate({"sources": sources, **kw})


def dominant_channel(image: torch.Tensor) -> int:
    """The brightest channel of a normalized image (normalization keeps the order for saturated colours)."""
    return int(image.mean(dim=(1, 2)).argmax())


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip():
    model, _, tokenizer = create_clip("vlp-test-vit")
    return model, tokenizer, train_transform(model)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    d: dict = {"root": root, "captions": {}, "labels": {}}

    # paired, captions in .txt: 12 samples in 3 shards
    captions = {f"ptxt{i:03d}": f"a caption about thing {i}" for i in range(12)}
    write_samples(({"__key__": k, "jpg": jpeg(grey(i), i), "txt": c} for i, (k, c) in enumerate(captions.items())),
                  root / "paired_txt", maxcount=4)
    d["captions"].update(captions)

    # paired in img2dataset's layout: 00000.tar + 00000.parquet + 00000_stats.json, captions only in .json
    out = root / "paired_json"
    captions = {f"{i:09d}": f"an image from the web number {i}" for i in range(8)}
    samples = [{"__key__": k, "jpg": jpeg(grey(100 + i), 100 + i),
                "json": json.dumps({"caption": c, "url": f"http://x/{k}.jpg", "key": k, "status": "success",
                                    "width": 16, "height": 16}).encode()}
               for i, (k, c) in enumerate(captions.items())]
    for n, path in enumerate(write_samples(samples, out, maxcount=4)):
        os.rename(path, out / f"{n:05d}.tar")
        keys = list(captions)[4 * n:4 * n + 4]
        pd.DataFrame({"key": keys, "caption": [captions[k] for k in keys], "status": "success"}).to_parquet(
            out / f"{n:05d}.parquet")
        (out / f"{n:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 4, "failed_to_download": 0}))
    (out / "sizes.json").unlink()  # img2dataset writes none
    d["captions"].update(captions)

    # labeled with .cls ints; classnames.txt + class_counts.json beside the shards
    labels = {f"lcls{i:03d}": i % 3 for i in range(9)}
    write_samples(({"__key__": k, "jpg": jpeg(COLOURS[c], 200 + i), "cls": c} for i, (k, c) in enumerate(labels.items())),
                  root / "labeled_cls", maxcount=3)
    write_class_files(root / "labeled_cls", CLASSNAMES, Counter(labels.values()))
    d["labels"].update(labels)

    # labeled with the class name as text (mapped through the config's classnames)
    labels = {f"lname{i:03d}": (i * 2) % 3 for i in range(9)}
    write_samples(({"__key__": k, "jpg": jpeg(COLOURS[c], 300 + i), "txt": CLASSNAMES[c]}
                   for i, (k, c) in enumerate(labels.items())), root / "labeled_names", maxcount=3)
    d["labels"].update(labels)

    # unlabeled: 16 samples in 6 shards (for the 2 ranks x 2 workers split)
    d["unlabeled_keys"] = {f"u{i:03d}" for i in range(16)}
    write_samples(({"__key__": f"u{i:03d}", "jpg": jpeg(grey(400 + i), 400 + i)} for i in range(16)),
                  root / "unlabeled", maxcount=3)
    return d


def all_sources(d: dict) -> list[dict]:
    r = d["root"]
    return [
        {"name": "ptxt", "kind": "paired", "shards": f"{r}/paired_txt/*.tar"},
        {"name": "pjson", "kind": "paired", "shards": f"{r}/paired_json/{{00000..00001}}.tar"},
        {"name": "lcls", "kind": "labeled", "shards": f"{r}/labeled_cls/*.tar"},
        {"name": "lname", "kind": "labeled", "shards": f"{r}/labeled_names/*.tar", "classnames": CLASSNAMES},
        {"name": "unlab", "kind": "unlabeled", "shards": f"{r}/unlabeled/*.tar"},
    ]


# ---------------------------------------------------------------------------------------------- sources


def test_labels_and_captions_from_every_layout(data):
    cfgs = {s["name"]: SourceConfig(**s) for s in all_sources(data)}

    lcls = Source(cfgs["lcls"])
    assert lcls.classnames == CLASSNAMES  # from classnames.txt beside the shards
    assert lcls.size == 9  # from sizes.json
    recs = read_epoch(lcls)
    assert {key_of(r["key"]): r["label"] for r in recs} == {k: v for k, v in data["labels"].items() if k.startswith("lcls")}
    assert all(r["text"] is None for r in recs)

    lname = Source(cfgs["lname"])
    recs = read_epoch(lname)
    assert {key_of(r["key"]): r["label"] for r in recs} == {k: v for k, v in data["labels"].items() if k.startswith("lname")}

    ptxt = Source(cfgs["ptxt"])
    recs = read_epoch(ptxt)
    assert {key_of(r["key"]): r["text"] for r in recs} == {k: v for k, v in data["captions"].items() if k.startswith("ptxt")}
    assert all(r["label"] == -1 and r["image"][:3] == b"\xff\xd8\xff" for r in recs)

    # img2dataset layout: the .parquet and *_stats.json beside the tars are ignored, captions come from .json
    pjson = Source(cfgs["pjson"])
    assert [Path(u).name for u in pjson.urls] == ["00000.tar", "00001.tar"] and pjson.size is None
    recs = read_epoch(pjson)
    assert {key_of(r["key"]): r["text"] for r in recs} == {k: v for k, v in data["captions"].items() if k[0] == "0"}
    for s in (lcls, lname, ptxt, pjson):
        assert s.bad.total == 0, s.bad.counts

    # the same spec passes config validation (only the tars are shards)
    urls = check_shards("data.sources[1].shards", cfgs["pjson"].shards)
    assert [Path(u).name for u in urls] == ["00000.tar", "00001.tar"]


class EpochKeys(IterableDataset):
    """One rank's exact epoch of a source, split over the DataLoader's real workers."""

    def __init__(self, source: Source, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def __iter__(self):
        info = get_worker_info()
        for rec in self.source.records(SEED, self.rank, self.world, info.id, info.num_workers, resampled=False,
                                       shuffle_buffer=4, epochs=1):
            yield self.rank, info.id, rec["key"]


def test_exact_epoch_split_over_ranks_and_workers_has_no_duplicates(data):
    source = Source(SourceConfig(kind="unlabeled", shards=f"{data['root']}/unlabeled/*.tar"))
    assert len(source.urls) == 6
    got = defaultdict(list)
    for rank in (0, 1):
        for r, w, key in DataLoader(EpochKeys(source, rank, 2), batch_size=None, num_workers=2):
            got[(r, w)].append(key)
    assert sorted(got) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    sets = {k: set(v) for k, v in got.items()}
    assert all(len(v) == len(sets[k]) > 0 for k, v in got.items())  # no repeats inside a stream
    parts = list(sets.values())
    for i in range(4):
        for j in range(i + 1, 4):
            assert not parts[i] & parts[j]
    union = set().union(*parts)
    assert {key_of(k) for k in union} == data["unlabeled_keys"] and len(union) == 16
    # every rank/worker reads whole shards
    shards_of = {k: {key.rsplit("/", 1)[0] for key in v} for k, v in sets.items()}
    assert sum(len(v) for v in shards_of.values()) == 6

    # too few shards for the split is an error with a remedy, not a silent empty stream
    three = Source(SourceConfig(kind="unlabeled", shards=f"{data['root']}/labeled_cls/*.tar"))
    with pytest.raises(RuntimeError, match="cannot be split over 2 ranks x 2 workers"):
        for rank in (0, 1):
            for worker in (0, 1):
                list(three.records(SEED, rank, 2, worker, 2, resampled=False, epochs=1))


# ---------------------------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("labels_as_text", [False, True])
def test_every_batch_has_the_configured_composition(data, clip, labels_as_text):
    _, tokenizer, _ = clip
    cfg = data_config(all_sources(data), batch={"paired": 3, "labeled": 2, "unlabeled": 4}, shuffle_buffer=8)
    batches = take(cfg, clip, 6, workers=2, templates=TEMPLATES, labels_as_text=labels_as_text)

    caption_tokens = {tuple(t.tolist()) for t in tokenizer(list(data["captions"].values()))}
    kinds = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    assert [KIND_ID[k] for k in ("paired", "labeled", "unlabeled")] == [0, 1, 2]
    labels_seen = set()
    for b in batches:
        assert b["image"].shape == (9, 3, IMAGE, IMAGE) and b["image"].dtype == torch.float32
        assert torch.isfinite(b["image"]).all()
        assert torch.equal(b["kind"], kinds)
        want_text = (kinds == 0) | ((kinds == 1) & labels_as_text)
        assert torch.equal(b["has_text"], want_text)
        assert b["text"].shape == (9, 16) and b["text"].dtype == torch.long
        assert (b["text"][~want_text] == 0).all()
        assert (b["text"][want_text, 0] == tokenizer.sot_token_id).all()
        assert (b["label"][kinds != 1] == -1).all()
        for row in range(3):
            assert tuple(b["text"][row].tolist()) in caption_tokens
        for row in (3, 4):
            label = int(b["label"][row])
            assert 0 <= label < 3
            labels_seen.add(label)
            assert dominant_channel(b["image"][row]) == label  # the image is the labeled sample's image
            if labels_as_text:
                prompts = tokenizer([t.format(c=CLASSNAMES[label]) for t in TEMPLATES])
                assert any(torch.equal(b["text"][row], p) for p in prompts)
        assert torch.equal(b["bad"], torch.zeros(5, dtype=torch.long))
    assert labels_seen == {0, 1, 2}
    assert [int(b["worker"]) for b in batches] == [0, 1, 0, 1, 0, 1]


def small_config(data, **kw) -> DataConfig:
    s = all_sources(data)
    return data_config([s[0], s[2], s[4]], batch={"paired": 2, "labeled": 2, "unlabeled": 2}, shuffle_buffer=8, **kw)


def test_each_record_is_decoded_once_for_the_shared_image_and_every_view_group(data, clip, monkeypatch):
    """Two view groups over overlapping kinds (2 views + 1 view): one decode per row per batch, and the shared
    transform and every view transform of a row receive that very decoded image."""
    from vlp.data import mixing
    from vlp.data.batch import ViewGroup

    decoded, seen = [], defaultdict(list)
    real_decode = mixing.decode_image

    def counting_decode(data_bytes, *args):
        image = real_decode(data_bytes, *args)
        decoded.append(id(image))
        return image

    def tap(name, transform):
        def f(image):
            seen[name].append(id(image))
            return transform(image)
        return f

    monkeypatch.setattr(mixing, "decode_image", counting_decode)
    _, tokenizer, transform = clip
    groups = [ViewGroup("two", ("unlabeled",), (tap("two.0", transform), tap("two.1", transform))),
              ViewGroup("one", ("labeled", "unlabeled"), (tap("one.0", transform),))]
    cfg = data_config(all_sources(data), batch={"paired": 3, "labeled": 2, "unlabeled": 4}, shuffle_buffer=8)
    ds = MixedBatches(cfg, tap("shared", transform), tokenizer, seed=SEED, view_groups=groups)
    it = iter(ds)
    for _ in range(3):
        batch, _ = next(it)
    assert len(decoded) == 3 * 9 == len(seen["shared"]) and seen["shared"] == decoded
    assert batch.views["two"].shape[:2] == (2, 4) and batch.views["one"].shape[:2] == (1, 6)
    rows = [decoded[b * 9:(b + 1) * 9] for b in range(3)]  # per batch: paired 0-2, labeled 3-4, unlabeled 5-8
    assert seen["two.0"] == seen["two.1"] == [i for r in rows for i in r[5:]]
    assert seen["one.0"] == [i for r in rows for i in r[3:]]


def test_same_seed_same_batches_different_seed_different(data, clip):
    cfg = small_config(data)
    a = take(cfg, clip, 4, workers=2, seed=7)
    b = take(cfg, clip, 4, workers=2, seed=7)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    c = take(cfg, clip, 4, workers=2, seed=8)
    assert not any(torch.equal(x["image"], z["image"]) for x, z in zip(a, c))
    assert any(not torch.equal(x["text"], z["text"]) for x, z in zip(a, c))


@pytest.mark.parametrize("workers,resampled", [(0, True), (2, True), (2, False)])
def test_resume_fast_forward_continues_the_same_stream(data, clip, workers, resampled):
    cfg = small_config(data, resampled=resampled)
    fresh = take(cfg, clip, 8, workers=workers)
    resumed = take(cfg, clip, 5, workers=workers, start=3)
    for g, got in enumerate(resumed, start=3):
        for k in got:
            if k != "worker":  # the worker process that carries a stream may change on resume
                assert torch.equal(got[k], fresh[g][k]), (g, k)


def test_source_weights_within_a_kind(data, clip, tmp_path):
    _, tokenizer, _ = clip
    for name in ("alpha", "beta"):
        write_samples(({"__key__": f"{name}{i:03d}", "jpg": jpeg(grey(i), i), "txt": f"{name} {i}"} for i in range(8)),
                      tmp_path / name, maxcount=4)
    cfg = data_config([{"kind": "paired", "shards": f"{tmp_path}/alpha/*.tar", "weight": 3.0},
                       {"kind": "paired", "shards": f"{tmp_path}/beta/*.tar", "weight": 1.0}],
                      batch={"paired": 8}, shuffle_buffer=4)
    batches = take(cfg, clip, 50, workers=0)
    alpha, beta = (int(tokenizer([w])[0, 1]) for w in ("alpha", "beta"))
    first = torch.cat([b["text"][:, 1] for b in batches])
    assert set(first.tolist()) == {alpha, beta}
    frac = (first == alpha).float().mean().item()
    assert 0.68 < frac < 0.82, frac  # 3:1 -> 0.75 of 400 rows (sd 0.022)


@pytest.mark.parametrize("balance", ["none", "sqrt", "class"])
def test_long_tail_resampling(clip, tmp_path, balance):
    counts = [48, 12, 3, 1]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    np.random.default_rng(0).shuffle(labels)
    write_samples(({"__key__": f"t{i:03d}", "jpg": jpeg(grey(i), i, size=8), "cls": c} for i, c in enumerate(labels)),
                  tmp_path, maxcount=16)
    write_class_files(tmp_path, ["a", "b", "c", "d"], dict(enumerate(counts)))
    cfg = data_config([{"kind": "labeled", "shards": f"{tmp_path}/*.tar", "balance": balance}],
                      batch={"labeled": 8}, shuffle_buffer=16)
    batches = take(cfg, clip, 40, workers=0)
    got = np.bincount(torch.cat([b["label"] for b in batches]).numpy(), minlength=4) / 320
    power = {"none": 1.0, "sqrt": 0.5, "class": 0.0}[balance]
    want = np.array(counts, float) ** power
    want /= want.sum()
    assert np.abs(got - want).max() < 0.08, (balance, got.round(3), want.round(3))


# ---------------------------------------------------------------------------------------------- bad data


def cut_tar(path: Path) -> int:
    """Truncate a tar inside the data of the .jpg member that spans its middle; return how many samples stay whole."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    half = path.stat().st_size // 2
    target = next(m for m in members if m.offset_data + m.size > half and m.name.endswith(".jpg"))
    data = path.read_bytes()
    path.write_bytes(data[:target.offset_data + target.size // 2])
    return len({m.name.split(".")[0] for m in members if m.offset_data + m.size <= target.offset})


@pytest.fixture
def dirty(tmp_path) -> dict:
    good = {f"good{i}": f"a good caption {i}" for i in range(6)}
    samples = [{"__key__": k, "jpg": jpeg(grey(i), i), "txt": c} for i, (k, c) in enumerate(good.items())]
    samples += [
        {"__key__": "truncatedjpeg", "jpg": jpeg(seed=50)[:200], "txt": "half a jpeg"},
        {"__key__": "garbagejpeg", "jpg": b"this is not an image at all", "txt": "junk"},
        {"__key__": "nocaption", "jpg": jpeg(seed=51)},
        {"__key__": "notutf8", "jpg": jpeg(seed=52), "txt": b"caf\xe9 \xff\xfe"},
    ]
    write_samples(samples, tmp_path / "paired", prefix="good", maxcount=100)
    write_samples(({"__key__": f"cut{i}", "jpg": jpeg(grey(i), 60 + i), "txt": f"cut caption {i}"} for i in range(6)),
                  tmp_path / "paired", prefix="cut", maxcount=100)
    whole = cut_tar(tmp_path / "paired" / "cut-000000.tar")
    assert 0 < whole < 6
    labels = {f"lab{i}": i % 3 for i in range(6)}
    write_samples([{"__key__": k, "jpg": jpeg(COLOURS[c], 70 + i), "cls": c} for i, (k, c) in enumerate(labels.items())]
                  + [{"__key__": "outofrange", "jpg": jpeg(seed=80), "cls": 7}], tmp_path / "labeled", maxcount=100)
    write_class_files(tmp_path / "labeled", CLASSNAMES, Counter(labels.values()))
    return {"root": tmp_path, "good": good, "whole_cut": whole, "labels": labels}


def test_bad_samples_are_skipped_and_counted_per_source(dirty):
    root = dirty["root"]
    paired = Source(SourceConfig(name="p", kind="paired", shards=f"{root}/paired/*.tar"))
    recs = read_epoch(paired)
    keys = {key_of(r["key"]) for r in recs}
    cut_keys = {f"cut{i}" for i in range(dirty["whole_cut"])}
    # images are decoded (and found corrupt) later, by the mixer
    assert keys == set(dirty["good"]) | cut_keys | {"truncatedjpeg", "garbagejpeg"}
    assert paired.bad.counts["no caption"] == 1
    assert paired.bad.counts["caption not UTF-8"] == 1
    assert paired.bad.counts["unreadable tar"] >= 1
    assert set(paired.bad.counts) == {"no caption", "caption not UTF-8", "unreadable tar"}
    assert paired.bad.total == 2 + paired.bad.counts["unreadable tar"]

    labeled = Source(SourceConfig(name="l", kind="labeled", shards=f"{root}/labeled/*.tar"))
    recs = read_epoch(labeled)
    assert {key_of(r["key"]): r["label"] for r in recs} == dirty["labels"]
    assert dict(labeled.bad.counts) == {"label out of range": 1} and labeled.bad.total == 1


def test_batches_report_bad_samples_and_the_run_goes_on(dirty, clip):
    root = dirty["root"]
    cfg = data_config([{"name": "p", "kind": "paired", "shards": f"{root}/paired/*.tar"},
                       {"name": "l", "kind": "labeled", "shards": f"{root}/labeled/*.tar"}],
                      batch={"paired": 2, "labeled": 2}, shuffle_buffer=0, resampled=False)
    _, tokenizer, transform = clip
    ds = MixedBatches(cfg, transform, tokenizer, seed=SEED)
    it = iter(ds)  # in this process: the sources' counters are the ones the batches report
    inline = [flatten(*next(it)) for _ in range(14)]  # 28 paired rows: >= 2 epochs of the ~10 valid paired records
    p, l = ds.sources
    assert p.bad.counts["corrupt image"] >= 4  # 2 per epoch
    assert set(p.bad.counts) == {"corrupt image", "no caption", "caption not UTF-8", "unreadable tar"}
    assert p.bad.counts["no caption"] >= 2 and p.bad.counts["caption not UTF-8"] >= 2
    assert set(l.bad.counts) == {"label out of range"} and l.bad.counts["label out of range"] >= 2
    assert inline[-1]["bad"].tolist() == [p.bad.total, l.bad.total]
    totals = torch.stack([b["bad"] for b in inline])
    assert (totals[1:] >= totals[:-1]).all() and (totals[-1] > 0).all()
    for b in inline:
        assert b["image"].shape == (4, 3, IMAGE, IMAGE) and torch.isfinite(b["image"]).all()
        assert torch.equal(b["kind"], torch.tensor([0, 0, 1, 1]))
        assert b["has_text"].tolist() == [True, True, False, False]
        for row in (2, 3):
            assert dominant_channel(b["image"][row]) == int(b["label"][row])

    # the same stream in a real worker process reports the same counts through the `bad` tensor
    in_worker = take(cfg, clip, 14, workers=1)
    assert torch.equal(torch.stack([b["bad"] for b in in_worker]), totals)
    for x, y in zip(inline, in_worker):
        assert torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_after_corrupt_images_were_replaced(dirty, clip, workers):
    """A corrupt image is replaced by the next record, shifting its stream; the `taken` counts every batch
    carries (saved in checkpoints) let a resume skip exactly what was consumed."""
    root = dirty["root"]
    cfg = data_config([{"name": "p", "kind": "paired", "shards": f"{root}/paired/*.tar"}],
                      batch={"paired": 2}, shuffle_buffer=0, resampled=False)
    start = 9
    fresh = take(cfg, clip, start + 5, workers=workers)
    taken = {int(b["stream"]): b["taken"].tolist() for b in fresh[:start]}  # the latest per stream
    assert sum(t[0] for t in taken.values()) > 2 * start  # corrupt images were replaced before the resume point
    exact = take(cfg, clip, 5, workers=workers, start=start, start_taken=taken)
    for g, got in enumerate(exact, start=start):
        for k in got:
            if k not in ("worker", "bad"):  # bad: counted by each process from its start (the trainer adds them)
                assert torch.equal(got[k], fresh[g][k]), (g, k)
    # counting batches alone would have resumed one record early on the stream that met the corrupt images
    by_count = take(cfg, clip, 5, workers=workers, start=start)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(by_count, fresh[start:]))


def test_truncated_shard_never_lends_its_partial_sample_to_the_next_shard(tmp_path):
    """Two shards that reuse keys (per-shard counters); the first is cut inside its first sample's caption.

    webdataset drops its end-of-shard marker when a tar breaks off, so read as one stream the partial sample
    (image only) would take the next shard's caption of the same key. Each shard is read on its own instead.
    """
    for name, offset in (("x", 0), ("y", 120)):
        write_samples(({"__key__": f"k{i}", "jpg": jpeg((offset + 20 * i,) * 3, i), "txt": f"{name} {i}"}
                       for i in range(4)), tmp_path, prefix=name)
    x = tmp_path / "x-000000.tar"
    with tarfile.open(x) as tf:
        txt = tf.getmember("k0.txt")
    x.write_bytes(x.read_bytes()[:txt.offset_data + 1])  # k0.jpg whole, k0.txt cut short
    cfg = SourceConfig(kind="paired", shards=[str(x), str(tmp_path / "y-000000.tar")])
    orders = set()
    for seed in range(4):
        source = Source(cfg)
        recs = list(source.records(seed, resampled=False, epochs=1))
        orders.add(tuple(Path(u).name[0] for u in source.epoch_shards(0, seed, 0, 1, 0, 1)))
        assert len(recs) == 4
        for r in recs:
            i = int(key_of(r["key"])[1:])
            assert Path(r["key"]).parent.name == "y-000000.tar" and r["text"] == f"y {i}"
            assert np.asarray(Image.open(io.BytesIO(r["image"]))).mean() == pytest.approx(120 + 20 * i, abs=6)
        assert source.bad.counts["no caption"] == 1 and source.bad.counts["unreadable tar"] >= 1
    assert orders == {("x", "y"), ("y", "x")}  # both shard orders were exercised


@pytest.mark.parametrize("broken", ["not-a-tar", "zero-bytes", "empty-tar", "all-rejected"])
def test_a_source_with_no_usable_sample_is_an_error_not_an_endless_retry(tmp_path, broken):
    """#17: a resampled stream over shards that can never yield a record raised nothing and spun forever."""
    shard = tmp_path / "s-000000.tar"
    if broken == "not-a-tar":
        shard.write_bytes(b"this is not a tar archive" * 40)
    elif broken == "zero-bytes":
        shard.write_bytes(b"")
    elif broken == "empty-tar":
        tarfile.open(shard, "w").close()
    else:  # samples without the caption a paired source needs
        write_samples(({"__key__": f"k{i}", "jpg": jpeg((20 * i,) * 3, i)} for i in range(3)), tmp_path, prefix="s")
    source = Source(SourceConfig(name="broken", kind="paired", shards=[str(shard)]))
    with pytest.raises(RuntimeError, match="source broken: none of its 1 shard"):
        next(source.records(0, resampled=True, shuffle_buffer=10))
    good = tmp_path / "good"
    write_samples(({"__key__": f"k{i}", "jpg": jpeg((20 * i,) * 3, i), "txt": f"c {i}"} for i in range(2)), good,
                  prefix="g")
    mixed = Source(SourceConfig(name="half", kind="paired", shards=[str(shard), str(good / "g-000000.tar")]))
    recs = mixed.records(0, resampled=True, shuffle_buffer=0)
    assert all(next(recs)["text"].startswith("c ") for _ in range(20))  # one good shard keeps it alive


def test_all_images_corrupt_is_an_error_after_a_bounded_number_of_replacements(tmp_path, clip, monkeypatch):
    from vlp.data import mixing

    monkeypatch.setattr(mixing, "MAX_CORRUPT_IN_A_ROW", 25)
    write_samples(({"__key__": f"k{i}", "jpg": b"\xff\xd8 not really a jpeg", "txt": f"c {i}"} for i in range(5)),
                  tmp_path, prefix="bad")
    cfg = DataConfig(sources=[SourceConfig(name="junk", kind="paired", shards=str(tmp_path / "bad-000000.tar"))],
                     batch=BatchConfig(paired=2), workers=0)
    _, tok, _ = clip
    ds = MixedBatches(cfg, lambda im: torch.zeros(3, 8, 8), tok)
    with pytest.raises(RuntimeError, match="25 corrupt images in a row .*junk"):
        next(iter(ds))


# ---------------------------------------------------------------------------------------------- config errors


def run_tree(shards: str) -> dict:
    return {"data": {"sources": [{"kind": "paired", "shards": shards}], "batch": {"paired": 2}},
            "objectives": {"contrastive": {"weight": 1.0}}}


def one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_shards_fail_at_config_validation(data, tmp_path):
    good = f"{data['root']}/paired_txt/*.tar"
    assert config_from_dict(run_tree(good)).data.sources[0].kind == "paired"
    missing = f"{tmp_path}/nowhere-{{000..002}}.tar"
    with pytest.raises(ConfigError) as err:
        config_from_dict(run_tree(missing))
    assert one_line(err) == (f"data.sources[0].shards: no such shard '{tmp_path}/nowhere-000.tar' (and 2 more)")
    with pytest.raises(ConfigError) as err:
        config_from_dict(run_tree(f"{tmp_path}/empty/*.tar"))
    assert one_line(err).startswith("data.sources[0].shards: no file matches") and f"{tmp_path}/empty/*.tar" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_shards("eval.zeroshot.shards", f"{good}::{tmp_path}/gone.tar")
    assert one_line(err) == f"eval.zeroshot.shards: no such shard '{tmp_path}/gone.tar'"
    # #17 item 7: a '::' part whose glob matches nothing was dropped silently (half the data gone by a typo)
    with pytest.raises(ConfigError) as err:
        config_from_dict(run_tree(f"{good}::{tmp_path}/typo/*.tar"))
    assert one_line(err).startswith(f"data.sources[0].shards: no file matches '{tmp_path}/typo/*.tar' (one of")


def test_config_errors_name_the_key(data, tmp_path):
    good = f"{data['root']}/paired_txt/*.tar"

    tree = run_tree(good)
    tree["data"]["batch"]["pairs"] = 3
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert one_line(err) == "data.batch.pairs: unknown key"

    tree = run_tree(good)
    tree["data"]["workers"] = "two"
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert one_line(err).startswith("data.workers: ") and "'two'" in str(err.value)

    tree = run_tree(good)
    tree["data"]["sources"][0]["weight"] = "heavy"
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert one_line(err).startswith("data.sources[0].weight: ")

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_tree(good)))
    assert load_config(path, ["optim.lr=3e-4"]).optim.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.lr=fast"])
    msg = one_line(err)
    assert msg.startswith("optim.lr: ") and msg.endswith("(got 'fast')")


@pytest.mark.parametrize("key, value, expected", [
    ("data.scale", [1.5, 0.2], "data.scale: needs 0 < min <= max <= 1"),
    ("optim.betas", [2, 3], "optim.betas: each must be in [0, 1)"),
    ("data.templates", ["a photo of a cat."], "data.templates: every template needs {c}"),
    ("data.batch.paired", 1, "objectives.contrastive: 1 row with text per step gives no negatives"),
    ("model.mask_ratio", 0.0, "objectives.mae: model.mask_ratio is 0"),
])
def test_degenerate_settings_fail_as_one_line_naming_the_key(data, key, value, expected):
    """#17: these were tracebacks or silently accepted (a constant loss, nothing to reconstruct...)."""
    tree = run_tree(f"{data['root']}/paired_txt/*.tar")
    tree["objectives"]["mae"] = {"weight": 0.5}
    node = tree
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
    with pytest.raises(ConfigError) as err:
        config_from_dict(tree)
    assert one_line(err).startswith(expected), one_line(err)


def test_unwritable_output_dir_fails_before_any_work(data, tmp_path):
    """An output_dir that cannot take files (here under a regular file, which stops root too) is a config error."""
    from vlp.run_dir import check_writable as _check_writable

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="output_dir: .* is not writable"):
        _check_writable(blocker / "run")
    _check_writable(tmp_path / "fine" / "run")
    assert (tmp_path / "fine" / "run").is_dir() and not list((tmp_path / "fine" / "run").iterdir())


def test_label_parsing_rejects_what_int_cannot_read_instead_of_crashing():
    """#17: "²".isdigit() is true but int("²") raises; such a label is skipped and counted, never fatal."""
    from vlp.data.format import Rejected, parse_label

    names = ["a", "b", "c"]
    assert parse_label({"cls": b"2"}, names) == 2 and parse_label({"cls": b" 1 \n"}, names) == 1
    for raw, reason in ((b"\xc2\xb2", "unknown label"), (b"\xd9\xa3", "unknown label"), (b"-1", "label out of range"),
                        (b"7", "label out of range"), (b"\xff", "label not UTF-8")):
        got = parse_label({"cls": raw}, names)
        assert isinstance(got, Rejected) and got.reason == reason, (raw, got)
    assert parse_label({"cls": b"c"}, names) == 2


@pytest.mark.parametrize("kernel", [3, 5])
def test_fast_gaussian_blur_equals_torchvisions_on_pil_images(kernel):
    """views.GaussianBlur (PIL's native convolution on a reflect-padded copy) draws sigma from torch's RNG as
    torchvision's GaussianBlur does and gives its pixels, up to one level of rounding; the RNG stays in step."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from vlp.data.views import GaussianBlur

    rng = np.random.default_rng(kernel)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((32, 32), (16, 24), (7, 9))]
    images.append(images[0].convert("L"))
    ref, fast = T.GaussianBlur(kernel, sigma=(0.1, 2.0)), GaussianBlur(kernel, sigma=(0.1, 2.0))
    for img in images:
        torch.manual_seed(1)
        want, after_want = np.asarray(ref(img)).astype(int), torch.rand(1)
        torch.manual_seed(1)
        got, after_got = fast(img), torch.rand(1)
        assert got.size == img.size and got.mode == img.mode
        assert np.abs(np.asarray(got).astype(int) - want).max() <= 1
        assert torch.equal(after_want, after_got)
    blurred = np.asarray(fast(images[0])).astype(int)
    assert np.abs(blurred - np.asarray(images[0]).astype(int)).mean() > 1  # it does blur


def test_classnames_with_a_duplicate_or_an_interior_blank_line_are_refused(tmp_path):
    """A name on two lines merged two classes; a blank line shifted every later class (#30): both are an error
    naming the file and the lines; blank lines at the end are fine; a training source refuses such a file."""
    from vlp.data.format import ClassnamesError, load_classnames, read_classnames

    path = tmp_path / "classnames.txt"
    path.write_text("zero\none\ntwo\none\n")
    with pytest.raises(ClassnamesError, match="line 4 repeats line 2") as err:
        read_classnames(path)
    assert str(path) in str(err.value)
    path.write_text("zero\n\none\ntwo\n")
    with pytest.raises(ClassnamesError, match="line 2 is blank"):
        load_classnames([str(tmp_path / "a-000000.tar")])
    with pytest.raises(ClassnamesError, match="line 2 repeats line 1"):
        load_classnames([], ["cat", "cat "])
    path.write_text("zero\n one \ntwo\n\n\n")
    assert read_classnames(path) == ["zero", "one", "two"]
    path.write_text("zero\none\nzero\n")
    shard = write_samples([{"__key__": "a", "jpg": jpeg((10, 20, 30), 0), "cls": "0"}], tmp_path, prefix="a")[0]
    with pytest.raises(ClassnamesError, match="line 3 repeats line 1"):
        Source(SourceConfig(name="lab", kind="labeled", shards=[shard]))


def test_a_thin_image_is_a_counted_bad_sample_in_training_and_verify(clip, tmp_path):
    """A 1x20000 image is counted and replaced in training (its short side scaled to the model's input took GBs,
    #30) and flagged by vlp shards verify, before any resize."""
    from vlp.shards import verify_shards

    buf = io.BytesIO()
    Image.new("RGB", (20000, 1), (200, 10, 10)).save(buf, format="PNG")
    samples = [{"__key__": f"k{i}", "jpg": jpeg(COLOURS[i % 3], i), "cls": str(i % 3)} for i in range(4)]
    samples.insert(1, {"__key__": "thin", "png": buf.getvalue(), "cls": "0"})
    write_samples(samples, tmp_path / "lab", maxcount=100)
    write_class_files(tmp_path / "lab", CLASSNAMES, Counter({0: 2, 1: 2, 2: 1}))
    cfg = data_config([{"name": "l", "kind": "labeled", "shards": f"{tmp_path}/lab/*.tar"}],
                      batch={"labeled": 4}, shuffle_buffer=0, resampled=False)
    _, tokenizer, transform = clip
    ds = MixedBatches(cfg, transform, tokenizer, seed=SEED)
    batch = flatten(*next(iter(ds)))
    assert ds.sources[0].bad.counts["corrupt image"] == 1 and batch["image"].shape == (4, 3, IMAGE, IMAGE)
    result = verify_shards(str(tmp_path / "lab"), kind="labeled")
    assert result["reasons"] == {"corrupt image": 1} and any("too thin" in r for _, _, r in result["bad_samples"])


def test_jpegs_are_decoded_at_the_reduced_scale_the_crops_allow(tmp_path):
    """#29: decode_side is the short side every crop still gets its output pixels from; decode_image(min_side)
    decodes a JPEG at the smallest libjpeg scale keeping both sides >= it (Pillow draft), PNGs whole; the cropped
    output stays close to the one from the full decode."""
    import io
    import math

    import numpy as np
    from PIL import Image
    from torchvision import transforms as T

    from vlp.data.format import decode_image
    from vlp.data.transforms import decode_side

    crop = T.Compose([T.RandomResizedCrop(64, scale=(0.5, 1.0)), T.ToTensor()])
    assert decode_side([crop]) == math.ceil(64 / math.sqrt(0.5 * 0.75)) == 105
    resize = T.Compose([T.Resize(48), T.CenterCrop(48), T.ToTensor()])
    assert decode_side([crop, resize]) == 105 and decode_side([resize]) == 48
    assert decode_side([T.Compose([T.CenterCrop(64), T.ToTensor()])]) is None  # unknown geometry: decode whole
    assert decode_side([crop, T.Compose([T.RandomCrop(64)])]) is None

    yy, xx = np.mgrid[0:480, 0:640]
    pixels = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(pixels).resize((80, 60)).resize((640, 480), Image.BILINEAR))
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(smooth).save(jpeg, "JPEG", quality=95)
    Image.fromarray(smooth).save(png, "PNG")
    assert decode_image(jpeg.getvalue()).size == (640, 480)
    assert decode_image(jpeg.getvalue(), 105).size == (160, 120)  # 1/4: both sides >= 105; 1/8 would be 60 high
    assert decode_image(jpeg.getvalue(), 300).size == (640, 480)  # 1/2 would be 240 high
    assert decode_image(png.getvalue(), 105).size == (640, 480)
    full = T.functional.resize(T.functional.to_tensor(decode_image(jpeg.getvalue())), [48, 64], antialias=True)
    reduced = T.functional.resize(T.functional.to_tensor(decode_image(jpeg.getvalue(), 105)), [48, 64], antialias=True)
    assert (full - reduced).abs().mean() < 0.02


def test_the_mixer_decodes_at_what_its_transform_and_views_need(data, clip):
    """data.draft_decode: the mixer's decode side covers the base transform and every view (the largest need);
    off, JPEGs decode whole."""
    from torchvision import transforms as T

    from vlp.data.batch import ViewGroup
    from vlp.data.transforms import decode_side

    _, tokenizer, transform = clip
    wide = T.Compose([T.RandomResizedCrop(32, scale=(0.05, 0.4)), T.ToTensor()])  # a small local crop needs more
    cfg = data_config(all_sources(data), batch={"paired": 2, "labeled": 2, "unlabeled": 2})
    assert MixedBatches(cfg, transform, tokenizer).decode_side == decode_side([transform]) == 53
    ds = MixedBatches(cfg, transform, tokenizer, view_groups=[ViewGroup("local", ("unlabeled",), (wide,))])
    assert ds.decode_side == decode_side([wide]) == 166
    off = data_config(all_sources(data), batch={"paired": 2, "labeled": 2, "unlabeled": 2}, draft_decode=False)
    assert MixedBatches(off, transform, tokenizer).decode_side is None
