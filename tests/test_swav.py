"""SwAV: Sinkhorn-Knopp and the swapped-prediction loss against the official code and lightly's SwaVLoss on fixed
tensors; the prototypes stay unit-length and freeze for the first steps; each process's queue survives a 2-process
resume."""
import math
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO, run_config, step_metrics, write_config
from test_train import ENV, LAUNCH_2
from vlp import checkpoint as ckpt_io
from vlp.objectives.swav import SwAVObjective, distributed_sinkhorn, swav_loss

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from ddp_grads_ssl import build, global_batch  # noqa: E402


# distributed_sinkhorn and the loss loop of main_swav.py, facebookresearch/swav (Copyright (c) Facebook, Inc. and its
# affiliates; CC-BY-NC 4.0), in one process (all_reduce is the identity, world_size 1).
@torch.no_grad()
def official_sinkhorn(out, epsilon=0.05, sinkhorn_iterations=3, world_size=1):
    Q = torch.exp(out / epsilon).t()  # Q is K-by-B for consistency with notations from our paper
    B = Q.shape[1] * world_size  # number of samples to assign
    K = Q.shape[0]  # how many prototypes
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for it in range(sinkhorn_iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B  # the colomns must sum to 1 so that Q is an assignment
    return Q.t()


def official_loss(output, bs, nmb_crops, crops_for_assign=(0, 1), temperature=0.1, queue=None, embedding=None,
                  prototypes=None):
    """main_swav.py's loop; with ``queue [2, Q, D]`` (updated in place) as the reference's, ``use_the_queue`` on
    once the queue's last row is written."""
    loss = 0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                if not torch.all(queue[i, -1, :] == 0):
                    out = torch.cat((torch.mm(queue[i], prototypes.t()), out))
                queue[i, bs:] = queue[i, :-bs].clone()
                queue[i, :bs] = embedding[crop_id * bs: (crop_id + 1) * bs]
            q = official_sinkhorn(out)[-bs:]
        subloss = 0
        for v in [v for v in range(sum(nmb_crops)) if v != crop_id]:
            x = output[bs * v: bs * (v + 1)] / temperature
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (sum(nmb_crops) - 1)
    return loss / len(crops_for_assign)


def scores(V, B=8, K=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(V, B, 6, generator=g), dim=-1)
    protos = F.normalize(torch.randn(K, 6, generator=g), dim=-1)
    return z @ protos.T  # cosines, as the head's


def test_sinkhorn_equals_the_official_code_and_balances_the_prototypes():
    s = scores(1)[0]
    q = distributed_sinkhorn(s, 0.05, 3)
    assert torch.allclose(q, official_sinkhorn(s.clone()), atol=1e-6)
    assert torch.allclose(q.sum(1), torch.ones(8), atol=1e-5)  # a code per sample
    assert q.sum(0).std() < q.sum(0).mean() * 0.5  # prototype masses pulled towards B/K (3 iterations, not exact)


@pytest.mark.parametrize("n_local", [0, 4])
def test_loss_equals_the_official_loop(n_local):
    s = scores(2 + n_local)
    expected = official_loss(s.flatten(0, 1), 8, [2, n_local] if n_local else [2])
    assert torch.allclose(swav_loss(s, 0.1), expected, atol=1e-5)
    loss, metrics = SwAVObjective(SwAVObjective.Config(n_local=n_local))({"swav/scores": s}, None)
    assert torch.allclose(loss, expected, atol=1e-5) and set(metrics) == {"mean_entropy", "code_entropy"}
    q = official_sinkhorn(s[0].clone())  # the batch's codes: their mean entropy (ln K when uniform)
    assert torch.allclose(metrics["code_entropy"], -(q * q.log()).sum(1).mean(), atol=1e-5)
    assert 0 < metrics["code_entropy"] < math.log(12)


@pytest.mark.parametrize("n_local", [0, 3])
def test_loss_equals_lightly_swavloss(n_local):
    lightly_loss = pytest.importorskip("lightly.loss")
    s = scores(2 + n_local, seed=3)
    ref = lightly_loss.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)(list(s[:2]), list(s[2:]))
    assert torch.allclose(swav_loss(s, 0.1, 0.05, 3), ref, atol=1e-5)
    from lightly.loss.swav_loss import sinkhorn
    assert torch.allclose(distributed_sinkhorn(s[0]), sinkhorn(s[0], iterations=3, epsilon=0.05), atol=1e-6)


def test_prototypes_are_unit_length_after_each_step_and_frozen_for_the_first_steps():
    task = build("swav")
    obj, student, batch = task.objectives["swav"][0], task.student.train(), global_batch(1)
    obj.cfg.freeze_prototypes_steps = 2
    protos = student.swav_head.prototypes.weight
    assert torch.allclose(protos.norm(dim=1), torch.ones(len(protos)), atol=1e-6)  # on_train_start
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    for step, frozen in ((0, True), (1, True), (2, False)):
        opt.zero_grad(set_to_none=True)
        before = protos.detach().clone()
        loss, _ = task.training_forward(batch, step)
        loss.backward()
        assert protos.grad is not None and protos.grad.abs().sum() > 0
        task.after_backward(step)
        assert (protos.grad is None) == frozen
        opt.step()
        task.after_optimizer_step(step)
        assert torch.allclose(protos, before, atol=1e-6) == frozen, step  # re-normalising moves by rounding only
        assert torch.allclose(protos.norm(dim=1), torch.ones(len(protos)), atol=1e-6)


def test_queue_equals_the_official_loop_over_steps():
    """Queue of 16 rows per crop, batch 8, 2 global + 2 local crops: the first 2 steps fill it (codes from the batch
    alone), from step 3 its scores against the current prototypes join Sinkhorn; losses and queue contents equal the
    reference's at every step."""
    obj = SwAVObjective(SwAVObjective.Config(n_local=2, queue_length=16, proj_dim=6))
    ref_queue = torch.zeros(2, 16, 6)
    g = torch.Generator().manual_seed(5)
    losses = []
    for step in range(4):
        z = F.normalize(torch.randn(4, 8, 6, generator=g), dim=-1)
        protos = F.normalize(torch.randn(12, 6, generator=g), dim=-1)
        s = z @ protos.T
        expected = official_loss(s.flatten(0, 1), 8, [2, 2], queue=ref_queue, embedding=z.flatten(0, 1),
                                 prototypes=protos)
        loss, _ = obj({"swav/scores": s, "swav/z": z[:2], "swav/prototypes": protos}, None)
        assert torch.allclose(loss, expected, atol=1e-5), step
        assert torch.equal(obj.queue, ref_queue), step
        losses.append(loss)
    assert not torch.allclose(losses[3], swav_loss(s, 0.1), atol=1e-4)  # the queue changed the codes
    assert "queue" in dict(obj.named_buffers()) and "queue" not in dict(SwAVObjective().named_buffers())


def test_two_process_resume_gives_each_rank_its_own_queue_and_the_uninterrupted_losses(demo_data, tmp_path):
    """Each process queues its own rows (the reference saves queue<rank>.pth): a 2-process checkpoint holds one
    ``objectives.rank<R>.safetensors`` per rank, and resuming from it (`accelerate launch`, gloo) gives the
    losses of the uninterrupted run, which needs rank 1 to get its own queue back, not rank 0's."""
    def config(name):
        cfg = run_config(demo_data, tmp_path / name, train={"steps": 6, "save_every": 3, "log_every": 1})
        cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
        cfg["data"]["batch"] = {"unlabeled": 8}  # 4 rows per process: its queue of 8 is full after 2 steps
        cfg["objectives"] = {"swav": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 16, "n_local": 1,
                                      "queue_length": 8}}
        return write_config(tmp_path / f"{name}.yaml", cfg)

    run = [*LAUNCH_2, "-m", "vlp.train", "--config"]
    subprocess.run([*run, str(config("ref"))], env=ENV, check=True, capture_output=True, timeout=300)
    step3 = ckpt_io.checkpoint_dir(tmp_path / "ref", 3)
    queues = [load_file(str(step3 / ckpt_io.PER_PROCESS_FILE.format(rank=r)))["swav.queue"] for r in (0, 1)]
    assert queues[0][:, -1].any() and queues[1][:, -1].any()  # full
    assert not torch.equal(queues[0], queues[1])
    assert torch.equal(load_file(str(step3 / "objectives.safetensors"))["swav.queue"], queues[0])

    path = config("run")  # the reference's checkpoint at step 3 as this run's latest, then resumed
    shutil.copytree(step3, ckpt_io.checkpoint_dir(tmp_path / "run", 3))
    subprocess.run([*run, str(path), "--resume", "auto"], env=ENV, check=True, capture_output=True, timeout=300)
    reference, resumed = step_metrics(tmp_path / "ref"), step_metrics(tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss/swav"] == pytest.approx(reference[step]["loss/swav"], rel=1e-5, abs=1e-6), step
