"""#31 item 6: smaller surprises an open_clip user hits (model card, export --push offline, zeroshot predict,
clip_benchmark's layout for the demo's test shards, the training log's ETA and lr, docs)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

from conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _vlp(*args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "vlp.cli", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A run directory with one checkpoint in the trainer's layout (``clip.``-prefixed weights of the tiny ViT)."""
    from vlp.models.factory import create_clip

    run = tmp_path_factory.mktemp("run")
    ckpt = run / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    model, _, _ = create_clip("vlp-test-vit")
    save_file({f"clip.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    config = {"output_dir": str(run), "model": {"name": "vlp-test-vit"},
              "data": {"sources": [{"name": "pairs", "kind": "paired", "shards": "/nowhere/p-{0..3}.tar"}],
                       "batch": {"paired": 8}},
              "objectives": {"contrastive": {"weight": 1.0}}, "train": {"steps": 4}}
    (ckpt / "config.yaml").write_text(yaml.safe_dump(config))
    (ckpt / "vlp_state.json").write_text(json.dumps({"step": 4, "samples_seen": {"paired": 32}, "metrics": {},
                                                     "world_size": 1}))
    return run


def _front_matter(readme: str) -> dict:
    return yaml.safe_load(readme.split("\n---\n", 1)[0].removeprefix("---\n"))


def _snippet(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_card_snippets_run_from_another_folder_and_vision_card_names_timm(checkpoint, tmp_path, monkeypatch):
    """The card's how-to-load code carried the export's relative --out and failed from any other folder; the
    vision-only (timm layout) card said library_name: open_clip."""
    from vlp.export.cli import export_checkpoint

    monkeypatch.chdir(tmp_path)
    export_checkpoint(checkpoint, "exports/clip")
    export_checkpoint(checkpoint, "exports/vision", vision_only=True)
    clip_card = (tmp_path / "exports/clip/README.md").read_text()
    vision_card = (tmp_path / "exports/vision/README.md").read_text()
    assert _front_matter(clip_card)["library_name"] == "open_clip"
    assert _front_matter(vision_card)["library_name"] == "timm"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (_snippet(clip_card) + "print('clip', model.encode_image(torch.zeros(1, 3, 32, 32)).shape)\n"
            + _snippet(vision_card) + "print('vision', visual(torch.zeros(1, 3, 32, 32)).shape, "
            "backbone(torch.zeros(1, 3, 32, 32)).shape)\n")
    run = subprocess.run([sys.executable, "-c", "import torch\n" + code], cwd=elsewhere, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "clip torch.Size([1, 32])" in run.stdout and "vision torch.Size([1, 32]) torch.Size([1, 32])" in run.stdout


def test_card_with_a_repo_names_it_and_one_without_a_folder_has_a_placeholder(checkpoint):
    from vlp.export.card import render_model_card
    from vlp.models.factory import create_clip

    _, model_cfg, _ = create_clip("vlp-test-vit")
    pushed = render_model_card({"repo_id": "org/tiny", "local_dir": "exports/x"}, model_cfg)
    assert 'create_model_and_transforms("hf-hub:org/tiny")' in pushed and "exports/x" not in pushed
    bare = _snippet(render_model_card({}, model_cfg))
    assert 'create_model_and_transforms("local-dir:/path/to/this/folder")' in bare


def test_export_push_offline_is_one_line_and_keeps_the_export(checkpoint, tmp_path):
    """`vlp export --push` with no network was a traceback; now one line, exit 1, the local export written."""
    run = _vlp("export", "--checkpoint", checkpoint, "--out", "exports/clip", "--push", "org/tiny", cwd=tmp_path)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("export error")]
    assert len(errors) == 1 and "org/tiny" in errors[0] and str(Path("exports/clip")) in errors[0], run.stderr
    assert (tmp_path / "exports/clip/open_clip_model.safetensors").is_file()
    assert (tmp_path / "exports/clip/README.md").is_file()


def test_zeroshot_predict_reads_folders_and_prints_json(checkpoint, tmp_path, capsys):
    """`vlp zeroshot predict` had no --json and took a folder for an unreadable image (IsADirectoryError)."""
    from PIL import Image

    from vlp.cli import main
    from vlp.eval.zeroshot import build_classifier, save_classifier
    from vlp.export.cli import export_checkpoint
    from vlp.models.factory import load_clip

    export = export_checkpoint(checkpoint, tmp_path / "export")
    model, _, tokenizer, _ = load_clip(export)
    classes = ["red", "green", "blue"]
    save_classifier(tmp_path / "clf.safetensors", build_classifier(model, tokenizer, classes, ["a {c} square."]),
                    classes, ["a {c} square."])
    (tmp_path / "imgs" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "imgs" / "a.png")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(tmp_path / "imgs" / "deeper" / "b.JPG", format="JPEG")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    single = tmp_path / "c.png"
    Image.new("RGB", (32, 32), (10, 200, 10)).save(single)
    want = [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "deeper" / "b.JPG"), str(single)]

    run = _vlp("zeroshot", "predict", "--model", export, "--classifier", tmp_path / "clf.safetensors", "--topk", 2,
               "--json", tmp_path / "imgs", single, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    assert [r["image"] for r in results] == want
    for r in results:
        assert len(r["top"]) == 2 and {t["class"] for t in r["top"]} <= set(classes)
        assert r["top"][0]["prob"] >= r["top"][1]["prob"] and sum(t["prob"] for t in r["top"]) <= 1 + 1e-6

    assert main(["zeroshot", "predict", "--model", str(export), "--classifier", str(tmp_path / "clf.safetensors"),
                 str(tmp_path / "imgs")]) == 0
    out = capsys.readouterr().out
    assert "unreadable" not in out and want[0] in out and want[1] in out
    (tmp_path / "empty").mkdir()
    assert main(["zeroshot", "predict", "--model", str(export), "--classifier", str(tmp_path / "clf.safetensors"),
                 str(tmp_path / "empty")]) == 1
    assert "no image files" in capsys.readouterr().err


def test_demo_test_shards_are_a_clip_benchmark_webdataset(demo_data):
    """clip_benchmark's build_wds_dataset reads ROOT/test/nshards.txt, ROOT/test/{0..n-1}.tar and ROOT/classnames.txt
    (+ templates); the demo wrote none of nshards.txt, those names, nor the root files."""
    import webdataset as wds

    nshards = int((demo_data / "test" / "nshards.txt").read_text())
    assert nshards == 3  # 300 test digits, 100 a shard
    pattern = str(demo_data / "test" / f"{{0..{nshards - 1}}}.tar")
    rows = list(wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg", "cls"))
    assert len(rows) == 300 and {int(y) for _, y in rows} == set(range(10))
    classes = [line.strip() for line in (demo_data / "classnames.txt").read_text().splitlines() if line.strip()]
    assert classes == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert (demo_data / "zeroshot_classification_templates.txt").read_text().count("{c}") == 3
    sizes = json.loads((demo_data / "test" / "sizes.json").read_text())
    assert sizes == {f"{i}.tar": 100 for i in range(3)}
    # vlp's own readers still find everything: the folder spec, its class names and templates
    from vlp.eval.data import expand_urls, find_classnames, find_templates

    assert len(expand_urls(str(demo_data / "test"))) == 3
    assert find_classnames(str(demo_data / "test" / "*.tar")) == classes
    assert len(find_templates(str(demo_data / "test" / "*.tar"))) == 3
    try:  # clip_benchmark itself, where installed
        from clip_benchmark.datasets.builder import build_wds_dataset
    except ImportError:
        return
    ds = build_wds_dataset("wds/digits", transform=lambda im: im.size, split="test", data_dir=str(demo_data))
    assert len(list(ds)) == 300 and ds.classes == classes


def test_plain_log_line_has_an_eta_and_logs_the_lr_of_the_step_taken(demo_data, tmp_path, caplog):
    """Off a terminal the log line had no ETA; the logged lr was the next step's (the scheduler had moved on)."""
    import logging

    from conftest import run_config
    from vlp.config import config_from_dict
    from vlp.optim import warmup_cosine
    from vlp.train import Trainer
    from vlp.train_log import log_line

    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0, "batch": {"paired": 4}},
                      optim={"lr": 1e-3, "warmup_steps": 3},
                      train={"steps": 5, "log_every": 1, "save_every": 5, "progress": False})
    tree["data"]["sources"] = [s for s in tree["data"]["sources"] if s["kind"] == "paired"]
    tree["objectives"] = {"contrastive": {"weight": 1.0}}
    trainer = Trainer(config_from_dict(tree))
    with caplog.at_level(logging.INFO, logger="vlp.train"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 5 and all(re.search(r" eta \d+:\d\d:\d\d$", line) for line in lines), lines
    assert lines[-1].endswith(" eta 0:00:00")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["lr"] for r in records if "lr" in r}
    schedule = warmup_cosine(3, 5)
    assert logged == pytest.approx({s: 1e-3 * schedule(s - 1) for s in range(1, 6)})  # step s took index s - 1
    assert logged[1] == pytest.approx(1e-3 / 3) and logged[3] == pytest.approx(1e-3)  # warmup's first and peak
    assert log_line({"loss/total": 1.0, "lr": 1e-3, "samples_per_s": 10.0}, 3725.4).endswith("eta 1:02:05")


def test_config_docs_describe_augment_and_accum_freq_rows_as_they_are():
    """docs/config.md put train.accum_freq's text in grad_accum's row and said data.augment flips (it never did:
    open_clip's train transform has no flip)."""
    from torchvision import transforms as T

    from vlp.data.transforms import train_transform
    from vlp.models.factory import create_clip
    from vlp.schema import config_reference

    model, _, _ = create_clip("vlp-test-vit")
    ops = train_transform(model).transforms
    assert any(isinstance(t, T.RandomResizedCrop) for t in ops)
    assert not any(isinstance(t, (T.RandomHorizontalFlip, T.RandomVerticalFlip)) for t in ops)
    rows = {line.split("|")[1].strip(" `"): line.split("|")[4] for line in config_reference().splitlines()
            if line.startswith("| `")}
    assert "flip" not in rows["data.augment"].replace("no flip", "") and "RandomResizedCrop" in rows["data.augment"]
    assert "--accum-freq" in rows["train.accum_freq"] and "accum_freq" not in rows["train.grad_accum"]
    assert "--local-loss" in rows["objectives.contrastive.loss"]  # no such choice: said where the loss is chosen


def test_zeroshot_predict_refuses_a_thin_image_and_classifies_the_rest(checkpoint, tmp_path):
    """#30: predict decoded files itself, so a 1x100,000 PNG was scaled up to the model's size (the thin-image
    fault of eval shards); it now gets None with the reason, and the other files are still classified."""
    from PIL import Image

    from vlp.eval.zeroshot import build_classifier, predict
    from vlp.export.cli import export_checkpoint
    from vlp.models.factory import load_clip

    model, _, tokenizer, preprocess = load_clip(export_checkpoint(checkpoint, tmp_path / "export"))
    classes = ["red", "blue"]
    classifier = build_classifier(model, tokenizer, classes, ["a {c} square."])
    Image.new("RGB", (100_000, 1), (200, 10, 10)).save(tmp_path / "thin.png")
    Image.new("RGB", (32, 32), (10, 10, 200)).save(tmp_path / "ok.png")
    errors: dict = {}
    out = predict(model, preprocess, classifier, classes, [tmp_path / "thin.png", tmp_path / "ok.png"], k=1,
                  errors=errors)
    assert out[0] is None and "too thin" in errors[str(tmp_path / "thin.png")]
    assert out[1] is not None and out[1][0][0] in classes, errors
