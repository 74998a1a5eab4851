"""Zero-shot multi-label evaluation (`vlp eval --task zeroshot_multilabel`, chosen by `auto` on shards whose samples
carry several labels): mAP over classes and top-1 hit rate, against sklearn's average precision on the same image and
text features; a trained multi-label run evaluated by the real CLI on shards written by `vlp shards tags`."""
from __future__ import annotations

import json

import pytest
import torch
from sklearn.metrics import average_precision_score

from conftest import run_config
from test_multilabel import DIGITS, EXTRA, digit_tags, vlp, write_digit_tag_list
from vlp.cli import main as vlp_main
from vlp.config import config_from_dict
from vlp.data.format import decode_image
from vlp.eval.tasks import evaluate, get_eval_task
from vlp.eval.zeroshot import build_classifier
from vlp.models.factory import create_clip, image_transforms

CLASSES = DIGITS + EXTRA


@pytest.fixture(scope="module")
def tag_shards(tmp_path_factory):
    """120 digits with three tags each, written by `vlp shards tags` (a real subprocess), and the same images' tags."""
    root = tmp_path_factory.mktemp("ml-eval")
    tsv = write_digit_tag_list(root / "images", n=120)
    proc = vlp("shards", "tags", "--list", tsv, root / "shards", "--classnames", root / "images" / "classes.txt",
               "--maxcount", 50)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    return root / "shards", [(root / "images" / name, tags.split(",")) for name, tags in rows]


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model, _, tokenizer = create_clip("vlp-test-vit")
    return model.eval(), tokenizer, image_transforms(model)[1]


def test_auto_picks_the_multilabel_task_and_single_label_tasks_refuse_the_shards(tag_shards, clip):
    shards, _ = tag_shards
    model, tokenizer, preprocess = clip
    assert get_eval_task("auto", str(shards)).name == "zeroshot_multilabel"
    assert get_eval_task("multilabel").name == "zeroshot_multilabel"
    for task in ("zeroshot", "knn"):
        with pytest.raises(ValueError, match="carry several labels each; use --task zeroshot_multilabel"):
            evaluate(model, tokenizer, preprocess, task, str(shards))


def test_map_and_top1_hit_equal_sklearn_on_the_same_features(tag_shards, clip):
    shards, rows = tag_shards
    model, tokenizer, preprocess = clip
    templates = ["a photo of a {c}."]
    got = evaluate(model, tokenizer, preprocess, "auto", str(shards), templates=templates, batch_size=32)
    # reference: the images in shard order (the writer keeps the list's order), sklearn's AP per class
    with torch.no_grad():
        images = torch.stack([preprocess(decode_image(path.read_bytes())) for path, _ in rows])
        scores = (model.encode_image(images, normalize=True) @ build_classifier(model, tokenizer, CLASSES,
                                                                               templates)).numpy()
    target = torch.zeros(len(rows), len(CLASSES))
    for i, (_, tags) in enumerate(rows):
        target[i, [CLASSES.index(t) for t in tags]] = 1
    aps = [average_precision_score(target[:, c].numpy(), scores[:, c]) for c in range(len(CLASSES))
           if target[:, c].any()]
    assert got["n"] == 120 and got["labels_per_image"] == 3.0 and got["skipped"] == 0
    assert got["mAP"] == pytest.approx(sum(aps) / len(aps), abs=1e-4)
    hit = target.gather(1, torch.as_tensor(scores).argmax(1, keepdim=True)).mean()
    assert got["top1_hit"] == pytest.approx(float(hit))


def test_a_sample_with_an_unknown_tag_is_skipped_and_counted(tag_shards, clip, tmp_path):
    from vlp.shards.write import write_samples

    shards, rows = tag_shards
    model, tokenizer, preprocess = clip
    samples = [{"__key__": f"{i:04d}", "jpg": path.read_bytes(), "tags": ",".join(tags).encode()}
               for i, (path, tags) in enumerate(rows[:20])]
    samples[3]["tags"] = b"zero,unicorn"
    write_samples(iter(samples), tmp_path / "bad", prefix="bad")
    (tmp_path / "bad" / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    got = evaluate(model, tokenizer, preprocess, "zeroshot_multilabel", str(tmp_path / "bad"),
                   templates=["{c}"])
    assert got["n"] == 19 and got["skipped"] == 1


def test_a_multilabel_run_is_evaluated_by_vlp_eval_on_its_tag_shards(tag_shards, demo_data, tmp_path, capsys):
    """Train on the `vlp shards tags` output (multi-label softmax + CLIP on the demo's captions, so the text tower
    learns), then `vlp eval` on the tag shards: auto picks zero-shot multi-label and reports mAP."""
    shards, _ = tag_shards
    cfg = run_config(demo_data, tmp_path / "run", model={"name": "vlp-test-vit", "mask_ratio": 0.0},
                     optim={"lr": 3e-3, "warmup_steps": 2},
                     train={"steps": 6, "log_every": 3, "save_every": 100, "progress": False})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "paired"] + [
        {"name": "tags", "kind": "labeled", "shards": str(shards / "*.tar")}]
    cfg["data"]["batch"] = {"paired": 8, "labeled": 8}
    cfg["objectives"] = {"multilabel": {"weight": 1.0}, "contrastive": {"weight": 1.0}}
    from vlp.train import Trainer

    trainer = Trainer(config_from_dict(cfg))
    assert trainer.fit()["step"] == 6
    trainer.accelerator.end_training()
    trainer.release()
    out = tmp_path / "res.json"
    rc = vlp_main(["eval", "--model", str(tmp_path / "run"), "--data", str(shards), "--device", "cpu",
                   "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_multilabel"
    assert 0.0 < result["metrics"]["mAP"] <= 1.0 and result["metrics"]["n"] == 120
    assert digit_tags(0) == ["zero", "even", "small"]
