"""Teacher pseudo-labels (MUST / FixMatch / FlexMatch) and the contrastive branch's own masking ratio."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.models.model import random_masking
from vlp.objectives.pseudolabel import fairness, flexmatch_thresholds, keep_order, topk_per_class
from vlp.task import PretrainTask

CLASSES = ["cat", "dog", "ship"]


def _task(pseudolabel: dict | None = None, contrastive: dict | None = None, steps: int = 100) -> PretrainTask:
    cfg = config_from_dict({
        "data": {"sources": [{"kind": k, "shards": "x.tar"} for k in ("paired", "labeled", "unlabeled")],
                 "batch": {"paired": 2, "labeled": 2, "unlabeled": 4}},
        "model": {"name": "vlp-test-vit", "mask_ratio": 0.75},
        "objectives": {"contrastive": {"labels_as_text": True, **(contrastive or {})},
                       "pseudolabel": pseudolabel or {}},
        "train": {"steps": steps},
    }, check_files=False)
    torch.manual_seed(0)
    task = PretrainTask(cfg, classnames=CLASSES)
    task.on_train_start()
    return task


def _batch(task, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    kind = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    texts = ["a cat on a mat", "two dogs", "a photo of a ship.", "a photo of a cat.", "", "", "", ""]
    b = Batch(image=torch.randn(8, 3, 32, 32, generator=g), text=task.tokenizer(texts), has_text=kind < 2,
              label=torch.tensor([-1, -1, 2, 0, -1, -1, -1, -1]), kind=kind,
              views={"pseudolabel": torch.randn(1, 4, 3, 32, 32, generator=g)},
              hidden_label=torch.tensor([-1, -1, -1, -1, 0, 1, 2, 1]))
    b.text[~b.has_text] = 0
    return b


def _forward(task, step=4):
    """(the pseudolabel objective, the batch, the student's outputs with the teacher's at ``step``)."""
    obj = task.objectives["pseudolabel"][0]
    batch = _batch(task)
    task.student.train()
    outputs = task.student(batch)
    with torch.no_grad():
        outputs.update(obj.teacher_forward(task.teacher, batch, step=step))
    return obj, batch, outputs


def test_flexmatch_thresholds_match_a_hand_computed_case():
    sigma, tau = torch.tensor([4.0, 2.0, 0.0]), 0.9
    # no warm-up: beta = sigma / max sigma = [1, .5, 0]; M(x) = x / (2 - x) = [1, 1/3, 0]
    assert torch.allclose(flexmatch_thresholds(sigma, torch.tensor(1.0), tau), torch.tensor([0.9, 0.3, 0.0]))
    assert torch.allclose(flexmatch_thresholds(sigma, torch.tensor(10.0), tau, warmup=False),
                          torch.tensor([0.9, 0.3, 0.0]))
    # warm-up: 10 unused rows dominate: beta = [.4, .2, 0]; M = [.25, 1/9, 0]
    assert torch.allclose(flexmatch_thresholds(sigma, torch.tensor(10.0), tau), torch.tensor([0.225, 0.1, 0.0]))
    # before anything is confident every threshold is 0 (FlexMatch admits all rows at the start)
    assert torch.equal(flexmatch_thresholds(torch.zeros(3), torch.tensor(0.0), tau), torch.zeros(3))


def test_flexmatch_selection_and_streaming_counters():
    task = _task({"tau": 0.6, "count_momentum": 0.5})
    obj = task.objectives["pseudolabel"][0]
    obj.sigma.copy_(torch.tensor([2.0, 1.0, 0.0]))
    obj.unused.fill_(1.0)
    probs = torch.tensor([[0.9, 0.05, 0.05],   # class 0, conf .9 > T_0 = .6
                          [0.5, 0.3, 0.2],     # class 0, conf .5 < .6
                          [0.1, 0.45, 0.45],   # class 1 (first max), T_1 = .6 * (.5 / 1.5) = .2 -> selected
                          [0.2, 0.1, 0.7]])    # class 2, T_2 = 0 -> selected
    pred, mask, thr = obj.choose(probs)
    assert pred.tolist() == [0, 0, 1, 2] and mask.tolist() == [True, False, True, True]
    assert torch.allclose(thr, torch.tensor([0.6, 0.6, 0.2, 0.0]))
    # confident (> tau .6): rows 0 (class 0) and 3 (class 2); unconfident: 2. EMA with momentum .5
    assert torch.allclose(obj.sigma, torch.tensor([1.5, 0.5, 0.5])) and math.isclose(obj.unused.item(), 1.5)


def test_topk_per_class_keeps_the_most_confident_rows_of_each_class():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    pred = torch.tensor([0, 0, 0, 1, 1])
    assert topk_per_class(conf, pred, 2).tolist() == [True, True, False, True, True]
    assert topk_per_class(conf, pred, 1).tolist() == [True, False, False, False, True]


def test_fairness_is_kl_of_uniform_to_the_mean_prediction():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    mean = p.mean(0)
    u = torch.full((3,), 1 / 3)
    assert torch.allclose(fairness(p), (u * (u / mean).log()).sum())
    assert fairness(torch.full((4, 3), 1 / 3)).abs() < 1e-6


def test_loss_is_masked_cross_entropy_to_teacher_labels_plus_fairness_times_the_ramp():
    task = _task({"select": "threshold", "tau": 0.34, "fairness": 0.5, "rampup_steps": 10})
    obj, batch, outputs = _forward(task)
    probs = outputs["teacher/pseudolabel/probs"]
    assert not probs.requires_grad
    loss, metrics = obj(outputs, batch)
    conf, pred = probs.max(-1)
    mask = conf > 0.34
    logits = outputs["logit_scale"] * outputs["embed"][4:] @ obj.bank.T
    ce = (F.cross_entropy(logits, pred, reduction="none") * mask).sum() / 4
    expected = 0.5 * (ce + 0.5 * fairness(logits.softmax(-1)))  # ramp (4 + 1) / 10
    assert torch.allclose(loss, expected, atol=1e-6)
    assert math.isclose(metrics["selected"].item(), mask.float().mean().item())
    assert math.isclose(metrics["teacher_acc"].item(), (pred == torch.tensor([0, 1, 2, 1])).float().mean().item())


def test_soft_target_is_cross_entropy_to_the_sharpened_teacher_distribution():
    """``target: soft``: each selected row's target is MixMatch's sharpened teacher distribution
    ``p^(1/T) / sum p^(1/T)``, computed here by hand; T -> 0 approaches the hard label's loss."""
    task = _task({"select": "threshold", "tau": 0.34, "fairness": 0.0, "rampup_steps": 0, "target": "soft",
                  "sharpen": 0.5})
    obj, batch, outputs = _forward(task)
    probs = outputs["teacher/pseudolabel/probs"]
    loss, _ = obj(outputs, batch)
    mask = probs.max(-1)[0] > 0.34
    q = probs ** 2 / (probs ** 2).sum(-1, keepdim=True)  # T = 0.5
    log_p = (outputs["logit_scale"] * outputs["embed"][4:] @ obj.bank.T).log_softmax(-1)
    expected = (-(q * log_p).sum(-1) * mask).sum() / 4
    assert mask.any() and torch.allclose(loss, expected, atol=1e-6)
    obj.cfg.sharpen = 1e-3  # nearly one-hot: the hard label's cross-entropy
    hard = (-log_p.gather(1, probs.argmax(-1, keepdim=True)).squeeze(1) * mask).sum() / 4
    assert torch.allclose(obj(outputs, batch)[0], hard, atol=1e-4)


def test_pseudo_labels_come_from_the_teacher_only_and_carry_no_gradient():
    task = _task({"select": "threshold", "tau": 0.01})
    obj = task.objectives["pseudolabel"][0]
    batch = _batch(task)
    with torch.no_grad():
        before = obj.teacher_forward(task.teacher, batch, 0)["teacher/pseudolabel/probs"]
        for p in task.student.clip.visual.parameters():  # the student moves: pseudo-labels do not
            p.add_(torch.randn_like(p))
        assert torch.equal(obj.teacher_forward(task.teacher, batch, 0)["teacher/pseudolabel/probs"], before)
        task.teacher.model.clip.visual.proj.mul_(-1)  # the teacher moves: they do
        assert not torch.allclose(obj.teacher_forward(task.teacher, batch, 0)["teacher/pseudolabel/probs"], before)
    task.student.train()
    loss, _ = task.training_forward(batch, step=50)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert obj.bank.grad is None and not obj.bank.requires_grad
    assert task.student.clip.visual.proj.grad.abs().sum() > 0


def test_class_bank_is_the_prompt_ensembled_zero_shot_classifier_and_refreshes():
    from open_clip import build_zero_shot_classifier

    task = _task({"bank_every": 5})
    obj = task.objectives["pseudolabel"][0]
    templates = [lambda c: "a photo of a {c}.".format(c=c)]
    ref = build_zero_shot_classifier(task.student.clip, tokenizer=task.tokenizer, classnames=CLASSES,
                                     templates=templates, device="cpu", use_tqdm=False)  # [D, C]
    assert torch.allclose(obj.bank, ref.T, atol=1e-5)
    with torch.no_grad():
        task.student.clip.text_projection.add_(torch.randn_like(task.student.clip.text_projection))
    bank = obj.bank.clone()
    obj.after_optimizer_step(task.student, step=3)  # not due
    assert torch.equal(obj.bank, bank)
    obj.after_optimizer_step(task.student, step=4)  # every 5th step
    assert not torch.allclose(obj.bank, bank)


def test_contrastive_rows_get_their_own_masking_ratio_and_an_unmasked_tail():
    task = _task(contrastive={"mask_ratio": 0.25, "unmasked_tail_steps": 10}, steps=100)
    model = task.student.train()
    batch = _batch(task)
    noise = torch.rand(8, model.num_patches, generator=torch.Generator().manual_seed(3))
    assert task.text_pass_ratio(0) == 0.25 and task.text_pass_ratio(89) == 0.25 and task.text_pass_ratio(90) == 0.0
    out = model(batch, noise=noise, text_ratio=0.25)
    keep = random_masking(noise[:4], 0.25)[0]
    ref = F.normalize(model.image_features(model.encode_visible(batch.image[:4], keep)[0]), dim=-1)
    assert torch.allclose(out["image_features"], ref, atol=1e-6)
    assert out["tokens"].shape[1] == 4  # the shared pass keeps 25% of the 16 patches
    unmasked = model(batch, noise=noise, text_ratio=0.0)["image_features"]
    assert torch.allclose(unmasked, F.normalize(model.clip.encode_image(batch.image[:4]), dim=-1), atol=1e-5)
    shared = model(batch, noise=noise, text_ratio=0.75)
    assert torch.allclose(shared["image_features"], shared["embed"][:4])


@pytest.mark.parametrize("bad", [{"source": "classifier"}, {"tau": 1.5}, {"select": "best"}])
def test_pseudolabel_config_errors_name_the_key(bad):
    from vlp.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="objectives.pseudolabel"):
        _task(bad)


def test_keep_order_puts_selected_rows_first_then_each_class_in_turn_by_confidence():
    pred = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.4])
    selected = torch.tensor([False, True, False, False, False, False, True])
    # selected: rows 1 (class 0) and 6 (class 2), each its class's best -> by confidence: 1, 6; then the rest:
    # each class's best (0: 0.9, 1: 4 at 0.95, 2: 5 at 0.5) by confidence, then the second ones (2 at 0.7, 3 at 0.6)
    assert keep_order(selected, conf, pred).tolist() == [1, 6, 4, 0, 5, 2, 3]
    assert keep_order(torch.zeros(7, dtype=torch.bool), conf, pred).tolist() == [4, 0, 5, 1, 3, 6, 2]


def test_batch_select_keeps_the_rows_and_each_view_groups_views_of_them():
    task = _task()
    batch = _batch(task)
    batch.views["both"] = torch.arange(2 * 6).view(2, 6, 1, 1, 1).float()   # a group of labeled + unlabeled rows
    keep = torch.tensor([True, True, False, True, False, True, True, False])
    sub = batch.select(keep, {"pseudolabel": ("unlabeled",), "both": ("labeled", "unlabeled")})
    assert torch.equal(sub.image, batch.image[keep]) and sub.kind.tolist() == [0, 0, 1, 2, 2]
    assert torch.equal(sub.views["pseudolabel"], batch.views["pseudolabel"][:, [1, 2]])
    assert sub.views["both"].flatten().tolist() == [1, 3, 4, 7, 9, 10]
    assert sub.hidden_label.tolist() == [-1, -1, -1, 1, 2] and sub.labels is None


def test_keep_trains_the_student_on_the_kept_rows_only_with_the_loss_of_those_rows_alone():
    """``keep: 2`` of the 4 unlabeled rows: the teacher scores all four and keeps the two best (the selected ones
    first); the student's step is then the step of the batch without the two others (same teacher labels), its
    pseudo-label cross-entropy still a mean over the 4 scored rows (half the sum over 2), and its FLOPs are lower."""
    from vlp.flops import count_training_flops

    cfg = {"select": "threshold", "tau": 0.34, "fairness": 0.0, "rampup_steps": 0}
    task = _task({**cfg, "keep": 2})
    obj = task.objectives["pseudolabel"][0]
    batch = _batch(task)
    with torch.no_grad():
        probs = obj.teacher_forward(task.teacher, batch, 4)["teacher/pseudolabel/probs"]
    conf, pred = probs.max(-1)
    best = keep_order(conf > 0.34, conf, pred)[:2].sort().values
    keep = torch.tensor([True] * 4 + [False] * 4)
    keep[4 + best] = True
    task.student.train()
    loss, metrics = task.training_forward(batch, step=4)

    plain = _task(cfg)  # the same weights (seed 0), every row it is given trained
    alone = batch.select(keep, plain.group_kinds)
    plain.student.train()
    expected, plain_metrics = plain.training_forward(alone, step=4)
    assert (conf > 0.34)[best].any() and plain_metrics["loss/pseudolabel"] > 0
    assert torch.allclose(metrics["loss/contrastive"], plain_metrics["loss/contrastive"], atol=1e-6)
    assert torch.allclose(metrics["loss/pseudolabel"], plain_metrics["loss/pseudolabel"] * 2 / 4, atol=1e-6)
    assert torch.allclose(loss, expected - plain_metrics["loss/pseudolabel"] / 2, atol=1e-6)
    assert math.isclose(metrics["pseudolabel/scored/kept"].item(), 0.5)
    assert math.isclose(metrics["pseudolabel/scored/selected"].item(), (conf > 0.34).float().mean().item())
    assert math.isclose(metrics["pseudolabel/scored/teacher_acc"].item(),
                        (pred == torch.tensor([0, 1, 2, 1])).float().mean().item())
    assert math.isclose(metrics["pseudolabel/teacher_acc"].item(), plain_metrics["pseudolabel/teacher_acc"].item())
    assert count_training_flops(task, batch, steps=1) < count_training_flops(_task(cfg), batch, steps=1)


def test_keep_refuses_accum_freq():
    from vlp.config import ConfigError

    with pytest.raises(ConfigError, match="objectives.pseudolabel.keep"):
        config_from_dict({
            "data": {"sources": [{"kind": k, "shards": "x.tar"} for k in ("paired", "labeled", "unlabeled")],
                     "batch": {"paired": 2, "labeled": 2, "unlabeled": 4}},
            "model": {"name": "vlp-test-vit"}, "objectives": {"contrastive": {"labels_as_text": True},
                                                               "pseudolabel": {"keep": 2}},
            "train": {"steps": 10, "accum_freq": 2}}, check_files=False)


def test_keep_trains_on_real_mixed_shards(demo_data, tmp_path):
    """The real trainer on the digits' three kinds of shards: the teacher scores 4 unlabeled rows a step, 2 are
    trained."""
    from conftest import run_config, step_metrics
    from vlp.train import Trainer

    cfg = run_config(demo_data, tmp_path / "run", train={"steps": 3, "log_every": 1, "save_every": 3,
                                                          "progress": False})
    cfg["data"]["workers"] = 0
    cfg["objectives"] = {"contrastive": {"labels_as_text": True}, "supervised": {"weight": 0.5},
                         "pseudolabel": {"select": "topk", "topk": 1, "keep": 2, "rampup_steps": 0}}
    Trainer(config_from_dict(cfg)).fit()
    steps = step_metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    for rec in steps.values():
        assert math.isfinite(rec["loss/pseudolabel"]) and rec["pseudolabel/scored/kept"] == 0.5
