"""#16: meet open_clip users where they are (label spaces, pretrained checkpoints, accum_freq, CLI, logs, export)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_config, write_config
from vlp.config import config_from_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255), "dog": (255, 255, 0)}


def _nearest_class(rgb) -> str:
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], map(int, rgb))))


@pytest.fixture(scope="module")
def two_label_orders(tmp_path_factory):
    """The same kind of classes written by `vlp shards folder` (sorted folder names: ant bee cat) and by
    `vlp shards hf` (ClassLabel order: cat dog ant bee): index 0 means ant in one, cat in the other."""
    import datasets

    from vlp.shards.readers import write_hf_dataset, write_image_folder

    root = tmp_path_factory.mktemp("labels")
    for name in ("cat", "ant", "bee"):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), COLORS[name]).save(root / "folder" / name / f"{i}.png")
    folder = write_image_folder(root / "folder", root / "a", maxcount=100)
    assert folder["classnames"] == ["ant", "bee", "cat"]
    hf_names = ["cat", "dog", "ant", "bee"]
    rows = [(Image.new("RGB", (32, 32), COLORS[n]), i) for i, n in enumerate(hf_names) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=hf_names)}))
    hf = write_hf_dataset(ds, root / "b", label_col="label", maxcount=100)
    assert hf["classnames"] == hf_names
    return root


def test_two_labeled_sources_share_one_label_space_by_class_name(two_label_orders, demo_data, tmp_path):
    from vlp.data.format import decode_image
    from vlp.train import Trainer

    root = two_label_orders
    tree = run_config(
        demo_data, tmp_path / "run",
        data={"sources": [{"name": "folder", "kind": "labeled", "shards": str(root / "a" / "*.tar")},
                          {"name": "hf", "kind": "labeled", "shards": str(root / "b" / "*.tar")}],
              "batch": {"labeled": 8}, "workers": 0, "augment": False,
              "templates": ["a photo of a {c}."]},
        model={"name": "vlp-test-vit", "mask_ratio": 0.0})
    tree["objectives"] = {"supervised": {"weight": 1.0}, "contrastive": {"weight": 1.0, "labels_as_text": True}}
    cfg = config_from_dict(tree)
    trainer = Trainer(cfg)
    try:
        assert trainer.classnames == ["ant", "bee", "cat", "dog"]  # first source's order, then new names
        assert trainer.task.num_classes == 4
        assert trainer.task.student.classifier.fc.out_features == 4
        for src in trainer.sources:  # every record's label names the class its image shows
            for n, rec in enumerate(src.records(seed=0, resampled=False, epochs=1)):
                rgb = np.asarray(decode_image(rec["image"]))[16, 16]
                assert trainer.classnames[rec["label"]] == _nearest_class(rgb), (src.name, rec["key"])
            assert n + 1 >= 12
        # the supervised head's targets in real batches, and the labels-as-text prompts, by name
        it = iter(trainer.dataset)
        seen = set()
        for _ in range(4):
            batch, _ = next(it)
            for i, label in enumerate(batch.label.tolist()):
                name = trainer.classnames[label]
                seen.add(name)
                text = trainer.tokenizer([f"a photo of a {name}."])[0]
                assert torch.equal(batch.text[i], text)
        assert {"dog", "ant", "cat"} <= seen
    finally:
        trainer.release()


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """A CLIP whose weights differ from any seed-0 init, as an export folder, a .safetensors and an open_clip_train
    .pt (``{"state_dict": {"module.*": ...}}``)."""
    from safetensors.torch import save_file

    from vlp.export import export_model
    from vlp.models.factory import create_clip

    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(1234)
    clip, model_cfg, _ = create_clip("vlp-test-vit")
    with torch.no_grad():
        clip.logit_scale.fill_(2.0)
    export_model(clip, model_cfg, root / "export")
    state = {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(root / "w.safetensors"))
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "epoch_3.pt")
    return root, state


def test_fine_tune_from_a_local_open_clip_checkpoint(open_clip_checkpoint, demo_data, tmp_path, caplog):
    """model.pretrained = a `vlp export` folder (model.name from its open_clip_config.json): the first step's image
    and text embeddings are the checkpoint's; no "initialized randomly" line; the log names the model."""
    import logging

    import open_clip

    from vlp.train import Trainer

    root, _ = open_clip_checkpoint
    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0},
                      train={"steps": 1, "save_every": 1, "log_every": 1, "progress": False})
    tree["model"] = {"pretrained": str(root / "export"), "mask_ratio": 0.0}  # no name: the folder's config
    tree["objectives"] = {"contrastive": {"weight": 1.0}}
    cfg = config_from_dict(tree)
    assert cfg.model.name == str(root / "export" / "open_clip_config.json")
    seen = {}

    class Capture(Trainer):
        def compute_loss(self, batch, micro):
            if self.step == 0:
                clip = self.task.unwrapped.clip
                with torch.no_grad():
                    seen["images"], seen["text"] = batch["image"].clone(), batch["text"].clone()
                    seen["img"], seen["txt"] = clip.encode_image(batch["image"]), clip.encode_text(batch["text"])
            return super().compute_loss(batch, micro)

    with caplog.at_level(logging.INFO):
        Capture(cfg).fit()
    ref, _, _ = open_clip.create_model_and_transforms(f"local-dir:{root / 'export'}")
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(seen["img"], ref.encode_image(seen["images"]), atol=1e-5)
        assert torch.allclose(seen["txt"], ref.encode_text(seen["text"]), atol=1e-5)
    assert "initialized randomly" not in caplog.text
    assert "Loaded built-in vlp-" not in caplog.text  # open_clip's INFO lines name the hashed config
    assert f"weights from model.pretrained {root / 'export'}" in caplog.text


@pytest.mark.parametrize("fmt", ["w.safetensors", "epoch_3.pt"])
def test_pretrained_weight_files(open_clip_checkpoint, fmt):
    from vlp.task import PretrainTask

    root, state = open_clip_checkpoint
    tree = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}},
            "model": {"name": "vlp-test-vit", "pretrained": str(root / fmt)}, "objectives": {"contrastive": 1.0}}
    task = PretrainTask(config_from_dict(tree, check_files=False))
    got = task.student.clip.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_pretrained_errors_and_lock_image(open_clip_checkpoint, tmp_path, caplog):
    import logging

    from vlp.config import ConfigError
    from vlp.task import PretrainTask

    root, _ = open_clip_checkpoint
    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}},
            "objectives": {"contrastive": 1.0}}
    with pytest.raises(ConfigError, match="model.pretrained: 'nope' is not a file, not a folder, not a known tag"):
        PretrainTask(config_from_dict({**base, "model": {"name": "vlp-test-vit", "pretrained": "nope"}},
                                      check_files=False))
    with pytest.raises(ConfigError, match="model.pretrained: .* does not fit model.name 'vlp-tiny-vit'"):
        PretrainTask(config_from_dict({**base, "model": {"name": "vlp-tiny-vit",
                                                         "pretrained": str(root / "w.safetensors")}},
                                      check_files=False))
    with caplog.at_level(logging.WARNING):
        task = PretrainTask(config_from_dict({**base, "model": {"name": "vlp-test-vit", "lock_image": True,
                                                                "lock_image_unlocked_groups": 2}}, check_files=False))
    assert "freezing a randomly initialized image tower" in caplog.text
    trainable = {n for n, p in task.student.clip.visual.named_parameters() if p.requires_grad}
    assert trainable and {"proj", "ln_post.weight"} <= trainable
    assert "conv1.weight" not in trainable


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_accum_freq_gradients_equal_one_big_batch(demo_data, tmp_path):
    """train.accum_freq=4 at 32 rows per micro-batch (UniCL contrastive over cached features + MAE + supervised,
    averaged per micro-batch): the trainer's step accumulates the gradients of one batch of 128."""
    from vlp.data.batch import Batch
    from vlp.objectives import combine
    from vlp.train import Trainer

    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0, "batch": {"paired": 24, "labeled": 8}},
                      optim={"grad_clip": None, "warmup_steps": 2},
                      train={"steps": 1, "accum_freq": 4, "progress": False})
    tree["data"]["sources"] = tree["data"]["sources"][:2]
    trainer = Trainer(config_from_dict(tree))
    try:
        task, model = trainer.task, trainer.task.student
        torch.nn.init.normal_(model.classifier.fc.weight, std=0.1)  # a zero-init head hides its gradient path
        it = iter(trainer.dataset)
        batches = [next(it)[0] for _ in range(4)]
        merged = Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                         ("image", "text", "has_text", "label", "kind")))
        assert merged.image.shape[0] == 128
        noise = torch.cat([task.masking_noise(b, 0, j) for j, b in enumerate(batches)])
        combine(task.objectives, model(merged, noise=noise), merged)[0].backward()
        single = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        captured = {}

        def capture_step(*a, **k):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        trainer.optimizer.step = capture_step
        assert trainer.train_step(batches) is not None
        assert set(captured) == set(single)
        flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
        assert flat(single).abs().max() > 1e-3
        assert torch.allclose(flat(captured), flat(single), atol=1e-5, rtol=0)
    finally:
        trainer.release()


def test_overrides_in_any_position_and_a_longer_resumed_run_says_its_schedule_is_rebuilt(demo_data, tmp_path, caplog):
    import logging

    from vlp import checkpoint as ckpt_io
    from vlp.cli import main

    run_dir = tmp_path / "run"
    tree = run_config(demo_data, run_dir, data={"workers": 0, "batch": {"paired": 4}},
                      train={"steps": 2, "save_every": 2, "progress": False})
    tree["data"]["sources"] = tree["data"]["sources"][1:2]
    tree["objectives"] = {"contrastive": 1.0}
    path = write_config(tmp_path / "c.yaml", tree)
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(path)]) == 0
        assert main(["train", "--config", str(path), "train.save_every=1", "--resume", "auto", "train.steps=3"]) == 0
    assert ckpt_io.read_run_info(run_dir)["step"] == 3
    assert "train.steps 2 -> 3 on resume: the warmup + cosine lr schedule" in caplog.text
    # #16 item 6: train.progress=false logs a plain line per log_every; no accelerate / open_clip INFO lines
    lines = [r.getMessage() for r in caplog.records if r.name == "vlp.train" and r.getMessage().startswith("step ")]
    assert lines[0].startswith("step 1/2 loss/contrastive ") and " lr " in lines[0] and " samples/s " in lines[0]
    assert any(m.startswith("step 3/3 ") for m in lines)
    assert not [r for r in caplog.records if r.name.startswith("accelerate") and r.levelno < logging.WARNING]
    assert "Loaded built-in" not in caplog.text and "initialized randomly" not in caplog.text
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "--resume", "auto", "--bogus"])


def test_config_error_lines_without_pydantic_noise():
    from vlp.config import ConfigError

    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 0}},
            "objectives": {"contrastive": 1.0}}
    cases = [(base, "data.batch: every kind is 0"),
             ({**base, "data": {**base["data"], "batch": {"paired": 2, "labeled": 3}}},
              "data.batch.labeled: 3 samples asked but no source of kind 'labeled'"),
             ({**base, "data": {**base["data"], "batch": {"paired": 2}}, "objectives": {"contrastive": 0}},
              "objectives: at least one objective needs a weight > 0")]
    for tree, expected in cases:
        with pytest.raises(ConfigError) as err:
            config_from_dict(tree, check_files=False)
        assert str(err.value) == expected


def test_progress_bar_shows_every_loss():
    from vlp.train_log import bar_postfix

    m = {"loss/total": 1.5, "loss/contrastive": 1.0, "loss/mae": 0.25, "lr": 3e-4, "samples_per_s": 812.4,
         "grad_norm": 2.0}
    assert bar_postfix(m) == {"total": "1.500", "contrastive": "1.000", "mae": "0.250", "lr": "0.0003", "sps": "812"}


def test_plot_has_lr_panel_linear_losses_and_a_visible_single_eval(tmp_path):
    import matplotlib.pyplot as plt

    from vlp.plot import plot_figure, plot_run, read_metrics

    recs = [{"step": s, "loss/total": 3.0 - 0.1 * s, "loss/dino": -0.5 + 0.01 * s, "lr": 1e-3 * s / 10}
            for s in range(1, 11)] + [{"step": 10, "zeroshot/top1": 0.4, "zeroshot/top5": 0.9, "zeroshot/n": 100}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    fig = plot_figure(read_metrics(tmp_path), "run")
    loss_ax, lr_ax, eval_ax = fig.axes
    assert loss_ax.get_yscale() == "linear" and loss_ax.get_ylim()[0] < 0  # a negative loss plots
    assert lr_ax.get_ylabel() == "learning rate" and len(lr_ax.lines[0].get_xdata()) == 10
    assert {ln.get_label() for ln in eval_ax.lines} == {"zeroshot/top1", "zeroshot/top5"}
    assert all(ln.get_marker() == "o" and len(ln.get_xdata()) == 1 for ln in eval_ax.lines)
    plt.close(fig)
    assert plot_run(tmp_path).is_file()


def test_knobs_epochs_compile_grad_checkpointing_wandb(demo_data, tmp_path):
    """#16 item 7: train.epochs + train.num_samples instead of steps; model.grad_checkpointing (same gradients);
    train.compile (the student's forward compiled in place, names unchanged); log.wandb needs wandb."""
    import importlib.util

    from vlp.config import ConfigError
    from vlp.task import PretrainTask, transformer_blocks
    from vlp.train import Trainer

    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0},
                      train={"epochs": 2, "num_samples": 100, "progress": False, "compile": True})
    del tree["train"]["steps"]
    trainer = Trainer(config_from_dict(tree))
    try:
        assert trainer.cfg.train.steps == 13  # ceil(2 x 100 / 16)
        assert trainer.cfg.train.epochs is None
        blocks = transformer_blocks(trainer.task.student)  # #29: regional, every block of both towers
        assert len(blocks) >= 3 and all(b._compiled_call_impl is not None for b in blocks)
        assert all(not n.startswith("_orig_mod") for n in trainer.task.student.state_dict())
    finally:
        trainer.release()
    with pytest.raises(ConfigError, match="train.epochs: needs train.num_samples"):  # #31: at start, with no sizes.json
        PretrainTask(config_from_dict({**tree, "data": {**tree["data"], "sources": [
            {"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}}, "train": {"epochs": 1},
            "objectives": {"contrastive": 1.0}}, check_files=False))
    with pytest.raises(ConfigError, match="not both"):
        config_from_dict({**tree, "train": {"epochs": 1, "num_samples": 5, "steps": 3}}, check_files=False)
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ConfigError, match="log.wandb: the wandb package is not installed"):
            config_from_dict({**tree, "log": {"wandb": True}}, check_files=False)

    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 4}},
            "model": {"name": "vlp-test-vit", "mask_ratio": 0.5}, "objectives": {"contrastive": 1.0}}
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        task = PretrainTask(config_from_dict({**base, "model": {**base["model"], "grad_checkpointing": ckpt}},
                                             check_files=False))
        assert task.student.clip.visual.transformer.grad_checkpointing is ckpt
        g = torch.Generator().manual_seed(0)
        from vlp.data.batch import Batch
        batch = Batch(torch.randn(4, 3, 32, 32, generator=g), task.tokenizer(["a", "b", "c", "d"]),
                      torch.ones(4, dtype=torch.bool), torch.full((4,), -1), torch.zeros(4, dtype=torch.long))
        task.student.train()
        task.training_forward(batch, 0)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in task.student.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_reference_is_generated_and_current(capsys):
    """docs/config.md is `vlp config --schema`; the README maps open_clip_train's flags."""
    from vlp.cli import main

    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    assert "| `train.accum_freq` |" in out and "| `model.pretrained` |" in out and "| `objectives.mae.decoder_width` |" in out
    assert (REPO / "docs" / "config.md").read_text() == out, "regenerate: vlp config --schema > docs/config.md"
    readme = (REPO / "README.md").read_text()
    for flag in ("--model", "--pretrained", "--accum-freq", "--local-loss", "--coca", "--torchcompile", "--siglip"):
        assert f"`{flag}" in readme, flag


def test_inspect_missing_path_fails_and_writers_resize_like_img2dataset(tmp_path, capsys):
    """#16: `vlp shards inspect /no/such/path` printed a summary and exited 0; --image-size / --resize-mode are
    img2dataset's modes; transparent pixels come out white."""
    import io as _io

    import webdataset as _wds
    from PIL import Image as _Image

    from vlp.cli import main
    from vlp.shards.write import resize_image

    assert main(["shards", "inspect", str(tmp_path / "no" / "such")]) == 2
    assert "no such shard" in capsys.readouterr().err
    im = _Image.new("RGB", (40, 20), (10, 20, 30))
    assert resize_image(im, 10, "keep_ratio").size == (20, 10)
    assert resize_image(im, 10, "center_crop").size == (10, 10)
    bordered = resize_image(im, 10, "border")
    assert bordered.size == (10, 10) and bordered.getpixel((5, 0)) == (255, 255, 255)
    assert resize_image(im, 10, "no").size == (40, 20)
    root = tmp_path / "folder" / "a"
    root.mkdir(parents=True)
    clear = _Image.new("RGBA", (30, 60), (0, 0, 0, 0))
    clear.paste((0, 0, 255, 255), (0, 0, 30, 10))
    clear.save(root / "x.png")
    assert main(["shards", "folder", str(tmp_path / "folder"), str(tmp_path / "out"), "--image-size", "16",
                 "--resize-mode", "center_crop"]) == 0
    sample = next(iter(_wds.WebDataset(str(tmp_path / "out" / "shard-000000.tar"), shardshuffle=False)))
    with _Image.open(_io.BytesIO(sample["jpg"])) as out:
        assert out.size == (16, 16)
        r, g, b = out.convert("RGB").getpixel((8, 8))
        assert min(r, g, b) > 240  # the transparent centre: white, not black
    assert main(["shards", "folder", str(tmp_path / "folder"), str(tmp_path / "o2"), "--resize-mode", "border"]) == 2
    # training and eval decode a transparent PNG in a shard (img2dataset keeps PNGs) on white too
    from vlp.data.format import decode_image

    buf = _io.BytesIO()
    clear.save(buf, format="PNG")
    assert decode_image(buf.getvalue()).getpixel((15, 40)) == (255, 255, 255)
    assert decode_image(buf.getvalue()).getpixel((15, 5)) == (0, 0, 255)


# ---- #31: habits of open_clip_train users ---------------------------------------------------------------------

def _paired_tree(demo_data, run_dir, **sections):
    """A contrastive-only run on the digits' paired shards (no mask_ratio: the default)."""
    train = {"steps": 1, "save_every": 1, "log_every": 1, "progress": False, **sections.pop("train", {})}
    tree = run_config(demo_data, run_dir, data={"workers": 0, "batch": {"paired": 8}}, train=train, **sections)
    tree["data"]["sources"] = tree["data"]["sources"][1:2]
    tree["model"] = {k: v for k, v in tree["model"].items() if k != "mask_ratio"}
    tree["objectives"] = {"contrastive": {"weight": 1.0}}
    return tree


def test_siglip_on_an_ordinary_model_starts_as_open_clip_train_siglip(demo_data, tmp_path):
    """#31 item 1: objectives.contrastive.loss=siglip on a model config without init_logit_bias trained (it raised
    KeyError 'logit_bias'); its logit scale and bias start as open_clip_train's --siglip sets them, and the
    export loads in open_clip with the bias."""
    import numpy as np
    import open_clip

    from vlp.export.cli import export_checkpoint
    from vlp.train import Trainer

    tree = _paired_tree(demo_data, tmp_path / "run", optim={"lr": 1e-12, "warmup_steps": 1})
    tree["objectives"]["contrastive"]["loss"] = "siglip"
    trainer = Trainer(config_from_dict(tree))
    clip = trainer.task.student.clip
    # open_clip_train/main.py, `if args.siglip:` model_kwargs init_logit_scale=np.log(10), init_logit_bias=-10
    open_clip.add_model_config(REPO / "configs" / "models" / "vlp-test-vit.json")
    ref = open_clip.create_model("vlp-test-vit", init_logit_scale=np.log(10), init_logit_bias=-10)
    assert torch.allclose(clip.logit_scale, ref.logit_scale) and torch.allclose(clip.logit_bias, ref.logit_bias)
    result = trainer.fit()
    assert np.isfinite(result["loss/contrastive"])
    out = export_checkpoint(tmp_path / "run", tmp_path / "export")
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert loaded.logit_bias is not None and abs(float(loaded.logit_bias.detach()) + 10) < 1e-3


def _normalize(preprocess):
    from torchvision.transforms import Normalize

    norm = [t for t in preprocess.transforms if isinstance(t, Normalize)]
    return tuple(round(float(x), 4) for x in norm[0].mean), tuple(round(float(x), 4) for x in norm[0].std)


def test_fine_tune_keeps_the_pretrained_mean_std_and_a_preprocess_cfg_model_json_trains(demo_data, tmp_path):
    """#31 item 2: a fine-tune from an export whose mean/std is 0.5 trains with and exports 0.5 (it trained with
    and re-exported OpenAI's); a model JSON holding preprocess_cfg trains (TypeError before); model.image_mean /
    model.image_std (open_clip_train's --image-mean/--image-std) win."""
    import open_clip
    from open_clip.model import set_model_preprocess_cfg

    from vlp.export import export_model
    from vlp.export.cli import export_checkpoint
    from vlp.models.factory import create_clip, load_clip
    from vlp.task import PretrainTask
    from vlp.train import Trainer

    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    clip, model_cfg, _ = create_clip("vlp-test-vit")
    set_model_preprocess_cfg(clip, {**clip.visual.preprocess_cfg, "mean": half[0], "std": half[1]})
    export_model(clip, model_cfg, tmp_path / "start")
    assert _normalize(open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'start'}")[2]) == half

    tree = _paired_tree(demo_data, tmp_path / "run")
    tree["model"] = {"pretrained": str(tmp_path / "start")}
    trainer = Trainer(config_from_dict(tree))
    assert _normalize(trainer.eval_preprocess) == half
    assert _normalize(trainer.dataset.transform) == half
    trainer.fit()
    assert _normalize(load_clip(tmp_path / "run")[3]) == half
    out = export_checkpoint(tmp_path / "run", tmp_path / "export")
    assert _normalize(open_clip.create_model_and_transforms(f"local-dir:{out}")[2]) == half

    model_json = json.loads((REPO / "configs" / "models" / "vlp-test-vit.json").read_text())
    model_json["preprocess_cfg"] = {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]}
    (tmp_path / "pp.json").write_text(json.dumps(model_json))
    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}},
            "objectives": {"contrastive": 1.0}}
    task = PretrainTask(config_from_dict({**base, "model": {"name": str(tmp_path / "pp.json")}}, check_files=False))
    assert tuple(task.student.clip.visual.image_mean) == (0.4, 0.4, 0.4)
    assert task.cfg.model.image_std == (0.2, 0.2, 0.2)  # recorded in the run's config
    from vlp.data.batch import Batch
    batch = Batch(torch.rand(2, 3, 32, 32), task.tokenizer(["a", "b"]), torch.ones(2, dtype=torch.bool),
                  torch.full((2,), -1), torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(task.training_forward(batch, 0)[0])
    task = PretrainTask(config_from_dict({**base, "model": {"name": str(tmp_path / "pp.json"),
                                                            "image_mean": [0.1, 0.2, 0.3]}}, check_files=False))
    assert tuple(task.student.clip.visual.image_mean) == (0.1, 0.2, 0.3)
    assert tuple(task.student.clip.visual.image_std) == (0.2, 0.2, 0.2)


def test_patch_masking_is_off_unless_an_objective_needs_it_or_it_is_asked(demo_data, tmp_path, caplog):
    """#31 item 3: a fine-tune config that names only model.pretrained trained at mask_ratio 0.75 without a word;
    now 0 (the first step's image features are the unmasked tower's), 0.75 with MAE, an explicit value wins, and
    masking says so in the log."""
    import logging

    from vlp.task import PretrainTask

    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}},
            "objectives": {"contrastive": 1.0}, "model": {"name": "vlp-test-vit"}}
    mae = {"contrastive": 1.0, "mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}}
    assert config_from_dict(base, check_files=False).model.mask_ratio == 0.0
    assert config_from_dict({**base, "objectives": mae}, check_files=False).model.mask_ratio == 0.75
    assert config_from_dict({**base, "model": {"mask_ratio": 0.5}, "objectives": mae},
                            check_files=False).model.mask_ratio == 0.5
    assert config_from_dict({**base, "objectives": {**mae, "mae": {**mae["mae"], "weight": 0}}},
                            check_files=False).model.mask_ratio == 0.0
    with caplog.at_level(logging.INFO):
        task = PretrainTask(config_from_dict(base, check_files=False))
    assert "patch masking" not in caplog.text
    from vlp.data.batch import Batch
    images = torch.rand(2, 3, 32, 32)
    batch = Batch(images, task.tokenizer(["a", "b"]), torch.ones(2, dtype=torch.bool), torch.full((2,), -1),
                  torch.zeros(2, dtype=torch.long))
    task.student.train()
    with torch.no_grad():
        out = task.student(batch, noise=task.masking_noise(batch, 0, 0))
        ref = torch.nn.functional.normalize(task.student.clip.encode_image(images), dim=-1)
    assert "mask" not in out and torch.allclose(out["image_features"], ref, atol=1e-6)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        PretrainTask(config_from_dict({**base, "objectives": mae}, check_files=False))
    assert "patch masking on: ratio 0.75 (model.mask_ratio)" in caplog.text


def test_in_training_zeroshot_equals_vlp_eval_on_the_same_weights_and_shards(demo_data, tmp_path):
    """#31 item 4: in-training zero-shot used the run's templates (data.templates) over the eval shards'
    zeroshot_classification_templates.txt; now both resolve class names and templates the same way, so the
    final step's eval equals `vlp eval` of the saved checkpoint."""
    from vlp.cli import main

    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0, "batch": {"paired": 16, "labeled": 16}},
                      optim={"lr": 1e-3, "warmup_steps": 5},
                      train={"steps": 30, "save_every": 30, "log_every": 30, "progress": False},
                      eval={"zeroshot": {"shards": str(demo_data / "test" / "*.tar")}, "batch_size": 64})
    tree["data"]["sources"] = tree["data"]["sources"][:2]
    tree["objectives"] = {"contrastive": {"labels_as_text": True}}
    tree["data"]["templates"] = ["{c}"]
    path = write_config(tmp_path / "c.yaml", tree)
    assert main(["train", "--config", str(path)]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in records if "zeroshot/top1" in r][-1]
    assert main(["eval", "--model", str(tmp_path / "run"), "--data", str(demo_data / "test" / "*.tar"),
                 "--output", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated["n"] == training["zeroshot/n"] == 300
    for key in ("top1", "top5"):
        assert training[f"zeroshot/{key}"] == pytest.approx(evaluated[key], abs=1e-9), key
    from vlp.eval.tasks import zeroshot_labels
    from vlp.data.format import read_lines
    shards = str(demo_data / "test" / "*.tar")
    assert zeroshot_labels(shards, default_templates=["{c}"])[1] == \
        read_lines(demo_data / "test" / "zeroshot_classification_templates.txt")


def test_open_clip_habits_resume_latest_epochs_override_null_and_indexed_keys(demo_data, tmp_path, caplog):
    """#31 item 5: --resume latest (open_clip_train's: the latest checkpoint if any, else fresh); train.epochs
    on the command line replaces the YAML's train.steps; train.steps=null is the default; epochs without
    num_samples count the sizes.json samples; data.sources[0].shards= (as errors print it) and
    data.sources.0.shards= both set the key."""
    import logging
    import math

    from vlp import checkpoint as ckpt_io
    from vlp.cli import main
    from vlp.config import ConfigError, load_config
    from vlp.task import PretrainTask

    run_dir = tmp_path / "run"
    tree = _paired_tree(demo_data, run_dir, train={"steps": 2, "save_every": 2, "progress": False})
    path = write_config(tmp_path / "c.yaml", tree)
    with caplog.at_level(logging.INFO):
        assert main(["train", "--config", str(path), "--resume", "latest"]) == 0  # nothing yet: fresh
        assert main(["train", "--config", str(path), "--resume", "latest", "train.steps=3"]) == 0
    assert ckpt_io.read_run_info(run_dir)["step"] == 3 and "resumed from" in caplog.text

    cfg = load_config(path, ["train.epochs=1", "train.num_samples=64"])
    assert cfg.train.epochs == 1 and "steps" not in cfg.train.model_fields_set
    assert PretrainTask(cfg).cfg.train.steps == 8  # ceil(64 / 8)
    assert load_config(path, ["train.steps=null"]).train.steps == 1000
    cfg = load_config(path, ["train.epochs=2"])  # num_samples: the paired shards' sizes.json
    sizes = json.loads((demo_data / "paired" / "sizes.json").read_text())
    assert PretrainTask(cfg).cfg.train.steps == math.ceil(2 * sum(sizes.values()) / 8)

    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.shards: no file matches") as err:
        load_config(path, [f"data.sources[0].shards={tmp_path / 'none-*.tar'}"])
    key = str(err.value).split(":")[0]
    other = str(demo_data / "labeled" / "*.tar")
    assert load_config(path, [f"{key}={other}"]).data.sources[0].shards == other
    assert load_config(path, [f"data.sources.0.shards={other}"]).data.sources[0].shards == other
