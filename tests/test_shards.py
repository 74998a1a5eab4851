"""vlp.shards: real images -> real shards -> read back with webdataset; inspect, verify, CLI; one format with training."""
import os
import tarfile

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from vlp import shards as S
from vlp.data.format import expand_shards

# class -> dominant colour channel; "digit" images are grey (sklearn digits)
COLOURS = {"ant": (220, 20, 20), "cat": (20, 200, 20), "zebra": (20, 20, 220)}
CLASSNAMES = ["ant", "cat", "digit", "zebra"]


def _gradient(colour, size=16, seed=0):
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float32)
    ramp = np.linspace(-10, 10, size, dtype=np.float32)[None, :, None]
    arr = np.clip(base + ramp + rng.normal(0, 2, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _digits(n):
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]  # 8x8, values 0..16
    return [Image.fromarray((img * 15).astype(np.uint8), "L").resize((16, 16)) for img in images]


def _class_of_pixels(jpg_bytes):
    """Recover the class from a decoded image: grey -> digit, else the dominant channel."""
    arr = np.asarray(Image.open(io.BytesIO(jpg_bytes)).convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    if arr.max() - arr.min() < 25:
        return "digit"
    return {0: "ant", 1: "cat", 2: "zebra"}[int(arr.argmax())]


def _read(spec):
    """Every sample of the shards, via a real webdataset pipeline."""
    urls = expand_shards(spec)
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageFolder with 4 classes created out of alphabetical order, mixed formats, one junk file per kind."""
    root = tmp_path_factory.mktemp("folder") / "imgs"
    counts = {"zebra": 5, "ant": 4, "cat": 6, "digit": 3}
    formats = ["jpg", "png", "webp", "bmp", "jpeg", "PNG"]
    for cls in ["zebra", "ant", "cat", "digit"]:
        (root / cls).mkdir(parents=True)
        images = _digits(counts[cls]) if cls == "digit" else [
            _gradient(COLOURS[cls], seed=i) for i in range(counts[cls])
        ]
        for i, img in enumerate(images):
            ext = formats[i % len(formats)]
            if ext.lower() == "png" and cls == "ant":
                img = img.convert("RGBA")  # alpha gets flattened
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP"}[ext.lower()]
            img.save(root / cls / f"{cls}_{i}.{ext}", format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "readme.md").write_text("top-level files are not classes")
    return root, counts


def test_write_samples_shards_sizes_and_roundtrip(tmp_path):
    samples = [
        {"__key__": f"{i:04d}", "jpg": S.image_to_jpeg_bytes(_gradient((i * 9, 100, 50))), "cls": str(i % 3), "txt": f"ü {i}"}
        for i in range(25)
    ]
    out = tmp_path / "ds"
    shards = S.write_samples(samples, out, prefix="train", maxcount=10)
    assert [Path(s).name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 5}
    back = _read(str(out / "train-{000000..000002}.tar"))
    assert [s["__key__"] for s in back] == [s["__key__"] for s in samples]
    for got, want in zip(back, samples):
        assert got["jpg"] == want["jpg"]
        assert got["cls"] == want["cls"].encode()
        assert got["txt"].decode("utf-8") == want["txt"]

    # a second prefix shares sizes.json; rewriting a prefix drops its stale shards and entries
    S.write_samples(samples[:3], out, prefix="val", maxcount=10)
    S.write_samples(samples[:12], out, prefix="train", maxcount=10)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "val-000000.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {
        "train-000000.tar": 10, "train-000001.tar": 2, "val-000000.tar": 3}

    assert S.write_samples([], tmp_path / "empty") == []
    with pytest.raises(ValueError, match="must not contain"):
        S.write_samples([{"__key__": "a.b", "txt": "x"}], tmp_path / "bad")
    with pytest.raises(ValueError, match="duplicate"):
        S.write_samples([{"__key__": "a", "txt": "x"}, {"__key__": "a", "txt": "y"}], tmp_path / "bad")


def test_image_to_jpeg_bytes_keeps_jpeg_and_converts_others(tmp_path):
    img = _gradient((10, 200, 30))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    assert S.image_to_jpeg_bytes(buf.getvalue()) == buf.getvalue()
    rgba = img.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white background
    png = io.BytesIO()
    rgba.save(png, format="PNG")
    out = S.image_to_jpeg_bytes(png.getvalue())
    assert out[:3] == b"\xff\xd8\xff"
    decoded = Image.open(io.BytesIO(out))
    assert decoded.format == "JPEG" and decoded.mode == "RGB" and decoded.size == (16, 16)
    assert np.asarray(decoded).min() > 240
    with pytest.raises(Exception):
        S.image_to_jpeg_bytes(b"definitely not an image")


def test_write_image_folder_labeled(image_folder, tmp_path):
    root, counts = image_folder
    out = tmp_path / "labeled"
    result = S.write_image_folder(root, out, kind="labeled", prefix="ds", maxcount=5)
    total = sum(counts.values())
    assert result["num_samples"] == total and result["num_skipped"] == 0
    assert result["classnames"] == CLASSNAMES
    assert (out / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert json.loads((out / "class_counts.json").read_text()) == {
        str(i): counts[name] for i, name in enumerate(CLASSNAMES)}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sum(sizes.values()) == total and len(sizes) == len(result["shards"]) == 4
    assert set(sizes) == {Path(s).name for s in result["shards"]}

    back = _read(str(out))
    assert len(back) == total
    assert len({s["__key__"] for s in back}) == total
    for sample in back:
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"jpg", "cls"}
        assert sample["jpg"][:3] == b"\xff\xd8\xff"
        assert CLASSNAMES[int(sample["cls"])] == _class_of_pixels(sample["jpg"])
    # JPEG inputs keep their original bytes
    originals = {p.read_bytes() for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")}
    assert originals and originals <= {s["jpg"] for s in back}
    # shuffled with a fixed seed: the first shard mixes classes, and the output is reproducible
    first = [s for s in back if s["__url__"].endswith("ds-000000.tar")]
    assert len({s["cls"] for s in first}) > 1
    again = S.write_image_folder(root, tmp_path / "again", prefix="ds", maxcount=5)
    for a, b in zip(result["shards"], again["shards"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()


def test_write_image_folder_unlabeled_and_skips(image_folder, tmp_path):
    root, counts = image_folder
    src = tmp_path / "src"
    shutil.copytree(root, src)
    (src / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    _gradient((1, 2, 3)).save(src / "loose.png")  # unlabeled takes images at any depth
    out = tmp_path / "unlabeled"
    result = S.write_image_folder(src, out, kind="unlabeled", maxcount=100)
    assert result["num_samples"] == sum(counts.values()) + 1
    assert result["num_skipped"] == 1 and result["skipped"][0][0].endswith("broken.jpg")
    assert "classnames" not in result
    assert not (out / "classnames.txt").exists() and not (out / "class_counts.json").exists()
    back = _read(str(out / "shard-000000.tar"))
    assert len(back) == result["num_samples"]
    assert all(set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg"} for s in back)
    assert json.loads((out / "sizes.json").read_text()) == {"shard-000000.tar": result["num_samples"]}
    with pytest.raises(ValueError):
        S.write_image_folder(src, out, kind="paired")


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_write_captions(fmt, tmp_path):
    import pandas as pd

    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rows = []
    for i in range(7):
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        _gradient((30 * i, 100, 200 - 20 * i), seed=i).save(img_dir / name)
        rows.append({"filepath": f"images/{name}", "text": f"a photo, number {i} — «ünïcode» \"quoted\""})
    rows.append({"filepath": "images/missing.jpg", "text": "gone"})
    rows[2]["filepath"] = str(img_dir / "img2.jpg")  # absolute paths work too
    df = pd.DataFrame(rows)
    table = tmp_path / f"captions.{fmt}"
    if fmt == "csv":
        df.to_csv(table, index=False)
    elif fmt == "tsv":
        df.to_csv(table, sep="\t", index=False)
    else:
        df.to_parquet(table, index=False)

    out = tmp_path / "paired"
    result = S.write_captions(table, out, image_col="filepath", caption_col="text", maxcount=3)
    assert result["kind"] == "paired" and result["num_samples"] == 7
    assert result["num_skipped"] == 1
    assert result["skipped"][0][0].endswith("missing.jpg") and "missing" in result["skipped"][0][1]
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == 7
    assert len(result["shards"]) == 3

    back = _read(str(out))
    assert [s["txt"].decode("utf-8") for s in back] == [r["text"] for r in rows[:7]]
    for sample, row in zip(back, rows):
        meta = json.loads(sample["json"].decode("utf-8"))
        assert meta == {"caption": row["text"], "key": sample["__key__"], "status": "success",
                        "url": str(img_dir / Path(row["filepath"]).name)}
        assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
        assert "cls" not in sample

    # image_root instead of the table's folder
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(table, moved / table.name)
    result = S.write_captions(moved / table.name, tmp_path / "paired2", image_col="filepath",
                              caption_col="text", image_root=tmp_path)
    assert result["num_samples"] == 7
    with pytest.raises(KeyError, match="caption"):
        S.write_captions(table, tmp_path / "x", image_col="filepath")


@pytest.fixture(scope="module")
def hf_dataset(tmp_path_factory):
    import datasets

    labels = [0, 2, 1, 2, 0, 1, 2, 2]
    names = ["ant", "cat", "zebra"]
    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=names),
        "caption": datasets.Value("string"),
    })
    ds = datasets.Dataset.from_dict(
        {
            "image": [_gradient(COLOURS[names[y]], seed=i) for i, y in enumerate(labels)],
            "label": labels,
            "caption": [f"a {names[y]} number {i}" for i, y in enumerate(labels)],
        },
        features=features,
    )
    path = tmp_path_factory.mktemp("hf") / "ds"
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(path))
    return path, ds, labels, names


def test_write_hf_dataset_labeled_from_disk(hf_dataset, tmp_path):
    path, _, labels, names = hf_dataset
    with pytest.raises(ValueError, match="split"):
        S.write_hf_dataset(path, tmp_path / "x", label_col="label")
    out = tmp_path / "hf_labeled"
    result = S.write_hf_dataset(path, out, split="train", label_col="label", maxcount=3)
    assert result["num_samples"] == len(labels) and result["classnames"] == names
    assert (out / "classnames.txt").read_text().splitlines() == names
    assert json.loads((out / "class_counts.json").read_text()) == {
        str(i): labels.count(i) for i in range(len(names))}
    assert sum(json.loads((out / "sizes.json").read_text()).values()) == len(labels)
    back = _read(str(out))
    assert len(back) == len(labels)
    assert sorted(int(s["cls"]) for s in back) == sorted(labels)
    for sample in back:
        assert names[int(sample["cls"])] == _class_of_pixels(sample["jpg"])

    test = S.write_hf_dataset(path, tmp_path / "hf_test", split="test", label_col="label")
    assert test["num_samples"] == 3


def test_write_hf_dataset_paired_and_unlabeled(hf_dataset, tmp_path):
    _, ds, labels, names = hf_dataset
    out = tmp_path / "hf_paired"
    result = S.write_hf_dataset(ds, out, caption_col="caption", shuffle_seed=None)
    assert result["kind"] == "paired" and result["num_samples"] == len(labels)
    back = _read(str(out))
    assert [s["txt"].decode() for s in back] == ds["caption"]
    for sample in back:
        meta = json.loads(sample["json"])
        assert meta["caption"] == sample["txt"].decode() and meta["key"] == sample["__key__"]
        assert meta["status"] == "success"
        # the caption names the class the pixels show
        assert sample["txt"].decode().split()[1] == _class_of_pixels(sample["jpg"])

    unl = S.write_hf_dataset(ds, tmp_path / "hf_unl")
    assert unl["kind"] == "unlabeled" and unl["num_samples"] == len(labels)
    assert all("cls" not in s and "txt" not in s for s in _read(str(tmp_path / "hf_unl")))

    # string labels without a ClassLabel: sorted distinct names
    strs = ds.remove_columns("label").add_column("name", [names[y] for y in labels])
    res = S.write_hf_dataset(strs, tmp_path / "hf_str", label_col="name")
    assert res["classnames"] == sorted(set(names))
    for sample in _read(str(tmp_path / "hf_str")):
        assert res["classnames"][int(sample["cls"])] == _class_of_pixels(sample["jpg"])


def test_inspect_shards(image_folder, tmp_path):
    root, counts = image_folder
    S.write_image_folder(root, tmp_path / "a", prefix="a", maxcount=5)
    paired = [{"__key__": f"{i:03d}", "jpg": S.image_to_jpeg_bytes(_gradient((9, 9, 9))), "txt": f"cap {i}",
               "json": json.dumps({"caption": f"cap {i}"})} for i in range(4)]
    S.write_samples(paired, tmp_path / "b", prefix="b", maxcount=2)
    total = sum(counts.values())

    info = S.inspect_shards(str(tmp_path / "a" / "a-{000000..000003}.tar"), n_preview=2)
    assert info["num_shards"] == 4 and info["num_samples"] == total
    assert info["keys"] == {"cls": total, "jpg": total}
    assert info["sizes_json_total"] == total and info["num_classes"] == 4
    assert len(info["preview"]) == 2
    assert info["preview"][0]["keys"] == ["cls", "jpg"] and info["preview"][0]["image_size"] == [16, 16]
    assert info["preview"][0]["cls"] in {"0", "1", "2", "3"}

    spec = str(tmp_path / "a" / "a-{000000..000003}.tar") + "::" + str(tmp_path / "b" / "b-{000000..000001}.tar")
    info = S.inspect_shards(spec, n_preview=100)
    assert info["num_shards"] == 6 and info["num_samples"] == total + 4
    assert info["keys"] == {"cls": total, "jpg": total + 4, "txt": 4, "json": 4}
    assert info["sizes_json_total"] == total + 4
    assert [p["caption"] for p in info["preview"] if "caption" in p] == [f"cap {i}" for i in range(4)]
    assert info["errors"] == []


def test_verify_reports_bad_samples_and_truncated_tar(tmp_path):
    good = S.image_to_jpeg_bytes(_gradient((200, 100, 0), size=64, seed=3))
    samples = [{"__key__": f"{i:03d}", "jpg": good, "cls": str(i % 2)} for i in range(10)]
    samples[3]["jpg"] = b"\xff\xd8\xff\xe0 this is garbage, not a JPEG" * 4
    samples[6]["cls"] = "seven"
    samples[8] = {"__key__": "008", "jpg": good, "txt": b"\xff\xfe\xfa not utf-8"}
    out = tmp_path / "v"
    S.write_samples(samples, out, maxcount=5)
    result = S.verify_shards(str(out / "shard-{000000..000001}.tar"))
    assert (result["total"], result["ok"], result["bad"], result["shard_errors"]) == (10, 7, 3, 0)
    assert not result["clean"]
    bad = {key: reason for _, key, reason in result["bad_samples"]}
    assert set(bad) == {"003", "006", "008"}
    # judged as the labeled dataset it is (as training reads it): 008 has no cls, and its txt is no class name
    assert "undecodable image" in bad["003"] and "cls" in bad["006"] and bad["008"].startswith("no label")
    assert all(Path(shard).name == ("shard-000000.tar" if key == "003" else "shard-000001.tar")
               for shard, key, _ in result["bad_samples"])

    clean = S.write_samples([{"__key__": f"{i:03d}", "jpg": good, "cls": "1"} for i in range(8)],
                            tmp_path / "c", maxcount=4)
    assert S.verify_shards(str(tmp_path / "c"))["clean"]
    # a truncated copy (cut in half) is reported with counts, not raised
    broken = tmp_path / "c" / "shard-000002.tar"
    data = Path(clean[0]).read_bytes()
    with tarfile.open(clean[0]) as tar:  # cut inside the data of a member of the last sample
        last = [m for m in tar.getmembers() if m.name.startswith("003.")][0]
    broken.write_bytes(data[: last.offset_data + last.size // 2])
    result = S.verify_shards(str(tmp_path / "c" / "shard-{000000..000002}.tar"))
    assert result["shard_errors"] >= 1 and not result["clean"]
    assert 8 <= result["total"] < 12 and result["ok"] + result["bad"] == result["total"]
    shard_problems = [(Path(s).name, r) for s, k, r in result["bad_samples"] if k is None]
    assert shard_problems and all(name == "shard-000002.tar" for name, _ in shard_problems)
    # a truncated shard listed in sizes.json is also caught by the count mismatch; missing shards too
    Path(clean[1]).write_bytes(Path(clean[1]).read_bytes()[:2048])
    result = S.verify_shards(str(tmp_path / "c" / "shard-000001.tar") + "::" + str(tmp_path / "nope.tar"))
    reasons = [r for _, k, r in result["bad_samples"] if k is None]
    assert any("sizes.json lists 4" in r for r in reasons)
    assert any("nope.tar" in s for s, _, _ in result["bad_samples"])


def _cli(argv):
    parser = argparse.ArgumentParser(prog="vlp")
    sub = parser.add_subparsers(dest="command")
    S.register_cli(sub)
    args = parser.parse_args(argv)
    assert args.command == "shards"
    return args.func(args)


def test_cli(image_folder, hf_dataset, tmp_path, capsys):
    root, counts = image_folder
    total = sum(counts.values())
    out = tmp_path / "cli"
    assert _cli(["shards", "folder", str(root), str(out), "--prefix", "f", "--maxcount", "7"]) == 0
    assert f"wrote {total} labeled samples in 3 shard(s)" in capsys.readouterr().out
    assert (out / "classnames.txt").read_text().splitlines() == CLASSNAMES

    assert _cli(["shards", "inspect", str(out / "f-{000000..000002}.tar")]) == 0
    text = capsys.readouterr().out
    assert f"samples: {total} (sizes.json: {total})" in text and "classes: 4" in text
    assert _cli(["shards", "inspect", "--json", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["num_samples"] == total

    assert _cli(["shards", "verify", str(out)]) == 0
    assert f"samples: {total}  ok: {total}  bad: 0" in capsys.readouterr().out

    (tmp_path / "pics").mkdir()
    _gradient((1, 2, 3)).save(tmp_path / "pics" / "x.png")
    (tmp_path / "t.csv").write_text("path,cap\npics/x.png,hello there\npics/y.png,missing\n")
    assert _cli(["shards", "captions", str(tmp_path / "t.csv"), str(tmp_path / "cap"),
                 "--image-col", "path", "--caption-col", "cap"]) == 0
    text = capsys.readouterr().out
    assert "wrote 1 paired samples" in text and "skipped 1" in text and "missing image file" in text
    assert _read(str(tmp_path / "cap"))[0]["txt"] == b"hello there"

    hf_path, _, labels, names = hf_dataset
    assert _cli(["shards", "hf", str(hf_path), str(tmp_path / "hf"), "--split", "train",
                 "--label-col", "label"]) == 0
    assert f"wrote {len(labels)} labeled samples" in capsys.readouterr().out
    assert (tmp_path / "hf" / "classnames.txt").read_text().splitlines() == names

    S.write_samples([{"__key__": "0", "jpg": b"junk", "cls": "1"}], tmp_path / "bad")
    assert _cli(["shards", "verify", str(tmp_path / "bad")]) == 1
    text = capsys.readouterr().out
    assert "bad: 1" in text and "undecodable image" in text

    assert _cli(["shards", "folder", str(tmp_path / "nothing-here"), str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["shards"])


# ---------------------------------------------------------------------------------------------- one format with training


def _train_read(spec, kind):
    """A training source's records for one epoch, and the source (its `bad` counter)."""
    from vlp.config import SourceConfig
    from vlp.data.sources import Source

    source = Source(SourceConfig(kind=kind, shards=spec))
    return list(source.records(0, resampled=False, epochs=1)), source


def test_verify_and_training_agree_on_image_keys(tmp_path):
    import torch

    from vlp.data.format import decode_image  # what the mixer decodes batches with
    from vlp.eval.data import labeled_loader

    buf = io.BytesIO()
    _gradient(COLOURS["ant"]).save(buf, format="BMP")
    bmp = buf.getvalue()
    assert bmp[:2] == b"BM"
    S.write_samples([{"__key__": "0", "bmp": bmp, "cls": "1"}], tmp_path / "bmp")
    S.write_class_files(tmp_path / "bmp", ["ant", "cat"], {1: 1})
    spec = str(tmp_path / "bmp")

    for kind in ("labeled", None):
        result = S.verify_shards(spec, kind=kind)
        assert (result["ok"], result["bad"], result["reasons"], result["clean"]) == (1, 0, {}, True)
    records, source = _train_read(spec, "labeled")
    assert source.bad.total == 0 and [(r["image"], r["label"]) for r in records] == [(bmp, 1)]
    image = decode_image(records[0]["image"])
    assert image.size == (16, 16) and int(np.asarray(image, np.float32).reshape(-1, 3).mean(0).argmax()) == 0
    # evaluation reads the same key list
    batches = list(labeled_loader(spec, lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)))
    assert batches[0][0].shape == (1, 3, 16, 16) and batches[0][1].tolist() == [1]

    # an image under a key outside IMAGE_KEYS: both skip it, for the same reason
    assert "img" not in S.IMAGE_KEYS
    S.write_samples([{"__key__": "0", "img": bmp, "cls": "1"}], tmp_path / "odd")
    result = S.verify_shards(str(tmp_path / "odd"), kind="labeled")
    assert (result["ok"], result["bad"], result["reasons"]) == (0, 1, {"no image": 1})
    assert result["bad_samples"][0][2].startswith("no image")
    records, source = _train_read(str(tmp_path / "odd"), "labeled")
    assert records == [] and dict(source.bad.counts) == {"no image": 1}


def test_verify_counts_bad_samples_by_trainings_reasons(tmp_path, capsys):
    jpg = S.image_to_jpeg_bytes(_gradient((90, 90, 90)))
    paired = [
        {"txt": "a good caption"},
        {"json": json.dumps({"caption": " from img2dataset "})},
        {},  # no caption
        {"txt": "   "},  # empty caption
        {"json": json.dumps({"caption": None})},  # empty caption
        {"txt": b"caf\xe9 \xff"},  # caption not UTF-8
        {"json": b"[1, 2]"},  # bad caption json
    ]
    labeled = [
        {"cls": "1"},
        {"cls": "blue"},  # a class name in cls
        {"txt": "green"},  # a class name in txt (class names are known)
        {"cls": "purple"},  # unknown label
        {"cls": "7"},  # label out of range
        {"cls": "-1"},  # label out of range
        {},  # no label
        {"cls": b"\xff"},  # label not UTF-8
    ]
    written = {}
    for kind, extras in (("paired", paired), ("labeled", labeled)):
        samples = [{"__key__": f"{kind}{i}", "jpg": jpg, **extra} for i, extra in enumerate(extras)]
        samples.append({"__key__": f"{kind}noimage", "txt": "an image-less caption", "cls": "0"})
        S.write_samples(samples, tmp_path / kind, maxcount=3)
        written[kind] = {s["__key__"] for s in samples}
    S.write_class_files(tmp_path / "labeled", ["red", "green", "blue"], {})

    for kind, n_ok in (("paired", 2), ("labeled", 3)):
        spec = str(tmp_path / kind)
        result = S.verify_shards(spec, kind=kind)
        records, source = _train_read(spec, kind)
        assert result["reasons"] == dict(source.bad.counts) and sum(result["reasons"].values()) == result["bad"]
        assert result["ok"] == len(records) == n_ok and result["shard_errors"] == 0
        skipped = {key for _, key, _ in result["bad_samples"]}
        assert {r["key"].rsplit("/", 1)[1] for r in records} == written[kind] - skipped
    assert result["reasons"] == {"label not UTF-8": 1, "label out of range": 2, "no image": 1, "no label": 1,
                                 "unknown label": 1}
    assert [r["label"] for r in records] == [1, 2, 1] and [r["text"] for r in _train_read(
        str(tmp_path / "paired"), "paired")[0]] == ["a good caption", "from img2dataset"]
    assert S.verify_shards(str(tmp_path / "paired"), kind="paired")["reasons"] == {
        "bad caption json": 1, "caption not UTF-8": 1, "empty caption": 2, "no caption": 1, "no image": 1}

    assert _cli(["shards", "verify", str(tmp_path / "labeled"), "--kind", "labeled"]) == 1
    text = capsys.readouterr().out
    assert "bad: 6" in text and "label out of range=2" in text and "cls 'purple'" in text


def test_verify_without_kind_judges_the_dataset_as_training_reads_it(tmp_path):
    """#17 item 7: without --kind, a captioned dataset's sample with no caption was guessed 'unlabeled' and
    passed, while training (a paired source) skips it."""
    jpg = S.image_to_jpeg_bytes(_gradient((90, 90, 90)))
    extras = [{"txt": "a caption"}, {}, {"txt": "  "}, {"json": json.dumps({"caption": "from img2dataset"})}]
    S.write_samples([{"__key__": f"p{i}", "jpg": jpg, **e} for i, e in enumerate(extras)], tmp_path / "p")
    result = S.verify_shards(str(tmp_path / "p"))
    records, source = _train_read(str(tmp_path / "p"), "paired")
    assert (result["kind"], result["kind_guessed"]) == ("paired", True)
    assert result["reasons"] == dict(source.bad.counts) == {"no caption": 1, "empty caption": 1}
    assert result["ok"] == len(records) == 2


def test_duplicate_or_blank_class_names_fail_verify_and_are_never_written(image_folder, hf_dataset, tmp_path):
    """classnames.txt with a name on two lines or a blank line inside: ``vlp shards verify`` fails naming the file
    and lines (it said all was well, #30); the writers refuse such a list before writing any shard."""
    import subprocess
    import sys

    data = tmp_path / "lab"
    S.write_samples([{"__key__": f"k{i}", "jpg": S.image_to_jpeg_bytes(_gradient((i * 9, 100, 50))),
                     "cls": str(i)} for i in range(3)], data, prefix="l")
    for text, expected in (("ant\ncat\nant\n", "line 3 repeats line 1"), ("ant\n\ncat\nzebra\n", "line 2 is blank")):
        (data / "classnames.txt").write_text(text)
        proc = subprocess.run([sys.executable, "-m", "vlp.cli", "shards", "verify", str(data)], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
        assert proc.returncode != 0 and expected in proc.stderr and str(data / "classnames.txt") in proc.stderr
        assert S.verify_shards(str(data), classnames=["ant", "cat", "zebra"])["clean"]  # a good list: clean

    root, _ = image_folder
    twin = tmp_path / "twin"
    shutil.copytree(root, twin)
    shutil.copytree(twin / "cat", twin / "cat ")  # reads back as a second "cat"
    assert _cli(["shards", "folder", str(twin), str(tmp_path / "twin-out")]) == 2
    assert not (tmp_path / "twin-out").exists() or not list((tmp_path / "twin-out").glob("*"))
    path, _, _, names = hf_dataset
    with pytest.raises(S.ClassnamesError, match="line 2 repeats line 1"):
        S.write_hf_dataset(path, tmp_path / "hf-out", split="train", label_col="label",
                           classnames=[names[0]] * len(names))
    assert not (tmp_path / "hf-out").exists() or not list((tmp_path / "hf-out").glob("*"))
    with pytest.raises(S.ClassnamesError):
        S.write_class_files(tmp_path / "hf-out", ["a", "b", "a"], {})


def test_ctrl_c_during_shards_folder_leaves_the_old_dataset_whole(image_folder, tmp_path):
    """SIGINT to the process group of ``vlp shards folder`` rewriting a dataset, once its first new shard is on
    disk: the old shards, sizes.json and class files are as they were, no staging folder is left (#30: the old
    shards were deleted up front). The run is held before its swap by a FIFO posing as its last image."""
    import signal
    import subprocess
    import sys
    import time

    root, _ = image_folder
    old_root = tmp_path / "old-imgs"
    for cls in ("ant", "cat"):
        shutil.copytree(root / cls, old_root / cls)
    out = tmp_path / "ds"
    S.write_image_folder(old_root, out, maxcount=2)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "classnames.txt" in before and "sizes.json" in before and len(before) > 4

    new_root = tmp_path / "new-imgs"
    shutil.copytree(root, new_root)
    os.mkfifo(new_root / "zebra" / "zz-last.png")  # opening it blocks until someone writes: the run waits there
    proc = subprocess.Popen([sys.executable, "-m", "vlp.cli", "shards", "folder", str(new_root), str(out),
                             "--maxcount", "1", "--seed", "-1"], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        def first_new_shard_on_disk():  # staged, or (a writer without staging) written over the old one
            old_first = out / "shard-000000.tar"
            return (out / ".shard.writing" / "shard-000000.tar").exists() or \
                not old_first.exists() or old_first.read_bytes() != before["shard-000000.tar"]

        deadline = time.monotonic() + 120  # only a failing run gets there: the FIFO holds it until signalled
        while not first_new_shard_on_disk() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first_new_shard_on_disk() and proc.poll() is None
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder, nothing changed
    assert proc.returncode == 130 and "interrupted" in err

    (new_root / "zebra" / "zz-last.png").unlink()
    result = S.write_image_folder(new_root, out, maxcount=5)  # a complete rewrite replaces the dataset whole
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(Path(s).name for s in result["shards"])
    assert json.loads((out / "sizes.json").read_text()) == {Path(s).name: n for s, n in zip(
        result["shards"], [5] * (len(result["shards"]) - 1) + [result["num_samples"] % 5 or 5])}
    assert (out / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert not (out / ".shard.writing").exists()


def test_writers_skip_a_thin_image_before_resizing_it(tmp_path):
    """A 1x20000 image (training skips it, and resizing its short side to --image-size takes GBs, #30) is listed
    as skipped by the writers, not resized."""
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    _gradient(COLOURS["cat"]).save(root / "cat" / "ok.png")
    Image.new("RGB", (1, 20000), (1, 2, 3)).save(root / "cat" / "thin.png")
    result = S.write_image_folder(root, tmp_path / "out", image_size=64, resize_mode="keep_ratio")
    assert result["num_samples"] == 1 and len(result["skipped"]) == 1
    assert result["skipped"][0][0].endswith("thin.png") and "too thin: 1x20000" in result["skipped"][0][1]
