"""The whole path on real parts: digits shards -> mixed training -> checkpoint -> zero-shot -> export ->
open_clip loads the export -> the same embeddings and the same zero-shot numbers."""
import json

import numpy as np
import open_clip
import pytest
import torch

from conftest import run_config
from vlp import checkpoint as ckpt_io
from vlp.cli import main as vlp_main
from vlp.config import config_from_dict
from vlp.models.factory import load_clip
from vlp.plot import read_metrics
from vlp.train import Trainer

STEPS = 200


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = run_config(
        demo_data, run_dir,
        # a light mask: this 2-layer, 16-patch ViT has only 4 visible patches left at FLIP's 75%
        model={"name": "vlp-test-vit", "mask_ratio": 0.25},
        data={"batch": {"paired": 16, "labeled": 16, "unlabeled": 16}},
        optim={"lr": 3e-3, "warmup_steps": 30},
        train={"steps": STEPS, "log_every": 5, "save_every": 100, "eval_every": 100, "progress": False},
        eval={"zeroshot": {"shards": str(demo_data / "test" / "*.tar")}},
    )
    result = Trainer(config_from_dict(cfg)).fit()
    return run_dir, result


def test_every_objective_loss_decreases(trained):
    run_dir, result = trained
    records = [r for r in read_metrics(run_dir) if "loss/total" in r]
    last = records[-1]
    assert last["step"] == STEPS
    for key in ("loss/contrastive", "loss/mae", "loss/supervised", "loss/total"):
        early = np.mean([r[key] for r in records[:2]])
        late = np.mean([r[key] for r in records[-2:]])
        assert late < 0.9 * early, (key, early, late)
    assert {"lr", "samples_per_s", "data_wait_frac", "contrastive/logit_scale", "samples_per_s/paired",
            "bad_samples/lab"} <= set(last)
    assert (run_dir / "tb").is_dir() and any((run_dir / "tb").rglob("events.out.tfevents*"))


def test_periodic_zero_shot_evaluation_logged(trained):
    run_dir, result = trained
    evals = [r for r in read_metrics(run_dir) if "zeroshot/top1" in r]
    assert [r["step"] for r in evals] == [100, 200]
    assert result["zeroshot/top1"] == evals[-1]["zeroshot/top1"]
    assert result["zeroshot/top1"] > 0.3  # chance is 0.1 on the 10 digits
    assert ckpt_io.read_run_info(run_dir)["eval"]["zeroshot/top1"] == result["zeroshot/top1"]


def test_export_loads_in_open_clip_with_equal_embeddings_and_zero_shot(trained, demo_data, tmp_path, capsys):
    run_dir, result = trained
    out = tmp_path / "export"
    assert vlp_main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md"} <= files
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in out.rglob("*"))

    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    exported.eval()
    ckpt_model, _, ckpt_tok, _ = load_clip(run_dir)
    images = torch.randn(4, 3, 32, 32)
    text = ["a photo of the digit seven.", "the number two."]
    with torch.no_grad():
        assert torch.allclose(exported.encode_image(images), ckpt_model.encode_image(images), atol=1e-5)
        assert torch.equal(tokenizer(text), ckpt_tok(text))
        assert torch.allclose(exported.encode_text(tokenizer(text)), ckpt_model.encode_text(ckpt_tok(text)),
                              atol=1e-5)
    # no MAE decoder or classifier head in the export
    assert not any(k.startswith(("mae_decoder", "classifier")) for k in exported.state_dict())

    # the card renders the run's real zero-shot number
    card = (out / "README.md").read_text()
    assert f"{result['zeroshot/top1']:.4f}"[:5] in card or f"{100 * result['zeroshot/top1']:.1f}" in card

    # vlp eval on the checkpoint and on the export give the same numbers, equal to the trainer's
    data = str(demo_data / "test" / "*.tar")
    numbers = []
    for model_path in (run_dir, out):
        res_file = tmp_path / f"{model_path.name}.json"
        assert vlp_main(["eval", "--model", str(model_path), "--task", "zeroshot", "--data", data,
                         "--templates", "a photo of the digit {c}.", "--output", str(res_file)]) == 0
        numbers.append(json.loads(res_file.read_text())["metrics"])
    assert numbers[0]["top1"] == numbers[1]["top1"] and numbers[0]["top5"] == numbers[1]["top5"]

    # and equal to open_clip's own zero-shot utilities on the export, computed here by hand
    from vlp.eval.data import labeled_loader

    classnames = (demo_data / "test" / "classnames.txt").read_text().split()
    clf = open_clip.build_zero_shot_classifier(exported, tokenizer, classnames,
                                               [lambda c: f"a photo of the digit {c}."])
    correct = n = 0
    with torch.no_grad():
        for x, y in labeled_loader(data, preprocess, batch_size=100):
            f = torch.nn.functional.normalize(exported.encode_image(x), dim=-1)
            correct += (f @ clf).argmax(-1).eq(y).sum().item()
            n += len(y)
    assert n == 300
    assert numbers[1]["top1"] == pytest.approx(correct / n, abs=1e-9)
