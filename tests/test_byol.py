"""BYOL's loss against the paper's formula: the normalized MSE between prediction and target, symmetrized."""
import torch
import torch.nn.functional as F

from vlp.objectives.byol import BYOLObjective, byol_loss


def test_byol_loss_is_the_papers_normalized_mse_and_stops_the_target_gradient():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, 8, generator=g, requires_grad=True)
    z = torch.randn(5, 8, generator=g, requires_grad=True)
    loss = byol_loss(p, z)
    # Grill et al. 2020, eq. 2: || p/||p|| - z/||z|| ||^2 = 2 - 2 <p, z> / (||p|| ||z||)
    manual = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert torch.allclose(loss, manual, atol=1e-6)
    loss.backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None


def test_byol_objective_symmetrizes_over_the_two_views():
    g = torch.Generator().manual_seed(1)
    p, z = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    loss, metrics = BYOLObjective()({"byol/p": p, "teacher/byol/z": z}, None)
    expected = ((2 - 2 * F.cosine_similarity(p[0], z[1], dim=-1)).mean()
                + (2 - 2 * F.cosine_similarity(p[1], z[0], dim=-1)).mean()) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    assert set(metrics) == {"cos"}
