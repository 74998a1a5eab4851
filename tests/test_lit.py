"""LiT (Zhai et al. 2022, locked-image text tuning) end to end through the real trainer: stage 1 trains an image
tower (supervised + MAE on the labeled and unlabeled digits), stage 2 starts from the stage-1 *run folder*
(``model.pretrained``, no export in between) with ``model.lock_image`` and trains the text tower contrastively on
the image-text rows; the image tower stays bit-identical, the text tower moves, zero-shot evaluation runs."""
import pytest
import torch

from conftest import REPO, run_config
from vlp.config import ConfigError, config_from_dict
from vlp.train import Trainer


def stage1_tree(shards, out_dir):
    tree = run_config(shards, out_dir, model={"name": "vlp-test-vit", "mask_ratio": 0.5},
                      data={"workers": 0, "batch": {"labeled": 8, "unlabeled": 8}},
                      train={"steps": 4, "log_every": 2, "save_every": 4, "progress": False})
    tree["data"]["sources"] = [s for s in tree["data"]["sources"] if s["kind"] != "paired"]
    tree["objectives"] = {"supervised": {"weight": 1.0},
                          "mae": {"weight": 1.0, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}}
    return tree


def stage2_tree(shards, out_dir, pretrained, **model):
    tree = run_config(shards, out_dir, model={"name": "vlp-test-vit", "mask_ratio": 0.0, "pretrained": str(pretrained),
                                              "lock_image": True, **model},
                      data={"workers": 0, "batch": {"paired": 16}},
                      train={"steps": 6, "log_every": 2, "save_every": 6, "eval_every": 6, "progress": False},
                      eval={"zeroshot": {"shards": str(shards / "test" / "*.tar")}})
    tree["data"]["sources"] = [s for s in tree["data"]["sources"] if s["kind"] == "paired"]
    tree["objectives"] = {"contrastive": {"weight": 1.0}}
    return tree


@pytest.fixture(scope="module")
def two_stages(demo_data, tmp_path_factory):
    from vlp.checkpoint import clip_state_dict, readable_checkpoint

    root = tmp_path_factory.mktemp("lit")
    Trainer(config_from_dict(stage1_tree(demo_data, root / "stage1"))).fit()
    tower = clip_state_dict(readable_checkpoint(root / "stage1"))
    result = Trainer(config_from_dict(stage2_tree(demo_data, root / "stage2", root / "stage1"))).fit()
    return root, tower, clip_state_dict(readable_checkpoint(root / "stage2")), result


def test_stage2_loads_the_stage1_image_tower_and_keeps_it_frozen(two_stages):
    _, tower, final, _ = two_stages
    visual = [k for k in tower if k.startswith("visual.")]
    assert visual and set(final) == set(tower)
    for k in visual:  # the locked tower (its projection included) is stage 1's, bit for bit
        assert torch.equal(final[k], tower[k]), k


def test_stage2_trains_the_text_tower(two_stages):
    _, tower, final, _ = two_stages
    text = [k for k in tower if not k.startswith("visual.")]
    moved = [k for k in text if not torch.equal(final[k], tower[k])]
    assert "text_projection" in moved and "token_embedding.weight" in moved
    assert any(k.startswith("transformer.resblocks.") for k in moved)


def test_stage2_zero_shot_eval_runs(two_stages):
    from vlp.plot import read_metrics

    root, _, _, result = two_stages
    assert 0.0 <= result["zeroshot/top1"] <= 1.0
    assert [r["step"] for r in read_metrics(root / "stage2") if "zeroshot/top1" in r] == [6]


def test_pretrained_accepts_a_run_folder_a_checkpoint_folder_and_an_export(two_stages, tmp_path):
    """model.pretrained: the stage-1 run folder (its newest readable checkpoint), one of its checkpoint folders,
    and the `vlp export` of it give the same weights; a run folder without a checkpoint is a one-line ConfigError."""
    from vlp.checkpoint import clip_state_dict, list_checkpoints
    from vlp.export.cli import export_checkpoint
    from vlp.task import PretrainTask

    root, tower, _, _ = two_stages
    base = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 2}},
            "objectives": {"contrastive": 1.0}}
    export = export_checkpoint(root / "stage1", tmp_path / "export")
    ckpt = list_checkpoints(root / "stage1")[-1]
    for source in (root / "stage1", ckpt, export):
        task = PretrainTask(config_from_dict({**base, "model": {"name": "vlp-test-vit", "pretrained": str(source)}},
                                             check_files=False))
        got = task.student.clip.state_dict()
        assert all(torch.equal(got[k], v) for k, v in tower.items()), source
    assert clip_state_dict(ckpt).keys() == tower.keys()
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="model.pretrained: .* is a vlp run folder, but no complete checkpoint"):
        PretrainTask(config_from_dict({**base, "model": {"name": "vlp-test-vit",
                                                         "pretrained": str(tmp_path / "empty")}}, check_files=False))
    with pytest.raises(ConfigError, match="does not fit model.name 'vlp-tiny-vit'"):
        PretrainTask(config_from_dict({**base, "model": {"name": "vlp-tiny-vit", "pretrained": str(root / "stage1")}},
                                      check_files=False))


def test_a_locked_tower_has_no_backward_in_the_flop_count():
    """vlp.flops counts a locked image tower's forward only: stage 2 of LiT costs less per step than the same
    contrastive run with the tower trained, by about twice the image tower's forward."""
    from vlp.flops import training_flops_per_step

    tree = {"data": {"sources": [{"kind": "paired", "shards": "x.tar"}], "batch": {"paired": 8}},
            "objectives": {"contrastive": 1.0}, "model": {"name": "vlp-test-vit"}}
    trained, split = training_flops_per_step(config_from_dict(tree, check_files=False), steps=1, breakdown=True)
    locked = training_flops_per_step(config_from_dict({**tree, "model": {**tree["model"], "lock_image": True}},
                                                      check_files=False), steps=1)
    image = split["image tower"]
    assert locked < trained
    assert trained - locked == pytest.approx(2 * image, rel=0.1)


def test_lit_configs_validate():
    import yaml

    for name in ("configs/lit.yaml", "configs/bench/quality-lit-tower.yaml", "configs/bench/quality-lit.yaml"):
        cfg = config_from_dict(yaml.safe_load((REPO / name).read_text()), check_files=False)
        assert cfg.objectives, name
    lit = config_from_dict(yaml.safe_load((REPO / "configs/lit.yaml").read_text()), check_files=False)
    assert lit.model.lock_image and lit.model.pretrained and list(lit.objectives) == ["contrastive"]
