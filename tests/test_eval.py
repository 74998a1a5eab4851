import os

os.environ["HF_HUB_OFFLINE"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import tarfile  # noqa: E402
from contextlib import redirect_stderr, redirect_stdout  # noqa: E402

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import pydantic  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vlp.eval import data as evdata  # noqa: E402
from vlp.eval.cli import normalize_task, register_cli  # noqa: E402
from vlp.eval.probe import extract_features, knn_eval, linear_probe, split_train_test  # noqa: E402
from vlp.eval.retrieval import extract_retrieval_features, retrieval_eval, retrieval_recall  # noqa: E402
from vlp.eval.in_training import run_training_eval  # noqa: E402
from vlp.eval.tasks import EVAL_TASKS, evaluate, get_eval_task, register_eval_task  # noqa: E402
from vlp.eval.zeroshot import (build_classifier, load_classifier, predict, save_classifier,  # noqa: E402
                               zeroshot_eval)
from vlp.models.factory import create_clip, image_transforms  # noqa: E402

N_IMAGES = 12
CLASSNAMES = ["cat", "dog", "car", "tree", "boat", "house"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}", "{c}"]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model, model_cfg, tokenizer = create_clip("vlp-test-vit")
    model.eval()
    _, preprocess = image_transforms(model)
    return model, model_cfg, tokenizer, preprocess


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    out = []
    for i in range(N_IMAGES):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-60, 60, size=(32, 32, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def image_feats(model, preprocess, ims):
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(im) for im in ims]), normalize=True)


def png_bytes(im):
    buf = io.BytesIO()
    im.save(buf, format="PNG")  # lossless: the shard decodes to the very same pixels
    return buf.getvalue()


def write_shard(path, samples):
    """samples: list of (PIL image, {"cls": int} or {"txt": str})."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for i, (im, extra) in enumerate(samples):
            sample = {"__key__": f"s{i:06d}", "png": png_bytes(im)}
            for key, value in extra.items():
                sample[key] = str(value).encode("utf-8")
            w.write(sample)


def np_topk_acc(logits, labels, k):
    order = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean([labels[i] in order[i] for i in range(len(labels))]))


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="vlp")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    out = io.StringIO()
    with redirect_stdout(out):
        rc = args.func(args)
    return rc, out.getvalue()


def write_export(model, model_cfg, folder):
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg,
           "preprocess_cfg": {"mean": list(model.visual.image_mean), "std": list(model.visual.image_std)}}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump(cfg, f)
    return folder


@pytest.fixture(scope="module")
def zs_dataset(clip, images, tmp_path_factory):
    """clip_benchmark layout: root/test/0.tar + classnames.txt + templates in root. Labels are chosen so
    that exactly half the images are classified right by the (directly computed) zero-shot classifier."""
    model, _, tokenizer, preprocess = clip
    root = tmp_path_factory.mktemp("zs")
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    # Direct computation with open_clip's own function and callables.
    direct = open_clip.build_zero_shot_classifier(
        model, tokenizer, CLASSNAMES, [lambda c, t=t: t.replace("{c}", c) for t in TEMPLATES], device="cpu")
    feats = image_feats(model, preprocess, images)
    logits = (feats @ direct).numpy()
    pred = logits.argmax(axis=1)
    labels = [int(p) if i % 2 == 0 else int((p + 1) % len(CLASSNAMES)) for i, p in enumerate(pred)]
    write_shard(root / "test" / "0.tar", [(im, {"cls": y}) for im, y in zip(images, labels)])
    return root, direct, logits, np.array(labels)


# ---------------------------------------------------------------------------------------------- data


def test_loader_specs_braces_and_max_samples(images, tmp_path):
    write_shard(tmp_path / "a" / "shard-000000.tar", [(im, {"cls": i}) for i, im in enumerate(images[:5])])
    write_shard(tmp_path / "a" / "shard-000001.tar", [(im, {"cls": 5 + i}) for i, im in enumerate(images[5:9])])
    write_shard(tmp_path / "b" / "0.tar", [(im, {"cls": 9 + i}) for i, im in enumerate(images[9:])])
    pre = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731

    def labels_of(spec, **kw):
        batches = list(evdata.labeled_loader(spec, pre, batch_size=4, **kw))
        assert all(isinstance(x, torch.Tensor) and x.dtype == torch.long for _, x in batches)
        return torch.cat([y for _, y in batches]).tolist(), batches

    got, batches = labels_of(str(tmp_path / "a" / "shard-{000000..000001}.tar"))
    assert got == list(range(9))
    assert [len(y) for _, y in batches] == [4, 4, 1]
    assert torch.equal(batches[0][0][2], torch.from_numpy(np.array(images[2])))
    got, _ = labels_of(f"{tmp_path / 'a'}::{tmp_path / 'b' / '0.tar'}")
    assert got == list(range(N_IMAGES))
    got, _ = labels_of(str(tmp_path / "a"), max_samples=6)
    assert got == list(range(6))
    got, _ = labels_of(str(tmp_path / "a"), workers=2)
    assert sorted(got) == list(range(9))


class _Exploit:
    """A pickle that runs code when loaded (what a hostile .pyd / .pkl member of a shard holds)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_thin_image_is_skipped_before_it_is_resized(clip, images, tmp_path):
    """A 1x20000 PNG (a few KB) scaled to the model's input on its short side took GBs (#30): eval skips it
    before any resize and classifies the others."""
    from vlp.data.format import MAX_ASPECT_RATIO, ImageShapeError, decode_image

    thin = Image.new("RGB", (1, 20000), (200, 10, 10))
    with pytest.raises(ImageShapeError, match="too thin: 1x20000"):
        decode_image(png_bytes(thin))
    edge = Image.new("RGB", (MAX_ASPECT_RATIO, 1))
    assert decode_image(png_bytes(edge)).size == (MAX_ASPECT_RATIO, 1)
    *_, preprocess = clip
    write_shard(tmp_path / "thin" / "0.tar", [(images[0], {"cls": 0}), (thin, {"cls": 1}), (images[1], {"cls": 2}),
                                              (thin.transpose(Image.Transpose.ROTATE_90), {"cls": 3})])
    batches = list(evdata.labeled_loader(str(tmp_path / "thin" / "0.tar"), preprocess, batch_size=8))
    assert [int(y) for _, labels in batches for y in labels] == [0, 2]
    assert batches[0][0].shape[-2:] == (32, 32)


def test_eval_loaders_never_unpickle_shard_members(images, tmp_path):
    """A sample with extra .pyd / .pkl / .pth members: eval reads image and label only, nothing is executed."""
    import pickle

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    with wds.TarWriter(str(tmp_path / "evil.tar")) as w:
        for i, im in enumerate(images[:3]):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "cls": str(i), "pyd": payload,
                     "pkl": payload, "pickle": payload, "pth": payload})
    pre = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731
    batches = list(evdata.labeled_loader(str(tmp_path / "evil.tar"), pre, batch_size=8))
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 2]
    assert torch.equal(batches[0][0][1], torch.from_numpy(np.array(images[1].convert("RGB"))))
    assert not marker.exists()


def test_hostile_eval_shard_runs_nothing_in_vlp_eval_nor_in_training_eval(demo_data, tmp_path):
    """#17 item 1 end to end: a zero-shot eval shard whose samples carry a pickle (.pyd/.pkl/.pth) that would create
    a marker file when unpickled: `vlp eval` and a training run with in-training zero-shot eval both read it, and the
    marker never appears."""
    import pickle
    import shutil

    from conftest import run_config
    from vlp.cli import main as vlp_main
    from vlp.config import config_from_dict
    from vlp.train import Trainer

    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    evil = tmp_path / "evil"
    shutil.copytree(demo_data / "test", evil, ignore=shutil.ignore_patterns("*.tar", "sizes.json"))
    samples = {}
    with tarfile.open(sorted((demo_data / "test").glob("*.tar"))[0]) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {"__key__": key, "pyd": payload, "pkl": payload, "pth": payload})[ext] = \
                tar.extractfile(m).read()
    with wds.TarWriter(str(evil / "evil-000000.tar")) as w:
        for sample in list(samples.values())[:24]:
            w.write(sample)
    run_dir = tmp_path / "run"
    cfg = run_config(demo_data, run_dir, data={"workers": 0}, train={"steps": 2, "save_every": 2},
                     eval={"zeroshot": {"shards": str(evil)}})
    result = Trainer(config_from_dict(cfg)).fit()
    assert "zeroshot/top1" in result and not marker.exists()
    assert vlp_main(["eval", "--model", str(run_dir), "--task", "zeroshot", "--data", str(evil),
                     "--device", "cpu"]) == 0
    assert not marker.exists()


def test_classnames_and_templates_lookup(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "classnames.txt").write_text("a\nb c\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("x {c} y\n{c}!\n")
    assert evdata.find_classnames(str(tmp_path / "test" / "0.tar")) == ["a", "b c"]
    assert evdata.find_classnames(str(tmp_path)) == ["a", "b c"]
    assert evdata.find_templates(str(tmp_path / "test" / "{0..3}.tar")) == ["x {c} y", "{c}!"]
    assert evdata.find_classnames(None, ["p", "q"]) == ["p", "q"]
    assert evdata.find_templates(None, "photo") == ["a photo of a {c}."]
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES
    oa = evdata.find_templates(None, "openai_imagenet")
    assert [t.format(c="dog") for t in oa] == [f("dog") for f in OPENAI_IMAGENET_TEMPLATES]
    simple = evdata.find_templates(None, "simple")
    assert [t.format(c="dog") for t in simple] == [f("dog") for f in SIMPLE_IMAGENET_TEMPLATES]
    assert [f("dog") for f in evdata.template_fns(["a {c}.", "b {}"])] == ["a dog.", "b dog"]
    with pytest.raises(FileNotFoundError):
        evdata.find_classnames(str(tmp_path / "elsewhere" / "x" / "0.tar"))


# ---------------------------------------------------------------------------------------------- zero-shot


def test_zeroshot_known_accuracy_with_image_classifier(clip, images, tmp_path):
    """Classifier columns = the images' own embeddings: each image is closest to its own column, so the
    8 images labelled with their own index are right and the 4 others wrong; top-5 by numpy."""
    model, _, _, preprocess = clip
    feats = image_feats(model, preprocess, images)
    labels = [i if i < 8 else (i + 3) % N_IMAGES for i in range(N_IMAGES)]
    write_shard(tmp_path / "0.tar", [(im, {"cls": y}) for im, y in zip(images, labels)])
    classifier = feats.T.contiguous()
    res = zeroshot_eval(model, classifier, evdata.labeled_loader(str(tmp_path), preprocess, batch_size=5))
    assert res["n"] == N_IMAGES
    assert res["top1"] == pytest.approx(8 / 12)
    logits = feats.numpy() @ feats.numpy().T
    assert res["top1"] == pytest.approx(np_topk_acc(logits, np.array(labels), 1))
    assert res["top5"] == pytest.approx(np_topk_acc(logits, np.array(labels), 5))
    # clip_benchmark's mean per-class recall over the classes present: 0..2 half right, 3..7 right, 11 wrong
    assert res["mean_per_class_recall"] == pytest.approx((3 * 0.5 + 5 * 1.0 + 0.0) / 9)


def test_eval_task_auto_and_fail_fast_on_shards_without_what_the_task_reads(clip, images, tmp_path, capsys):
    """#16: --task retrieval on label-only shards failed late (NaN after the whole pass); `auto` (the default)
    decides from the shards: captions -> retrieval, labels -> zeroshot."""
    from vlp.cli import main
    from vlp.eval.tasks import get_eval_task

    model, model_cfg, tokenizer, preprocess = clip
    write_shard(tmp_path / "lab" / "0.tar", [(im, {"cls": i % 2}) for i, im in enumerate(images)])
    (tmp_path / "lab" / "classnames.txt").write_text("a\nb\n")
    write_shard(tmp_path / "cap" / "0.tar", [(im, {"txt": f"photo {i}"}) for i, im in enumerate(images)])
    assert get_eval_task("auto", str(tmp_path / "cap")).name == "retrieval"
    assert get_eval_task("auto", str(tmp_path / "lab")).name == "zeroshot"
    with pytest.raises(ValueError, match=r"eval --task retrieval: reads txt .* has only \['cls', 'png'\]; "
                                         r"these shards suit --task zeroshot"):
        evaluate(model, tokenizer, preprocess, "retrieval", str(tmp_path / "lab"))
    export = write_export(model, model_cfg, str(tmp_path / "export"))
    rc = main(["eval", "--model", export, "--task", "retrieval", "--data", str(tmp_path / "lab"), "--device", "cpu"])
    assert rc == 2 and "eval --task retrieval: reads txt" in capsys.readouterr().err
    rc = main(["eval", "--model", export, "--data", str(tmp_path / "cap"), "--device", "cpu"])
    assert rc == 0 and "image_retrieval_recall@1" in capsys.readouterr().out


def test_zeroshot_shards_match_direct_open_clip(clip, zs_dataset):
    model, _, tokenizer, preprocess = clip
    root, direct, logits, labels = zs_dataset
    clf = build_classifier(model, tokenizer, evdata.find_classnames(str(root)), evdata.find_templates(str(root)))
    assert clf.shape == (32, len(CLASSNAMES))
    torch.testing.assert_close(clf, direct)
    res = evaluate(model, tokenizer, preprocess, "zeroshot", str(root), batch_size=5)
    assert res["top1"] == pytest.approx(np_topk_acc(logits, labels, 1))
    assert res["top1"] == pytest.approx(0.5)
    assert res["top5"] == pytest.approx(np_topk_acc(logits, labels, 5))
    assert res["n"] == N_IMAGES
    assert not model.training


def test_a_classifier_of_many_classes_reports_progress(clip, caplog):
    """Building a classifier of many classes says how far it got (a 100k-class eval ran minutes silently, #30);
    the weights are those of one build."""
    import logging

    model, _, tokenizer, _ = clip
    names = [f"class {i}" for i in range(25)]
    whole = build_classifier(model, tokenizer, names, TEMPLATES)
    assert "zero-shot classifier" not in caplog.text
    with caplog.at_level(logging.INFO, logger="vlp.eval.zeroshot"):
        parts = build_classifier(model, tokenizer, names, TEMPLATES, progress_every=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("zero-shot classifier")]
    assert [line.split(" classes")[0] for line in lines] == [f"zero-shot classifier: {n}/25" for n in (10, 20, 25)]
    assert torch.allclose(parts, whole, atol=1e-6)


def test_save_load_classifier_round_trip(tmp_path):
    w = torch.randn(32, 3)
    path = tmp_path / "clf.safetensors"
    save_classifier(path, w, ["a", "b", "c"], ["a photo of {c}", "{c}"])
    w2, names, temps = load_classifier(path)
    assert torch.equal(w, w2)
    assert names == ["a", "b", "c"]
    assert temps == ["a photo of {c}", "{c}"]


def test_cli_eval_and_zeroshot_on_export(clip, images, zs_dataset, tmp_path):
    model, model_cfg, tokenizer, preprocess = clip
    root, direct, logits, labels = zs_dataset
    export = write_export(model, model_cfg, str(tmp_path / "export"))
    expected = evaluate(model, tokenizer, preprocess, "zeroshot", str(root))

    out_json = tmp_path / "res.json"
    rc, out = run_cli(["eval", "--model", export, "--task", "zeroshot", "--data", str(root),
                       "--batch-size", "4", "--output", str(out_json), "--device", "cpu"])
    assert rc == 0
    result = json.loads(out_json.read_text())
    assert result["task"] == "zeroshot" and result["model"] == export and result["data"] == str(root)
    assert result["metrics"]["top1"] == expected["top1"] == pytest.approx(0.5)
    assert result["metrics"]["top5"] == expected["top5"]
    assert "top1" in out and "0.5000" in out

    # zeroshot build -> saved classifier equals the direct one; eval with it gives the same numbers
    clf_path = tmp_path / "clf.safetensors"
    rc, _ = run_cli(["zeroshot", "build", "--model", export, "--device", "cpu",
                     "--classnames", str(root / "classnames.txt"),
                     "--templates", str(root / "zeroshot_classification_templates.txt"), "-o", str(clf_path)])
    assert rc == 0
    w, names, temps = load_classifier(clf_path)
    assert names == CLASSNAMES and temps == TEMPLATES
    torch.testing.assert_close(w, direct)
    rc, _ = run_cli(["eval", "--model", export, "--data", str(root), "--classifier", str(clf_path),
                     "--output", str(out_json), "--device", "cpu"])
    assert json.loads(out_json.read_text())["metrics"]["top1"] == expected["top1"]

    # zeroshot predict: top-k with softmax(logit_scale * logits), checked against a direct computation
    paths = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        images[i].save(p)
        paths.append(str(p))
    rc, out = run_cli(["zeroshot", "predict", "--model", export, "--classifier", str(clf_path), "--topk", "3",
                       "--device", "cpu", *paths])
    assert rc == 0
    scale = float(model.logit_scale.detach().exp())
    probs = torch.softmax(scale * torch.from_numpy(logits[:2]), dim=-1)
    for i, p in enumerate(paths):
        assert p in out
        top = probs[i].topk(3)
        for j, v in zip(top.indices.tolist(), top.values.tolist()):
            assert f"{CLASSNAMES[j]}" in out and f"{v:.4f}" in out
    res = predict(model, preprocess, direct, CLASSNAMES, paths, k=2)
    assert [r[0][0] for r in res] == [CLASSNAMES[int(logits[i].argmax())] for i in range(2)]
    assert res[0][0][1] == pytest.approx(float(probs[0].max()), rel=1e-5)


def test_bad_inputs_to_eval_and_predict_fail_loudly_and_lose_nothing(clip, images, zs_dataset, tmp_path, capsys):
    """#17: eval with fewer class names than the data's labels printed a wrong accuracy with exit 0; one
    unreadable image aborted `zeroshot predict` for every image of the call."""
    model, model_cfg, tokenizer, preprocess = clip
    root, direct, logits, _ = zs_dataset
    export = write_export(model, model_cfg, str(tmp_path / "export"))
    few = tmp_path / "few.txt"
    few.write_text("cat\ndog\n")
    from vlp.cli import main as vlp_main

    rc = vlp_main(["eval", "--model", export, "--task", "zeroshot", "--data", str(root), "--classnames", str(few),
                   "--device", "cpu"])
    assert rc == 2 and "the classifier has 2 classes" in capsys.readouterr().err

    clf_path = tmp_path / "clf.safetensors"
    save_classifier(clf_path, direct, CLASSNAMES, TEMPLATES)
    good = tmp_path / "good.png"
    images[0].save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    paths = [str(broken), str(good), str(tmp_path / "missing.png")]
    rc, out = run_cli(["zeroshot", "predict", "--model", export, "--classifier", str(clf_path), "--topk", "1",
                       "--device", "cpu", *paths])
    assert rc == 1 and "2 of 3 images could not be read" in capsys.readouterr().err
    assert out.count("unreadable image") == 2
    assert CLASSNAMES[int(logits[0].argmax())] in out.split(str(good))[1].splitlines()[1]


# ---------------------------------------------------------------------------------------------- retrieval


def np_recall(img, txt, t2i, k):
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = txt @ img.T
    t2i_hits = [t2i[t] in np.argsort(-s[t])[:k] for t in range(len(txt))]
    i2t_hits = []
    for i in range(len(img)):
        top = np.argsort(-s[:, i])[:k]
        i2t_hits.append(any(t2i[t] == i for t in top))
    return float(np.mean(t2i_hits)), float(np.mean(i2t_hits))


def test_retrieval_recall_hand_constructed():
    e = torch.eye(3)
    images = e.clone()
    texts = torch.stack([
        e[0],                      # t0 -> img0: top-1 img0 (right)
        e[1] + 0.2 * e[0],         # t1 -> img0: top-1 img1 (wrong), img0 second
        e[0] + 0.5 * e[1],         # t2 -> img1: top-1 img0 (wrong), img1 second
        e[2],                      # t3 -> img2: right
    ])
    t2i = torch.tensor([0, 0, 1, 2])
    r = retrieval_recall(images, texts, t2i, ks=(1, 2))
    assert r["image_retrieval_recall@1"] == pytest.approx(0.5)
    assert r["image_retrieval_recall@2"] == pytest.approx(1.0)
    # img0: best text t0 (its own); img1: best t1 (img0's), t2 second; img2: t3
    assert r["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_retrieval_recall_random_vs_bruteforce():
    g = torch.Generator().manual_seed(1)
    n_img, dim = 30, 16
    n_caps = [1 + (i % 3) for i in range(n_img)]  # 1..3 captions per image
    t2i = torch.tensor([i for i, n in enumerate(n_caps) for _ in range(n)])
    img = torch.randn(n_img, dim, generator=g)
    txt = img[t2i] + 1.3 * torch.randn(len(t2i), dim, generator=g)
    r = retrieval_recall(img, txt, t2i, ks=(1, 5, 10))
    for k in (1, 5, 10):
        ir, tr = np_recall(img.numpy(), txt.numpy(), t2i.numpy(), k)
        assert r[f"image_retrieval_recall@{k}"] == pytest.approx(ir)
        assert r[f"text_retrieval_recall@{k}"] == pytest.approx(tr)
    assert 0 < r["image_retrieval_recall@1"] < 1 and 0 < r["text_retrieval_recall@1"] < 1


def test_retrieval_shards_end_to_end(clip, images, tmp_path):
    model, _, tokenizer, preprocess = clip
    captions = [[f"a photo number {i}"] + [f"caption {i} {j}" for j in range(i % 3)] for i in range(N_IMAGES)]
    write_shard(tmp_path / "0.tar", [(im, {"txt": "\n".join(c)}) for im, c in zip(images, captions)])
    loader = evdata.retrieval_loader(str(tmp_path), preprocess, batch_size=5)
    img_f, txt_f, t2i = extract_retrieval_features(model, tokenizer, loader)
    flat = [c for caps in captions for c in caps]
    assert t2i.tolist() == [i for i, caps in enumerate(captions) for _ in caps]
    with torch.no_grad():
        exp_txt = model.encode_text(tokenizer(flat), normalize=True)
    torch.testing.assert_close(img_f, image_feats(model, preprocess, images))
    torch.testing.assert_close(txt_f, exp_txt)
    res = evaluate(model, tokenizer, preprocess, "retrieval", str(tmp_path), batch_size=5, ks=(1, 5))
    ir, tr = np_recall(img_f.numpy(), txt_f.numpy(), t2i.numpy(), 5)
    assert res["image_retrieval_recall@5"] == pytest.approx(ir)
    assert res["text_retrieval_recall@5"] == pytest.approx(tr)
    assert res["n_images"] == N_IMAGES and res["n_texts"] == len(flat)
    # #17 item 7: an empty shard printed NaN recalls with exit 0
    empty = tmp_path / "empty"
    empty.mkdir()
    tarfile.open(empty / "0.tar", "w").close()
    with pytest.raises(ValueError, match="yielded 0 images and 0 captions"):
        evaluate(model, tokenizer, preprocess, "retrieval", str(empty), batch_size=5)


# ---------------------------------------------------------------------------------------------- probes


def np_knn(trf, trl, tef, k, T, C):
    trf = trf / np.linalg.norm(trf, axis=1, keepdims=True)
    tef = tef / np.linalg.norm(tef, axis=1, keepdims=True)
    preds = []
    for x in tef:
        sims = trf @ x
        nn = np.argsort(-sims)[:k]
        votes = np.zeros(C)
        for j in nn:
            votes[trl[j]] += np.exp(sims[j] / T)
        ranked = np.argsort(-votes, kind="stable")
        preds.append(np.where(votes[ranked] > 0, ranked, -1))  # zero-vote classes predict nothing
    return np.array(preds)


def test_knn_vs_bruteforce():
    rng = np.random.default_rng(3)
    C, dim = 7, 8
    centers = rng.normal(size=(C, dim))
    trl = rng.integers(0, C, 80)
    tel = rng.integers(0, C, 40)
    trf = centers[trl] + 1.5 * rng.normal(size=(80, dim))
    tef = centers[tel] + 1.5 * rng.normal(size=(40, dim))
    for k, T in ((5, 0.1), (20, 0.07)):
        res = knn_eval(torch.tensor(trf), torch.tensor(trl), torch.tensor(tef), torch.tensor(tel), k=k, T=T,
                       num_classes=C, chunk=16)
        ranked = np_knn(trf, trl, tef, k, T, C)
        assert res["top1"] == pytest.approx(np.mean(ranked[:, 0] == tel))
        assert res["top5"] == pytest.approx(np.mean((ranked[:, :5] == tel[:, None]).any(axis=1)))
        assert res["n"] == 40
        assert 0 < res["top1"] < 1


def test_linear_probe_separable_and_split():
    rng = np.random.default_rng(0)
    C, dim, per = 4, 10, 25
    centers = 5 * np.eye(C, dim)
    labels = np.repeat(np.arange(C), per)
    feats = centers[labels] + 0.3 * rng.normal(size=(len(labels), dim))
    tr_f, tr_l, te_f, te_l = split_train_test(torch.tensor(feats), torch.tensor(labels), 0.2, seed=0)
    again = split_train_test(torch.tensor(feats), torch.tensor(labels), 0.2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip((tr_f, tr_l, te_f, te_l), again))
    assert len(te_l) == 20 and len(tr_l) == 80
    assert torch.bincount(te_l).tolist() == [5] * C
    train_rows = {tuple(r) for r in tr_f.tolist()}
    assert not any(tuple(r) in train_rows for r in te_f.tolist())
    res = linear_probe(tr_f, tr_l, te_f, te_l, C=1.0)
    assert res["top1"] == 1.0 and res["n"] == 20
    other = split_train_test(torch.tensor(feats), torch.tensor(labels), 0.2, seed=1)
    assert not torch.equal(other[2], te_f)


def test_probe_tasks_on_shards(clip, images, tmp_path):
    model, _, tokenizer, preprocess = clip
    labels = [i % 3 for i in range(N_IMAGES)]
    write_shard(tmp_path / "train" / "0.tar", [(im, {"cls": y}) for im, y in zip(images, labels)])
    write_shard(tmp_path / "val" / "0.tar", [(im, {"cls": y}) for im, y in zip(images[:6], labels[:6])])
    feats, ys = extract_features(model, evdata.labeled_loader(str(tmp_path / "train"), preprocess, 5))
    torch.testing.assert_close(feats, image_feats(model, preprocess, images))
    assert ys.tolist() == labels
    # The val images are train images: 1-NN is each image itself.
    res = evaluate(model, tokenizer, preprocess, "knn", str(tmp_path / "val"), train_data=str(tmp_path / "train"),
                   k=1)
    assert res["top1"] == 1.0 and res["n"] == 6 and res["n_train"] == N_IMAGES
    # Split path equals the manual split + kNN.
    res = evaluate(model, tokenizer, preprocess, "knn", str(tmp_path / "train"), test_fraction=0.25, k=3)
    tr_f, tr_l, te_f, te_l = split_train_test(feats, ys, 0.25, seed=0)
    assert res == {**knn_eval(tr_f, tr_l, te_f, te_l, k=3, num_classes=3), "n_train": len(tr_l)}
    res = evaluate(model, tokenizer, preprocess, "linear-probe", str(tmp_path / "train"), test_fraction=0.25)
    assert res == {**linear_probe(tr_f, tr_l, te_f, te_l), "n_train": len(tr_l)}


# ---------------------------------------------------------------------------------------------- task registry


@pytest.fixture(scope="module")
def probe_shards(images, tmp_path_factory):
    """train: 8 images, val: the 4 others; labels i % 3."""
    root = tmp_path_factory.mktemp("probe")
    labels = [i % 3 for i in range(N_IMAGES)]
    write_shard(root / "train" / "0.tar", [(im, {"cls": y}) for im, y in zip(images[:8], labels[:8])])
    write_shard(root / "val" / "0.tar", [(im, {"cls": y}) for im, y in zip(images[8:], labels[8:])])
    return str(root / "train"), str(root / "val")


def test_registry_lists_tasks_and_aliases():
    assert {n: (t.needs_text, t.uses_train_data) for n, t in EVAL_TASKS.items()} == {
        "zeroshot": (True, False), "zeroshot_multilabel": (True, False), "retrieval": (True, False),
        "knn": (False, True), "linear_probe": (False, True)}
    # every spelling the CLI accepted before the registry
    spellings = {"zeroshot": "zeroshot", "zero-shot": "zeroshot", "zero_shot": "zeroshot",
                 "zeroshot_classification": "zeroshot", "classification": "zeroshot", "retrieval": "retrieval",
                 "zeroshot_retrieval": "retrieval", "linear-probe": "linear_probe", "linear_probe": "linear_probe",
                 "linear": "linear_probe", "knn": "knn", "KNN": "knn", "Zero-Shot": "zeroshot"}
    assert {s: normalize_task(s) for s in spellings} == spellings
    with pytest.raises(ValueError) as e:
        get_eval_task("nope")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ("zeroshot", "retrieval", "knn", "linear_probe"))
    parser = argparse.ArgumentParser(prog="vlp")
    register_cli(parser.add_subparsers(dest="command"))
    for given, name in (("linear-probe", "linear_probe"), ("auto", "auto"), ("zero-shot", "zeroshot")):
        assert parser.parse_args(["eval", "--model", "m", "--data", "d", "--task", given]).task == name
    err = io.StringIO()
    with pytest.raises(SystemExit), redirect_stderr(err):
        parser.parse_args(["eval", "--model", "m", "--data", "d", "--task", "nope"])
    assert err.getvalue().strip().splitlines()[-1].endswith(msg)


def test_evaluate_through_registry_equals_task_modules(clip, images, zs_dataset, probe_shards, tmp_path):
    model, _, tokenizer, preprocess = clip
    root = str(zs_dataset[0])
    clf = build_classifier(model, tokenizer, CLASSNAMES, TEMPLATES)
    direct = zeroshot_eval(model, clf, evdata.labeled_loader(root, preprocess, 5))
    for spelling in ("zeroshot", "zero-shot", "auto"):
        assert evaluate(model, tokenizer, preprocess, spelling, root, batch_size=5) == direct
    assert evaluate(model, tokenizer, preprocess, "zeroshot", root, classifier=clf, max_samples=7) == \
        zeroshot_eval(model, clf, evdata.labeled_loader(root, preprocess, 64, max_samples=7))

    write_shard(tmp_path / "ret" / "0.tar", [(im, {"txt": f"photo {i}\nimage {i}"}) for i, im in enumerate(images)])
    ret = str(tmp_path / "ret")
    assert evaluate(model, tokenizer, preprocess, "retrieval", ret, batch_size=5, ks=(1, 3)) == \
        retrieval_eval(model, tokenizer, evdata.retrieval_loader(ret, preprocess, 5), ks=(1, 3))

    train, val = probe_shards
    tr_f, tr_l = extract_features(model, evdata.labeled_loader(train, preprocess, 4))
    te_f, te_l = extract_features(model, evdata.labeled_loader(val, preprocess, 4))
    res = evaluate(model, tokenizer, preprocess, "knn", val, train_data=train, k=3, T=0.1)
    assert res == {**knn_eval(tr_f, tr_l, te_f, te_l, k=3, T=0.1), "n_train": 8}
    res = evaluate(model, None, preprocess, "linear-probe", val, train_data=train, C=0.5)
    assert res == {**linear_probe(tr_f, tr_l, te_f, te_l, C=0.5), "n_train": 8}
    assert not model.training


class KnnSection(pydantic.BaseModel):
    """The shape of the planned ``eval.knn`` config section."""
    shards: str
    train_shards: str | None = None
    k: int = 20
    max_samples: int | None = None


def test_run_training_eval_knn_and_zeroshot(clip, zs_dataset, probe_shards):
    model, _, tokenizer, preprocess = clip
    train, val = probe_shards
    root = str(zs_dataset[0])
    metrics = run_training_eval(
        model, tokenizer, preprocess,
        {"zeroshot": {"shards": root, "classnames": None, "templates": [], "max_samples": None},
         "knn": KnnSection(shards=val, train_shards=train, k=3), "retrieval": None},
        device="cpu", batch_size=5, default_classnames=CLASSNAMES, default_templates=TEMPLATES)
    # today's trainer: {f"zeroshot/{k}": v for numbers of evaluate(..., "zeroshot", ...)}
    zs = evaluate(model, tokenizer, preprocess, "zeroshot", root, classnames=CLASSNAMES, templates=TEMPLATES,
                  batch_size=5, device="cpu")
    tr_f, tr_l = extract_features(model, evdata.labeled_loader(train, preprocess, 4))
    te_f, te_l = extract_features(model, evdata.labeled_loader(val, preprocess, 4))
    knn = knn_eval(tr_f, tr_l, te_f, te_l, k=3)
    assert metrics == {"zeroshot/top1": zs["top1"], "zeroshot/top5": zs["top5"], "zeroshot/n": N_IMAGES,
                       "zeroshot/mean_per_class_recall": zs["mean_per_class_recall"],
                       "knn/top1": knn["top1"], "knn/top5": knn["top5"], "knn/n": 4, "knn/n_train": 8}
    assert metrics["zeroshot/top1"] == pytest.approx(0.5)

    # kNN needs no text tower: none at all here, and no tokenizer
    image_only = copy.deepcopy(model)
    image_only.transformer = image_only.token_embedding = image_only.ln_final = None
    got = run_training_eval(image_only, None, preprocess, {"knn": {"shards": val, "train_shards": train, "k": 3}},
                            device="cpu", batch_size=4)
    assert got == {k: v for k, v in metrics.items() if k.startswith("knn/")}
    with pytest.raises(ValueError, match="text tower"):
        run_training_eval(image_only, None, preprocess, {"zeroshot": {"shards": root}}, device="cpu", batch_size=4)
    with pytest.raises(ValueError, match="kk"):
        run_training_eval(model, tokenizer, preprocess, {"knn": {"shards": val, "kk": 3}}, device="cpu",
                          batch_size=4)
    with pytest.raises(ValueError, match="train_shards"):
        run_training_eval(model, tokenizer, preprocess, {"zeroshot": {"shards": root, "train_shards": train}},
                          device="cpu", batch_size=4)


def test_new_task_is_one_registry_entry(clip, probe_shards):
    """A 'mean feature norm' task: one decorated function; evaluate, the CLI parser and run_training_eval
    take it, with its own option ``p``."""
    model, _, _, preprocess = clip
    train, _ = probe_shards

    @register_eval_task("mean_norm", needs_text=False, aliases=("feature-norm",), help="mean image feature norm")
    def mean_norm(model, tokenizer, preprocess, data, *, device, batch_size, workers, max_samples, p=2.0, **_):
        norms = [model.encode_image(x.to(device)).norm(p=p, dim=-1)
                 for x, _ in evdata.labeled_loader(data, preprocess, batch_size, workers, max_samples)]
        return {"mean_norm": float(torch.cat(norms).mean()), "n": int(sum(len(n) for n in norms))}

    try:
        assert EVAL_TASKS["mean_norm"].needs_text is False
        with torch.no_grad():
            x = next(iter(evdata.labeled_loader(train, preprocess, 100)))[0]
            expected = {p: float(model.encode_image(x).norm(p=p, dim=-1).mean()) for p in (1.0, 2.0)}
        res = evaluate(model, None, preprocess, "feature-norm", train, batch_size=3)
        assert res["mean_norm"] == pytest.approx(expected[2.0], rel=1e-5) and res["n"] == 8
        res = evaluate(model, None, preprocess, "mean_norm", train, batch_size=3, p=1.0)
        assert res["mean_norm"] == pytest.approx(expected[1.0], rel=1e-5)
        got = run_training_eval(model, None, preprocess, {"mean_norm": {"shards": train, "p": 1.0}}, device="cpu",
                                batch_size=3)
        assert got == {"mean_norm/mean_norm": res["mean_norm"], "mean_norm/n": 8}
        parser = argparse.ArgumentParser(prog="vlp")
        register_cli(parser.add_subparsers(dest="command"))
        assert parser.parse_args(["eval", "--model", "m", "--data", "d", "--task", "feature-norm"]).task == "mean_norm"
    finally:
        del EVAL_TASKS["mean_norm"]
    with pytest.raises(ValueError, match="unknown eval task"):
        normalize_task("feature-norm")


def test_knn_on_pooled_backbone_features_for_runs_without_a_text_side(clip, probe_shards):
    """feature=pooled: the ViT's pooled token before the projection (what SSL-only runs train), normalized."""
    import torch.nn.functional as F

    model, _, _, preprocess = clip
    train, val = probe_shards
    loader = evdata.labeled_loader(val, preprocess, batch_size=8)
    pooled, labels = extract_features(model, loader, feature="pooled")
    embed, _ = extract_features(model, evdata.labeled_loader(val, preprocess, batch_size=8))
    images = torch.cat([x for x, _ in evdata.labeled_loader(val, preprocess, batch_size=8)])
    from vlp.config import ModelConfig
    from vlp.models.model import VLPModel

    with torch.no_grad():  # the training pass's own pooled feature (unmasked), and its projection
        x = VLPModel(model, ModelConfig(mask_ratio=0.0)).eval().encode_pooled(images)
    assert pooled.shape[1] == model.visual.proj.shape[0] and model.visual.proj is not None
    torch.testing.assert_close(pooled, F.normalize(x, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(embed, F.normalize(x @ model.visual.proj, dim=-1), atol=1e-5, rtol=0)
    res = run_training_eval(model, None, preprocess, {"knn": {"shards": val, "train_shards": train,
                                                              "feature": "pooled"}}, device="cpu", batch_size=4)
    ref = knn_eval(*extract_features(model, evdata.labeled_loader(train, preprocess, 4), feature="pooled"),
                   pooled, labels, k=20, T=0.07)
    assert res["knn/top1"] == pytest.approx(ref["top1"])
