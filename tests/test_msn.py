"""MSN (Assran et al. 2022): the loss against the paper's formulas written out in float64 loops (prototype
assignments, sharpening, Sinkhorn-Knopp, cross-entropy, mean-entropy maximisation); the anchors are the shared masked
pass and the targets the teacher's unmasked view scored by the student's prototypes, with no gradient; a real
training on mixed shards with MSN on every row."""
import math

import numpy as np
import pytest
import torch

from conftest import run_config, step_metrics
from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives.msn import MSNObjective, me_max, msn_targets, prototype_scores
from vlp.task import PretrainTask
from vlp.train import Trainer


def reference_msn(anchor, target, prototypes, tau, T, iterations, me_max_weight):
    """The paper's loss (Sec. 3, eqs. 1-3; the reference's ``init_msn_loss``) in float64 numpy, loop by loop."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def assign(z):
        s = unit(z) @ unit(prototypes).T / tau
        e = np.exp(s - s.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p = assign(anchor)
    q = assign(target) ** (1 / T)
    q = q / q.sum(1, keepdims=True)
    if iterations:
        B, K = q.shape
        Q = q.T / q.sum()                                  # [K, B]
        for _ in range(iterations):
            Q = Q / Q.sum(1, keepdims=True) / K            # each prototype: mass 1/K
            Q = Q / Q.sum(0, keepdims=True) / B            # each row: mass 1/B
        q = (Q * B).T
    ce = np.mean([-sum(q[i, k] * math.log(p[i, k]) for k in range(p.shape[1])) for i in range(p.shape[0])])
    pbar = p.mean(0)
    reg = sum(v * math.log(v) for v in pbar) + math.log(len(pbar))
    return ce + me_max_weight * reg, q


@pytest.mark.parametrize("iterations", [0, 3])
def test_loss_equals_the_papers_formulas(iterations):
    g = torch.Generator().manual_seed(0)
    anchor, target = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    protos = torch.randn(5, 8, generator=g)
    obj = MSNObjective(MSNObjective.Config(temperature=0.3, sharpen=0.5, sinkhorn_iterations=iterations,
                                           me_max_weight=0.7))
    outputs = {"msn/scores": prototype_scores(anchor, protos), "msn/prototypes": protos, "teacher/msn/z": target}
    loss, metrics = obj(outputs, None)
    expected, q = reference_msn(anchor.double().numpy(), target.double().numpy(), protos.double().numpy(),
                                0.3, 0.5, iterations, 0.7)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert np.allclose(msn_targets(target, protos, 0.3, 0.5, iterations).numpy(), q, atol=1e-6)
    if iterations:  # Sinkhorn: each target a distribution, the prototypes' mass nearer equal than before it
        unbalanced = msn_targets(target, protos, 0.3, 0.5, 0).numpy()
        assert np.allclose(q.sum(1), 1) and q.sum(0).std() < 0.5 * unbalanced.sum(0).std()
    assert {"ce", "me_max", "agree", "target_max"} <= set(metrics)


def test_me_max_is_zero_when_every_prototype_is_used_and_log_k_on_one():
    assert me_max(torch.full((8,), 1 / 8)).item() == pytest.approx(0, abs=1e-6)
    assert me_max(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(math.log(4), rel=1e-6)


def _task(kinds):
    cfg = {"data": {"sources": [{"kind": k, "shards": "x.tar"} for k in ("paired", "unlabeled")],
                    "batch": {"paired": 3, "unlabeled": 3}},
           "model": {"name": "vlp-test-vit", "mask_ratio": 0.5},
           "objectives": {"contrastive": {"weight": 1.0},
                          "msn": {"kinds": kinds, "n_prototypes": 16, "hidden_dim": 32, "proj_dim": 16}}}
    torch.manual_seed(0)
    return PretrainTask(config_from_dict(cfg, check_files=False))


def _batch(task, kinds):
    g = torch.Generator().manual_seed(1)
    kind = torch.tensor([0, 0, 0, 2, 2, 2])
    rows = int(sum((kind == {"paired": 0, "unlabeled": 2}[k]).sum() for k in kinds))
    return Batch(image=torch.randn(6, 3, 32, 32, generator=g), text=torch.randint(1, 50, (6, 16), generator=g),
                 has_text=kind == 0, label=torch.full((6,), -1), kind=kind,
                 views={"msn": torch.randn(1, rows, 3, 32, 32, generator=g)})


@pytest.mark.parametrize("kinds", [["unlabeled"], ["paired", "unlabeled"]])
def test_anchors_are_the_masked_pass_and_targets_the_teachers_unmasked_view_without_gradient(kinds):
    task = _task(kinds)
    obj, head = task.objectives["msn"][0], task.student.msn_head
    batch = _batch(task, kinds)
    task.student.train()
    noise = torch.rand(6, task.student.num_patches)
    outputs = task.student(batch, noise=noise)
    rows = batch.rows_of(kinds)
    assert outputs["mask"].float().mean() == 0.5                          # the anchors saw half the patches
    assert torch.allclose(outputs["msn/scores"], prototype_scores(head.projector(outputs["pooled"][rows]),
                                                                  head.prototypes))
    with torch.no_grad():
        z = obj.teacher_forward(task.teacher, batch, 0)["teacher/msn/z"]
        unmasked = task.teacher.model.encode_pooled(batch.views["msn"][0])
        assert torch.allclose(z, task.teacher.head("msn_head").projector(unmasked))
        for p in task.student.clip.visual.parameters():  # the student moves: the targets' features do not
            p.add_(torch.randn_like(p))
        assert torch.equal(obj.teacher_forward(task.teacher, batch, 0)["teacher/msn/z"], z)
    loss, metrics = task.training_forward(batch, step=0)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert head.prototypes.grad.abs().sum() > 0 and task.student.clip.visual.conv1.weight.grad.abs().sum() > 0
    assert math.isfinite(metrics["loss/msn"].item())


def test_msn_on_every_row_trains_beside_unicl_on_real_mixed_shards(demo_data, tmp_path):
    """The real trainer on the digits' three kinds of shards, MSN on every row beside UniCL and the classifier."""
    cfg = run_config(demo_data, tmp_path / "run", train={"steps": 3, "log_every": 1, "save_every": 3,
                                                          "progress": False})
    cfg["data"]["workers"] = 0
    cfg["objectives"] = {"contrastive": {"labels_as_text": True}, "supervised": {"weight": 0.5},
                         "msn": {"kinds": ["paired", "labeled", "unlabeled"], "target_view": "weak",
                                 "n_prototypes": 16, "hidden_dim": 32, "proj_dim": 16}}
    Trainer(config_from_dict(cfg)).fit()
    steps = step_metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3]
    for rec in steps.values():
        assert math.isfinite(rec["loss/msn"]) and rec["loss/msn"] > 0
        assert 0 <= rec["msn/agree"] <= 1 and 0 < rec["msn/target_max"] <= 1
