"""SimCLR's NT-Xent against the paper's formula and lightly's NTXentLoss on fixed tensors; the objective's views."""
import pytest
import torch
import torch.nn.functional as F

from vlp.objectives.simclr import SimCLRObjective, nt_xent


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
    z = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    loss, metrics = SimCLRObjective(temperature=0.3)({"simclr/z": z}, None)
    assert torch.allclose(loss, nt_xent(z[0], z[1], 0.3)) and set(metrics) == {"pos_cos"}
    loss.backward()
    assert z.grad[0].abs().sum() > 0 and z.grad[1].abs().sum() > 0  # both views get gradient (no stop-grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, _ = SimCLRObjective(temperature=0.3)({"simclr/z": z.detach().bfloat16()}, None)
    assert low.dtype == torch.float32
