"""Training FLOPs per step (vlp.flops): proportional to the tokens of the masked pass, teacher forwards counted,
and a step is about three forwards (backward ~ 2x forward)."""
import pytest

from conftest import run_config
from vlp.config import config_from_dict
from vlp.flops import training_flops_per_step

CLASSES = [str(i) for i in range(10)]


def _cfg(tmp_path, objectives: dict, mask_ratio: float = 0.75, **sections):
    tree = run_config(tmp_path / "no-shards", tmp_path / "run", model={"name": "vlp-test-vit", "mask_ratio": mask_ratio},
                      **sections)
    tree["objectives"] = objectives
    return config_from_dict(tree, check_files=False)


def test_masked_step_costs_in_proportion_to_tokens(tmp_path):
    # vlp-test-vit: 32 px, patch 8 -> 16 patches + the class token; 75% masking keeps 4 + 1 tokens of 17
    full = training_flops_per_step(_cfg(tmp_path, {"supervised": {}}, mask_ratio=0.0), CLASSES, steps=2)
    masked = training_flops_per_step(_cfg(tmp_path, {"supervised": {}}, mask_ratio=0.75), CLASSES, steps=2)
    assert masked < full
    assert masked / full == pytest.approx(5 / 17, rel=0.25)


def test_momentum_teacher_forward_is_counted(tmp_path):
    base = _cfg(tmp_path, {"supervised": {}})
    with_teacher = _cfg(tmp_path, {"supervised": {}, "byol": {"hidden_dim": 64, "proj_dim": 32}})
    plain = training_flops_per_step(base, CLASSES, steps=2)
    total, split = training_flops_per_step(with_teacher, CLASSES, steps=2, breakdown=True)
    assert total > plain
    assert split["teacher"] > 0 and split["head byol_head"] > 0


def test_supervised_step_is_three_forwards(tmp_path):
    total, split = training_flops_per_step(_cfg(tmp_path, {"supervised": {}}), CLASSES, steps=3, breakdown=True)
    assert set(split) <= {"image tower", "head classifier", "losses"}
    assert total == pytest.approx(3 * sum(split.values()), rel=0.10)


def test_rows_a_teacher_drops_cost_its_forward_only(tmp_path):
    """``pseudolabel.keep``: the teacher scores the 4 unlabeled rows, the student's pass sees 2 of them (14 rows of
    16): its image tower costs 14/16 of the pass over every row, the teacher's forward the same as without keep."""
    objectives = {"contrastive": {"labels_as_text": True}, "pseudolabel": {"rampup_steps": 0}}
    every, every_split = training_flops_per_step(_cfg(tmp_path, objectives), CLASSES, steps=1, breakdown=True)
    objectives["pseudolabel"]["keep"] = 2
    kept, kept_split = training_flops_per_step(_cfg(tmp_path, objectives), CLASSES, steps=1, breakdown=True)
    assert kept_split["image tower"] == pytest.approx(every_split["image tower"] * 14 / 16, rel=1e-6)
    assert kept_split["teacher"] == pytest.approx(every_split["teacher"], rel=1e-6)
    assert every - kept == pytest.approx(3 * (every_split["image tower"] - kept_split["image tower"]), rel=0.10)
