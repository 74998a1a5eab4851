"""Loss values against references on fixed tensors: open_clip's ClipLoss, the MAE paper's formula, UniCL."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from vlp.models.model import random_masking
from vlp.objectives import combine
from vlp.objectives.base import BuildContext
from vlp.objectives.contrastive import ContrastiveObjective, UniCLLoss
from vlp.objectives.masked_decoder import patchify
from vlp.objectives.reconstruction import MAEObjective, mae_loss
from vlp.objectives.supervised import SupervisedObjective


def _features(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt


def test_clip_objective_equals_open_clip_cliploss():
    img, txt = _features()
    scale = torch.tensor(10.0)
    batch = {"label": torch.full((6,), -1), "has_text": torch.ones(6, dtype=torch.bool)}
    loss, metrics = ContrastiveObjective()({"image_features": img, "text_features": txt, "logit_scale": scale},
                                                 batch)
    ref = ClipLoss()(img, txt, scale)
    assert torch.allclose(loss, ref, atol=1e-7)
    # and open_clip's ClipLoss itself against the paper's formula (symmetric cross-entropy over the diagonal)
    logits = scale * img @ txt.T
    manual = -(torch.diag(F.log_softmax(logits, 1)).mean() + torch.diag(F.log_softmax(logits.T, 1)).mean()) / 2
    assert torch.allclose(loss, manual, atol=1e-6)
    assert metrics["logit_scale"] == scale


def test_siglip_objective_equals_open_clip_sigliploss():
    img, txt = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    out = {"image_features": img, "text_features": txt, "logit_scale": scale, "logit_bias": bias}
    siglip = ContrastiveObjective(ContrastiveObjective.Config(loss="siglip"))
    loss, _ = siglip(out, {"label": torch.full((6,), -1), "has_text": torch.ones(6, dtype=bool)})
    assert torch.allclose(loss, SigLipLoss()(img, txt, scale, bias), atol=1e-7)
    # the sigmoid loss formula of Zhai et al. 2023: -sum log sigmoid(z_ij * (t x_i.y_j + b)) / n
    z = 2 * torch.eye(6) - 1
    manual = -F.logsigmoid(z * (scale * img @ txt.T + bias)).sum() / 6
    assert torch.allclose(loss, manual, atol=1e-5)


def test_unicl_reduces_to_clip_when_labels_unique():
    img, txt = _features(8)
    scale = torch.tensor(14.0)
    labels = torch.arange(8)
    assert torch.allclose(UniCLLoss()(img, txt, scale, labels), ClipLoss()(img, txt, scale), atol=1e-6)


def test_unicl_same_label_positives_against_manual_formula():
    img, txt = _features(6)
    scale = torch.tensor(5.0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    loss = UniCLLoss()(img, txt, scale, labels)
    logits = (scale * img @ txt.T).double()
    total = 0.0
    for lg in (logits, logits.T):
        for i in range(6):
            pos = [j for j in range(6) if labels[j] == labels[i]]
            logp = lg[i] - torch.logsumexp(lg[i], 0)
            total += -sum(logp[j] for j in pos) / len(pos) / 6
    assert abs(loss.item() - total.item() / 2) < 1e-5
    # and it differs from CLIP, which would treat same-class rows as negatives
    assert abs(loss.item() - ClipLoss()(img, txt, scale).item()) > 1e-3


def test_unicl_objective_row_ids_keep_paired_rows_unique():
    img, txt = _features(5)
    scale = torch.tensor(5.0)
    # rows 0-2 paired (label -1), rows 3-4 labeled with the same class: only 3 and 4 are mutual positives
    batch = {"label": torch.tensor([-1, -1, -1, 7, 7]), "has_text": torch.ones(5, dtype=torch.bool)}
    out = {"image_features": img, "text_features": txt, "logit_scale": scale}
    loss, _ = ContrastiveObjective(ContrastiveObjective.Config(labels_as_text=True))(out, batch)
    expected = UniCLLoss()(img, txt, scale, torch.tensor([100, 101, 102, 7, 7]))
    assert torch.allclose(loss, expected, atol=1e-7)


def _mae_reference(imgs, pred, mask, p, norm_pix):
    """He et al. 2022 (the official MAE forward_loss), written out independently with plain loops."""
    B, C, H, W = imgs.shape
    total, count = 0.0, 0.0
    for b in range(B):
        n = 0
        for i in range(H // p):
            for j in range(W // p):
                patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)  # (p, q, c)
                if norm_pix:
                    patch = (patch - patch.mean()) / math.sqrt(patch.var().item() + 1e-6)
                err = ((pred[b, n] - patch) ** 2).mean()
                total += err.item() * mask[b, n].item()
                count += mask[b, n].item()
                n += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_loss_matches_paper_formula(norm_pix):
    g = torch.Generator().manual_seed(1)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    p = 4
    pred = torch.randn(3, 16, p * p * 3, generator=g)
    _, mask, _ = random_masking(torch.rand(3, 16, generator=g), 0.75)
    got = mae_loss(pred, imgs, mask, p, norm_pix)
    assert abs(got.item() - _mae_reference(imgs, pred, mask, p, norm_pix)) < 1e-5
    mae = MAEObjective(MAEObjective.Config(norm_pix_loss=norm_pix), BuildContext(cfg=None, patch=p))
    obj_loss, _ = mae({"mae_pred": pred, "mae_mask": mask}, {"image": imgs})
    assert torch.allclose(obj_loss, got)


def test_random_masking_keeps_lowest_noise_and_restores_order():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    ids_keep, mask, ids_restore = random_masking(noise, 0.5)
    assert ids_keep.tolist() == [[1, 3], [3, 0]]
    assert mask.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    x = torch.arange(8).reshape(2, 4)
    shuffled = torch.gather(x, 1, torch.argsort(noise, 1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), x)


def test_patchify_order_matches_conv_token_order():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # token 1 is the top-right patch, channels last within a pixel
    assert torch.equal(patches[0, 1].reshape(4, 4, 3), imgs[0, :, 0:4, 4:8].permute(1, 2, 0))


def test_supervised_cross_entropy_on_labeled_rows_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0], [1.0, 1.0]])
    batch = {"label": torch.tensor([-1, 1, 0, -1])}
    loss, m = SupervisedObjective()({"class_logits": logits}, batch)
    expected = F.cross_entropy(logits[1:3], torch.tensor([1, 0]))
    assert torch.allclose(loss, expected)
    assert m["acc"] == 1.0


def test_combine_weights_losses_and_names_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = {"label": torch.tensor([0, 1]), "image": torch.randn(2, 3, 8, 8)}
    pred, mask = torch.randn(2, 4, 48), torch.ones(2, 4)
    objs = {"supervised": (SupervisedObjective(), 0.5), "mae": (MAEObjective(ctx=BuildContext(cfg=None, patch=4)), 2.0)}
    total, metrics = combine(objs, {"class_logits": logits, "mae_pred": pred, "mae_mask": mask}, batch)
    expected = 0.5 * F.cross_entropy(logits, batch["label"]) + 2.0 * mae_loss(pred, batch["image"], mask, 4)
    assert torch.allclose(total, expected)
    assert set(metrics) == {"loss/supervised", "loss/mae", "supervised/acc", "loss/total"}
