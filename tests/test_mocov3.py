"""MoCo v3's loss against a transcription of the official code on fixed tensors; only the student gets gradient,
the teacher tracks the backbone and projector."""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, run_config
from vlp.config import config_from_dict
from vlp.objectives.mocov3 import MoCoV3Objective, moco_infonce

from vlp.train import Trainer

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from ddp_grads_ssl import build, global_batch  # noqa: E402


# MoCo.contrastive_loss from facebookresearch/moco-v3, moco/builder.py (Copyright (c) Facebook, Inc. and its
# affiliates; CC-BY-NC 4.0), in one process (concat_all_gather is the identity, rank 0).
def official_contrastive_loss(q, k, T):
    q = nn.functional.normalize(q, dim=1)
    k = nn.functional.normalize(k, dim=1)
    logits = torch.einsum('nc,mc->nm', [q, k]) / T
    N = logits.shape[0]
    labels = (torch.arange(N, dtype=torch.long))
    return nn.CrossEntropyLoss()(logits, labels) * (2 * T)


def test_infonce_and_symmetric_loss_equal_the_official_code():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    for T in (0.1, 0.2, 1.0):
        assert torch.allclose(moco_infonce(q[0], k[1], T), official_contrastive_loss(q[0], k[1], T), atol=1e-6)
    obj = MoCoV3Objective(MoCoV3Objective.Config(temperature=0.2))
    loss, metrics = obj({"mocov3/q": q, "teacher/mocov3/k": k}, None)
    expected = official_contrastive_loss(q[0], k[1], 0.2) + official_contrastive_loss(q[1], k[0], 0.2)
    assert torch.allclose(loss, expected, atol=1e-6) and set(metrics) == {"cos"}


def test_keys_are_targets_and_the_teacher_tracks_backbone_and_projector():
    task = build("mocov3")
    obj, student, batch = task.objectives["mocov3"][0], task.student.train(), global_batch(1)
    outputs = student(batch)
    outputs.update(obj.teacher_forward(task.teacher, batch, 0))
    assert not outputs["teacher/mocov3/k"].requires_grad and outputs["mocov3/q"].requires_grad
    assert outputs["mocov3/q"].shape == outputs["teacher/mocov3/k"].shape == (2, len(batch), 16)
    loss, _ = obj(outputs, batch)
    loss.backward()
    assert all(p.grad is None for p in task.teacher.parameters())
    assert all(p.grad is not None for p in student.mocov3_head.parameters())
    assert any(n.startswith("mocov3_head.projector.") for n in task.teacher.tracked)
    assert any(n.startswith("clip.visual.") for n in task.teacher.tracked)
    # the keys are the teacher's projection of its own pass over the views
    with torch.no_grad():
        t = task.teacher.model
        k = t.mocov3_head.projector(t.encode_pooled(batch.views["mocov3"][1]))
    assert torch.allclose(outputs["teacher/mocov3/k"][1], k, atol=1e-5)
    assert F.cosine_similarity(outputs["teacher/mocov3/k"][0], k, dim=-1).mean() < 0.999  # views differ


def test_frozen_patch_projection_keeps_its_random_init_while_the_rest_trains(demo_data, tmp_path):
    """model.freeze_patch_embed (MoCo v3 Sec. 4.1): after real steps of MoCo v3 on the digits' unlabeled shards the
    student's and the teacher's patch projection are still the random init; every trained image-tower weight moved."""
    cfg = run_config(demo_data, tmp_path / "run", model={"name": "vlp-test-vit", "freeze_patch_embed": True},
                     train={"steps": 2, "log_every": 1, "save_every": 2})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
    cfg["data"].update(batch={"unlabeled": 6}, workers=0)
    cfg["objectives"] = {"mocov3": {"hidden_dim": 32, "proj_dim": 16}}
    trainer = Trainer(config_from_dict(cfg))
    visual = trainer.task.student.clip.visual
    before = {n: p.detach().clone() for n, p in visual.named_parameters()}
    trainer.fit()
    after = dict(visual.named_parameters())
    assert not after["conv1.weight"].requires_grad and torch.equal(after["conv1.weight"], before["conv1.weight"])
    teacher = trainer.task.teacher.state_dict_tracked()
    assert torch.equal(teacher["clip.visual.conv1.weight"], before["conv1.weight"])
    trained = [n for n, p in after.items() if p.requires_grad]  # visual.proj too is frozen: no objective reads it
    assert "transformer.resblocks.0.attn.in_proj_weight" in trained and "conv1.weight" not in trained
    assert all(not torch.equal(after[n], before[n]) for n in trained)

