"""The unlabeled share on a step schedule, as the bench's ``mixed-curriculum`` trains it: stage 1 on the
label-bearing rows only, stage 2 the full mix from stage 1's run folder (``model.pretrained``, nothing locked). What
stage 2 must start from: both towers of stage 1, a momentum teacher equal to that model (so the first pseudo-labels
come from a trained labeler), and a pseudo-label class bank built from stage 1's text tower (checked against the
prompt ensemble computed here by hand). Then it trains: pseudo-labels are selected from the first step, and every
tower moves."""
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_config
from vlp.config import config_from_dict
from vlp.train import Trainer

sys.path.insert(0, str(REPO / "tools"))
import quality.plan as quality_plan  # noqa: E402


def stage1_tree(shards, out_dir):
    tree = run_config(shards, out_dir, model={"name": "vlp-test-vit", "mask_ratio": 0.5},
                      data={"workers": 0, "batch": {"paired": 8, "labeled": 8}},
                      train={"steps": 4, "log_every": 1, "save_every": 4, "progress": False})
    tree["data"]["sources"] = [s for s in tree["data"]["sources"] if s["kind"] != "unlabeled"]
    tree["objectives"] = {"contrastive": {"weight": 1.0, "labels_as_text": True}, "supervised": {"weight": 0.5}}
    return tree


def stage2_tree(shards, out_dir, pretrained):
    tree = run_config(shards, out_dir, model={"name": "vlp-test-vit", "mask_ratio": 0.5, "pretrained": str(pretrained)},
                      data={"workers": 0, "batch": {"paired": 8, "labeled": 4, "unlabeled": 8}},
                      train={"steps": 3, "log_every": 1, "save_every": 3, "progress": False})
    tree["objectives"] = {"contrastive": {"weight": 1.0, "labels_as_text": True}, "supervised": {"weight": 0.5},
                          "pseudolabel": {"weight": 1.0, "select": "topk", "topk": 2}}
    return tree


@pytest.fixture(scope="module")
def stage1(demo_data, tmp_path_factory):
    from vlp.checkpoint import clip_state_dict, readable_checkpoint

    root = tmp_path_factory.mktemp("curriculum")
    Trainer(config_from_dict(stage1_tree(demo_data, root / "stage1"))).fit()
    return root, clip_state_dict(readable_checkpoint(root / "stage1"))


def test_stage2_starts_from_stage1_its_teacher_and_its_class_bank(demo_data, stage1):
    root, weights = stage1
    trainer = Trainer(config_from_dict(stage2_tree(demo_data, root / "stage2", root / "stage1")))
    try:
        task = trainer.task
        student = task.student.clip.state_dict()
        assert set(weights) <= set(student)
        for k, v in weights.items():  # both towers are stage 1's
            assert torch.equal(student[k], v), k
        teacher = task.teacher.state_dict_tracked()
        visual = [k for k in teacher if k.startswith("clip.visual.")]
        assert visual
        for k in visual:  # the momentum teacher starts as stage 1's image tower
            assert torch.equal(teacher[k], weights[k.removeprefix("clip.")]), k
        # the class bank: each class's prompts through stage 1's text tower, normalized, averaged, normalized
        pseudo = task.objectives["pseudolabel"][0]
        templates = trainer.cfg.data.templates
        clip = task.student.clip
        with torch.no_grad():
            rows = []
            for name in trainer.classnames:
                text = clip.encode_text(task.tokenizer([t.format(c=name) for t in templates])).float()
                rows.append(F.normalize(F.normalize(text, dim=-1).mean(0), dim=-1))
        torch.testing.assert_close(pseudo.bank, torch.stack(rows), atol=1e-5, rtol=1e-5)
        assert float(pseudo.bank_scale) == pytest.approx(float(clip.logit_scale.detach().exp()))
    finally:
        trainer.release()


def test_stage2_trains_the_mix_with_pseudo_labels_from_the_first_step(demo_data, stage1):
    from vlp.checkpoint import clip_state_dict, readable_checkpoint
    from vlp.plot import read_metrics

    root, weights = stage1
    Trainer(config_from_dict(stage2_tree(demo_data, root / "stage2-fit", root / "stage1"))).fit()
    metrics = read_metrics(root / "stage2-fit")
    assert metrics[0]["step"] == 1 and metrics[0]["pseudolabel/selected"] > 0
    final = clip_state_dict(readable_checkpoint(root / "stage2-fit"))
    for prefix in ("visual.", "transformer."):
        assert any(not torch.equal(final[k], weights[k]) for k in weights if k.startswith(prefix)), prefix


def test_the_bench_trains_the_curriculum_as_two_stages():
    """configs/bench/quality-mixed-curriculum-first.yaml is the first stage of mixed-curriculum and its variants
    (-flexmatch, -flexmatch-nowarmup, -keep, -soft), not a run of its own."""
    assert quality_plan.first_stages()["mixed-curriculum-first"] == [
        "mixed-curriculum", "mixed-curriculum-flexmatch", "mixed-curriculum-flexmatch-nowarmup",
        "mixed-curriculum-keep", "mixed-curriculum-soft"]
    runs = quality_plan.available_runs()
    assert "mixed-curriculum" in runs and "mixed-curriculum-first" not in runs
    stage2 = quality_plan.base_tree("mixed-curriculum")
    assert not stage2["model"].get("lock_image") and "pseudolabel" in stage2["objectives"]


def test_two_runs_that_share_a_first_stage_train_it_once_per_seed():
    """--runs mixed-curriculum,mixed-curriculum-soft: each seed's first stage is planned for both runs, trained once
    (the second is the same training: reused), and each second stage starts from that seed's first stage."""
    base = {"objectives": ["contrastive", "supervised"], "text_trained": True, "mask_ratio": 0.5,
            "model": "vlp-tiny-vit", "change": None}
    configs = {"mixed": dict(base, run="mixed", gflops_per_step=65.83),
               "mixed-curriculum-first": dict(base, run="mixed-curriculum-first", gflops_per_step=59.7,
                                              stage_of="mixed-curriculum")}
    for run in ("mixed-curriculum", "mixed-curriculum-soft"):
        configs[run] = dict(base, run=run, gflops_per_step=65.83, stages=["mixed-curriculum-first", run],
                            first_stage_share=0.5)
    runs = ["mixed-curriculum", "mixed-curriculum-soft"]
    chosen = {"mixed-curriculum-first": 5e-4, "mixed-curriculum": 5e-4, "mixed-curriculum-soft": 5e-4}
    jobs = quality_plan.plan_jobs(1000, runs, "mixed", configs, {}, chosen, [0, 1], 1.0, [], False)
    got = [(j.name, j.steps, j.init_of.removeprefix("mixed-curriculum-")) for j in jobs]
    assert got == [("mixed-curriculum-first-seed0", 551, ""), ("mixed-curriculum-seed0", 500, "first-seed0"),
                   ("mixed-curriculum-first-seed1", 551, ""), ("mixed-curriculum-seed1", 500, "first-seed1"),
                   ("mixed-curriculum-first-seed0", 551, ""), ("mixed-curriculum-soft-seed0", 500, "first-seed0"),
                   ("mixed-curriculum-first-seed1", 551, ""), ("mixed-curriculum-soft-seed1", 500, "first-seed1")]
    assert quality_plan.reused(jobs, {}) == [False] * 4 + [True, False, True, False]
