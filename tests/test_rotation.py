"""Rotation prediction (Gidaris et al. 2018): four rotations of each row's view, a 4-way head, cross-entropy."""
import torch
import torch.nn.functional as F

from conftest import run_config
from vlp.config import config_from_dict
from vlp.data.mixing import make_loader
from vlp.objectives.rotation import RotationObjective
from vlp.train import Trainer


def test_rotation_loss_is_cross_entropy_over_the_four_rotations():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 4, generator=g)
    target = torch.arange(4).repeat_interleave(3)
    loss, m = RotationObjective()({"rotation_logits": logits, "rotation_target": target}, None)
    manual = -torch.log_softmax(logits, 1)[torch.arange(12), target].mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    assert m["acc"] == (logits.argmax(1) == target).float().mean()


def test_rotation_head_sees_each_unlabeled_view_rotated_four_ways(demo_data, tmp_path):
    cfg = run_config(demo_data, tmp_path / "rot", data={"batch": {"paired": 4, "labeled": 2, "unlabeled": 3},
                                                         "workers": 0})
    cfg["objectives"]["rotation"] = {"weight": 1.0}
    trainer = Trainer(config_from_dict(cfg))
    batch, _ = next(iter(make_loader(trainer.dataset, 0)))
    view = batch.views["rotation"]
    assert view.shape == (1, 3, 3, 32, 32)  # one view of each of the 3 unlabeled rows
    student = trainer.task.student.train()
    out = student(batch)
    assert out["rotation_logits"].shape == (12, 4)
    assert out["rotation_target"].tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    # the logits are the head on the student's unmasked pass over the rotated views, in that order
    rotated = torch.cat([torch.rot90(view[0], k, dims=(2, 3)) for k in range(4)])
    ref = student.rotation_head.fc(student.encode_pooled(rotated))
    assert torch.allclose(out["rotation_logits"], ref, atol=1e-5)
    assert torch.equal(rotated[3], torch.rot90(view[0, 0], 1, dims=(1, 2)))
    loss, metrics = trainer.compute_loss(batch, 0)
    assert "loss/rotation" in metrics and "rotation/acc" in metrics
    assert torch.allclose(metrics["loss/rotation"], F.cross_entropy(ref, out["rotation_target"]), atol=1e-5)
    trainer.accelerator.end_training()
