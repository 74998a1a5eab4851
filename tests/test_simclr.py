"""SimCLR's NT-Xent against the paper's formula and lightly's NTXentLoss on fixed tensors; the objective's views;
its negatives under train.accum_freq."""
import pytest
import torch
import torch.nn.functional as F

from conftest import run_config
from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives import combine
from vlp.objectives.simclr import SimCLRObjective, nt_xent
from vlp.train import Trainer


def paper_nt_xent(z1, z2, temperature):
    """Chen et al. 2020, Algorithm 1: 2N views, s_ij = cos(z_i, z_j); l(i, j) = -log exp(s_ij / T) /
    sum_{k != i} exp(s_ik / T); L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    n = z1.shape[0]
    z = torch.stack([z1, z2], 1).flatten(0, 1)  # 2k-1, 2k interleaved (0-based: 2k, 2k+1)
    total = 0.0
    for i in range(2 * n):
        j = i + 1 if i % 2 == 0 else i - 1
        sims = torch.stack([F.cosine_similarity(z[i], z[k], dim=0) for k in range(2 * n)]) / temperature
        denom = torch.logsumexp(torch.cat([sims[:i], sims[i + 1:]]), 0)
        total = total + (denom - sims[j])
    return total / (2 * n)


@pytest.mark.parametrize("temperature", [0.1, 0.2, 0.5])
def test_nt_xent_is_the_papers_loss(temperature):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert torch.allclose(nt_xent(z1, z2, temperature), paper_nt_xent(z1, z2, temperature), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_equals_lightly_ntxentloss(temperature):
    lightly_loss = pytest.importorskip("lightly.loss")
    g = torch.Generator().manual_seed(1)
    z1, z2 = 3 * torch.randn(7, 16, generator=g), 3 * torch.randn(7, 16, generator=g)
    ref = lightly_loss.NTXentLoss(temperature=temperature)(z1, z2)
    assert torch.allclose(nt_xent(z1, z2, temperature), ref, atol=1e-5)


def test_objective_reads_the_two_views_and_is_computed_in_fp32():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 2, 8, generator=g, requires_grad=True)  # [rows, views, dim]
    loss, metrics = SimCLRObjective(SimCLRObjective.Config(temperature=0.3))({"simclr/z": z}, None)
    assert torch.allclose(loss, nt_xent(z[:, 0], z[:, 1], 0.3)) and set(metrics) == {"pos_cos"}
    loss.backward()
    assert z.grad[:, 0].abs().sum() > 0 and z.grad[:, 1].abs().sum() > 0  # both views get gradient (no stop-grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = SimCLRObjective(SimCLRObjective.Config(temperature=0.3))({"simclr/z": z.detach().bfloat16()}, None)
    assert low.dtype == torch.float32


def test_accum_freq_negatives_are_the_whole_accumulated_batch(demo_data, tmp_path):
    """train.accum_freq=2 at 6 unlabeled rows per micro-batch: SimCLR's cached features make the step's gradient
    that of one batch of 12 (every view a negative of every other), as CLIP's under open_clip_train's accum_freq."""
    tree = run_config(demo_data, tmp_path / "run", data={"workers": 0, "batch": {"unlabeled": 6}},
                      optim={"grad_clip": None, "warmup_steps": 2}, train={"steps": 1, "accum_freq": 2})
    tree["data"]["sources"] = [s for s in tree["data"]["sources"] if s["kind"] == "unlabeled"]
    tree["objectives"] = {"simclr": {"hidden_dim": 32, "proj_dim": 16}}
    trainer = Trainer(config_from_dict(tree))
    try:
        task, model = trainer.task, trainer.task.student
        it = iter(trainer.dataset)
        batches = [next(it)[0] for _ in range(2)]
        merged = Batch(*(torch.cat([getattr(b, f) for b in batches]) for f in
                         ("image", "text", "has_text", "label", "kind")),
                       views={"simclr": torch.cat([b.views["simclr"] for b in batches], dim=1)})
        noise = torch.cat([task.masking_noise(b, 0, j) for j, b in enumerate(batches)])
        combine(task.objectives, model(merged, noise=noise), merged)[0].backward()
        single = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        per_micro = sum(combine(task.objectives, model(b, noise=task.masking_noise(b, 0, j)), b)[0] / 2
                        for j, b in enumerate(batches))
        per_micro.backward()  # what accumulating per micro-batch losses gives: 5 negatives instead of 11
        separate = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        captured = {}
        trainer.optimizer.step = lambda *a, **k: captured.update(
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert trainer.train_step(batches) is not None
        flat = lambda g: torch.cat([g[n].flatten() for n in sorted(g)])  # noqa: E731
        assert set(captured) == set(single) and flat(single).abs().max() > 1e-3
        assert torch.allclose(flat(captured), flat(single), atol=1e-5, rtol=0)
        assert not torch.allclose(flat(separate), flat(single), atol=1e-4, rtol=0)
    finally:
        trainer.release()
