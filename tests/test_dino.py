"""DINO: the loss and center equal the reference DINOLoss; the teacher gets no gradient; the last-layer freeze;
multi-crop batching equals each crop alone; KoLeo by hand; DDP over 2 CPU processes equals one process."""
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO
from test_train import run_two_processes
from vlp.objectives.base import BuildContext
from vlp.objectives.dino import DINOObjective, koleo_loss
from vlp.objectives.heads import local_crop_size

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from ddp_grads_dino import STEP, build, global_batch, grads  # noqa: E402

dist = SimpleNamespace(all_reduce=lambda t: None, get_world_size=lambda: 1)  # single process, for the copy below


# DINOLoss from facebookresearch/dino, main_dino.py (Copyright (c) Facebook, Inc. and its affiliates; Apache License
# 2.0), verbatim; ``dist`` above stands for torch.distributed in one process.
class DINOLoss(nn.Module):
    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # we apply a warm up for the teacher temperature because
        # a too high temperature makes the training instable at the beginning
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp,
                        teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp
        ))

    def forward(self, student_output, teacher_output, epoch):
        """
        Cross-entropy between softmax outputs of the teacher and student networks.
        """
        student_out = student_output / self.student_temp
        student_out = student_out.chunk(self.ncrops)

        # teacher centering and sharpening
        temp = self.teacher_temp_schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_out = teacher_out.detach().chunk(2)

        total_loss = 0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    # we skip cases where student and teacher operate on the same view
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        """
        Update center used for teacher output.
        """
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        dist.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * dist.get_world_size())

        # ema update
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


@pytest.mark.parametrize("n_local", [0, 4])
def test_loss_and_center_equal_the_reference_dinoloss_through_the_temperature_warmup(n_local):
    K, B, V = 16, 5, 2 + n_local
    ref = DINOLoss(K, V, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=3, nepochs=6,
                   student_temp=0.1, center_momentum=0.9)
    obj = DINOObjective(DINOObjective.Config(out_dim=K, n_local=n_local, warmup_teacher_temp=0.02, teacher_temp=0.06,
                                             warmup_teacher_temp_steps=3, student_temp=0.1, center_momentum=0.9))
    g = torch.Generator().manual_seed(0)
    for step in range(6):
        s, t = 3 * torch.randn(V, B, K, generator=g), 3 * torch.randn(2, B, K, generator=g)
        assert obj.teacher_temp(step) == pytest.approx(ref.teacher_temp_schedule[step], abs=1e-12)
        expected = ref(s.flatten(0, 1), t.flatten(0, 1), step)
        loss, metrics = obj({"dino/student": s, "teacher/dino/logits": t,
                             "teacher/dino/temp": obj.teacher_temp(step)}, None)
        assert torch.allclose(loss, expected, atol=1e-6), step
        assert torch.allclose(obj.center, ref.center, atol=1e-6), step
        assert set(metrics) == {"teacher_entropy", "mean_entropy", "teacher_temp"}
    assert [obj.teacher_temp(i) for i in (0, 1, 2, 3, 10)] == pytest.approx([0.02, 0.04, 0.06, 0.06, 0.06])
    assert "center" in obj.state_dict()  # saved with every checkpoint



@pytest.mark.parametrize("n_local", [0, 3])
def test_loss_and_center_equal_lightly_dinoloss(n_local):
    """The optional second reference: lightly's DINOLoss (same centering, sharpening and cross-view pairs)."""
    lightly_loss = pytest.importorskip("lightly.loss")
    K, B, V = 16, 5, 2 + n_local
    ref = lightly_loss.DINOLoss(output_dim=K, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                warmup_teacher_temp_epochs=0, student_temp=0.1, center_momentum=0.9)
    obj = DINOObjective(DINOObjective.Config(out_dim=K, n_local=n_local, student_temp=0.1, center_momentum=0.9))
    g = torch.Generator().manual_seed(4)
    for step in range(3):
        s, t = 3 * torch.randn(V, B, K, generator=g), 3 * torch.randn(2, B, K, generator=g)
        expected = ref(list(t), list(s), teacher_temp=0.04)
        loss, _ = obj({"dino/student": s, "teacher/dino/logits": t, "teacher/dino/temp": 0.04}, None)
        assert torch.allclose(loss, expected, atol=1e-5), step
        assert torch.allclose(obj.center, ref.center.reshape(1, K), atol=1e-6), step

def test_teacher_outputs_carry_no_grad_and_the_last_layer_freezes_for_the_first_steps():
    task = build(freeze_last_layer_steps=2, norm_last_layer=False)
    obj, student, batch = task.objectives["dino"][0], task.student.train(), global_batch(1)
    last = list(student.dino_head.last_layer.parameters())
    assert len(last) == 2  # the prototypes and their weight-norm scale (norm_last_layer: false)
    for step, frozen in ((0, True), (1, True), (2, False), (5, False)):
        student.zero_grad(set_to_none=True)
        outputs = student(batch)
        outputs.update(obj.teacher_forward(task.teacher, batch, step))  # no outer no_grad
        assert not outputs["teacher/dino/logits"].requires_grad and outputs["dino/student"].requires_grad
        loss, _ = obj(outputs, batch)
        loss.backward()
        assert all(p.grad is None for p in task.teacher.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in last)
        obj.after_backward(student, step)
        assert all((p.grad is None) == frozen for p in last), step
        assert all(p.grad is not None for p in student.dino_head.mlp.parameters())


def test_multicrop_batches_by_resolution_and_equals_each_crop_alone():
    """Global (32px, 4x4 patches) and local (16px, 2x2: interpolated positions) crops, each encoded in one batch
    per resolution, equal each crop encoded on its own."""
    task = build()
    student, batch = task.student.eval(), global_batch(1)
    head = student.dino_head
    with torch.no_grad():
        out = head.head_forward(student, {}, batch)
        views = [*batch.views["dino_global"], *batch.views["dino_local"]]
        assert out["dino/student"].shape == (4, len(batch), 64) and out["dino/pooled"].shape[:2] == (2, len(batch))
        for v, crops in enumerate(views):
            for b in range(len(batch)):
                alone = head(student.encode_pooled(crops[b:b + 1]))[0]
                assert torch.allclose(out["dino/student"][v, b], alone, atol=1e-5), (v, b)


def test_local_crop_size_defaults_to_half_the_image_on_the_patch_grid_and_needs_a_vit():
    c = DINOObjective.Config()
    assert local_crop_size(c, BuildContext(cfg=None, patch=8, is_vit=True, image_size=32)) == 16
    assert local_crop_size(c, BuildContext(cfg=None, patch=16, is_vit=True, image_size=224)) == 112
    assert local_crop_size(c, BuildContext(cfg=None, patch=8, is_vit=True, image_size=52)) == 24  # 26 -> 24
    with pytest.raises(ValueError, match="objectives.dino.local_size: 20 is not a multiple of the patch size 8"):
        local_crop_size(DINOObjective.Config(local_size=20), BuildContext(cfg=None, patch=8, is_vit=True))
    with pytest.raises(ValueError, match="objectives.dino.n_local: local crops need a ViT"):
        local_crop_size(c, BuildContext(cfg=None, is_vit=False))


def test_koleo_against_a_hand_computed_case_and_its_weight_in_the_loss():
    # unit vectors at 0, 60 and 180 degrees (scaled: KoLeo normalizes): nearest neighbours at distance 1, 1, sqrt(3)
    angles = torch.tensor([0.0, math.pi / 3, math.pi])
    x = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[2.0], [0.5], [3.0]])
    assert koleo_loss(x).item() == pytest.approx(-(0 + 0 + math.log(math.sqrt(3))) / 3, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(2, 5, 8, generator=g)
    outputs = {"dino/student": torch.randn(2, 5, 16, generator=g), "teacher/dino/logits": torch.randn(2, 5, 16),
               "teacher/dino/temp": 0.04, "dino/pooled": pooled}
    base, _ = DINOObjective(DINOObjective.Config(out_dim=16, n_local=0))(outputs, None)
    loss, metrics = DINOObjective(DINOObjective.Config(out_dim=16, n_local=0, koleo_weight=0.1))(outputs, None)
    koleo = koleo_loss(pooled[0]) + koleo_loss(pooled[1])  # summed over the 2 global crops, as DINOv2
    assert torch.allclose(metrics["koleo"], koleo) and torch.allclose(loss, base + 0.1 * koleo, atol=1e-6)


def test_two_process_gradients_and_center_equal_single_process(tmp_path):
    """DDP over 2 CPU processes, each with half the rows: the student's gradients equal one process on the whole
    batch, and so does the updated center (all-reduced batch mean). Exact because the loss reads the center from
    before this step (updated after it) and is a mean of per-row terms; the KoLeo term (nearest neighbours within a
    rank's rows, as DINOv2) is not, so this runs with ``koleo_weight: 0``."""
    ddp = run_two_processes("ddp_grads_dino.py", tmp_path)
    task = build()
    start = task.objectives["dino"][0].center.clone()
    loss, _ = task.training_forward(global_batch(2), STEP)
    loss.backward()
    single = grads(task.student)
    assert single and all(n.startswith(("clip.visual.", "dino_head.")) for n in single)
    assert any(n.startswith("clip.visual.") for n in single)
    for n, g in single.items():
        assert torch.allclose(g, ddp["grads"][n], atol=1e-6, rtol=1e-4), n
    assert all(ddp["grads"][n].abs().sum() == 0 for n in set(ddp["grads"]) - set(single))
    center = task.objectives["dino"][0].center
    assert not torch.allclose(center, start) and torch.allclose(center, ddp["center"], atol=1e-6)


def test_loss_is_computed_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    outputs = {"dino/student": torch.randn(4, 5, 16, generator=g).bfloat16(), "teacher/dino/temp": 0.04,
               "teacher/dino/logits": torch.randn(2, 5, 16, generator=g).bfloat16()}
    ref, _ = DINOObjective(DINOObjective.Config(out_dim=16, n_local=2))(outputs, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = DINOObjective(DINOObjective.Config(out_dim=16, n_local=2))(outputs, None)
    assert loss.dtype == torch.float32 and torch.equal(loss, ref)
