"""Colorization (Zhang, Isola & Efros 2016): Lab conversion, the in-gamut ab bins, the soft-encoded, class-rebalanced
multinomial cross-entropy against a direct numpy transcription of the paper's Eq. 2-4, the head reading the L
channel, the running prior saved with the objective, and a few real training steps on the digits shards."""
import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config, step_metrics
from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives.colorization import (ColorizationObjective, ab_bins, lightness_image, rgb_to_lab,
                                         soft_encode)
from vlp.task import PretrainTask
from vlp.train import Trainer

CFG = {"data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": 3}},
       "model": {"name": "vlp-test-vit", "mask_ratio": 0.0},
       "objectives": {"colorization": {"hidden_dim": 16}}}


def test_rgb_to_lab_matches_the_published_values_of_the_srgb_primaries():
    """CIE Lab (D65, 2 degrees) of sRGB red, green, blue, white, black and a mid grey, as tabulated (and as
    skimage.color.rgb2lab, the paper's conversion, gives them)."""
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0, 0, 0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    want = torch.tensor([[53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793], [32.2970, 79.1875, -107.8602],
                         [100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.3889, 0.0, 0.0]], dtype=torch.float64)
    lab = rgb_to_lab(rgb.T[:, :, None])[:, :, 0].T
    assert torch.allclose(lab, want, atol=0.02), lab


def test_lightness_image_is_the_neutral_grey_of_the_same_lightness():
    rgb = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    gray = lightness_image(rgb)
    assert gray.shape == rgb.shape and torch.equal(gray[:, 0], gray[:, 2])
    lab, lab_gray = rgb_to_lab(rgb), rgb_to_lab(gray)
    assert torch.allclose(lab_gray[:, 0], lab[:, 0], atol=1e-3)
    assert lab_gray[:, 1:].abs().max() < 0.02  # D65's rounded white point: skimage's grey has |a|, |b| < 0.01 too


def test_gamut_bins_are_the_grid_points_8bit_srgb_colours_round_to():
    bins, grid = ab_bins("gamut"), ab_bins("grid")
    assert bins.shape == (261, 2) and grid.shape == (529, 2)
    assert torch.equal(bins % 10, torch.zeros_like(bins)) and bins.abs().max() <= 110
    assert {tuple(b) for b in bins.tolist()} <= {tuple(g) for g in grid.tolist()}
    assert bins[:, 0].min() == -90 and bins[:, 0].max() == 100 and bins[:, 1].min() == -110  # pts_in_hull's range
    rgb = torch.randint(0, 256, (3, 50000, 1), generator=torch.Generator().manual_seed(0)).double() / 255
    ab = rgb_to_lab(rgb)[1:, :, 0].T
    seen = {tuple(p) for p in (torch.round(ab / 10) * 10).tolist()}
    assert seen <= {tuple(b) for b in bins.tolist()}


def reference_loss(logits, ab, centers, lam=0.5, sigma=5.0, prior_sigma=5.0, k=5):
    """Zhang et al. 2016 transcribed in numpy, dense over the Q bins: Z (k nearest bins, Gaussian sigma, summing to
    1), p the histogram of each pixel's nearest bin, p~ = p convolved with a Gaussian on the ab plane (prior_sigma),
    w = ((1 - lam) p~ + lam / Q)^-1 scaled so that E_p~[w] = 1, v = w[argmax Z], loss = mean over pixels of
    -v sum_q Z_q log softmax(logit of the pixel's cell)_q (predictions upsampled by repetition)."""
    logits, ab, c = logits.astype(np.float64), ab.astype(np.float64), centers.astype(np.float64)
    B, h, w, Q = logits.shape
    H, W = ab.shape[2:]
    px = ab.transpose(0, 2, 3, 1).reshape(-1, 2)
    Z = np.zeros((len(px), Q))
    for i, p in enumerate(px):
        d2 = ((c - p) ** 2).sum(1)
        near = np.argsort(d2, kind="stable")[:k]
        Z[i, near] = np.exp(-d2[near] / (2 * sigma ** 2))
        Z[i] /= Z[i].sum()
    hard = Z.argmax(1)
    p = np.bincount(hard, minlength=Q) / len(hard)
    smooth = np.array([sum(p[j] * math.exp(-((c[q] - c[j]) ** 2).sum() / (2 * prior_sigma ** 2)) for j in range(Q))
                       for q in range(Q)])
    smooth /= smooth.sum()
    wq = 1 / ((1 - lam) * smooth + lam / Q)
    wq /= (smooth * wq).sum()
    up = logits.repeat(H // h, axis=1).repeat(W // w, axis=2).reshape(-1, Q)
    logp = up - up.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return float(np.mean(-wq[hard] * (Z * logp).sum(1))), wq, smooth


def test_loss_is_the_papers_rebalanced_soft_encoded_cross_entropy():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 8, 8, generator=g)
    rgb[0, :, :4] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red block: a skewed colour distribution
    ab = rgb_to_lab(rgb)[:, 1:]
    logits = torch.randn(2, 4, 4, 261, generator=g)  # one prediction per 2x2 pixels
    obj = ColorizationObjective()
    loss, metrics = obj({"colorization/logits": logits, "colorization/ab": ab}, None)
    want, wq, smooth = reference_loss(logits.numpy(), ab.numpy(), ab_bins("gamut").numpy())
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(obj.weights().double(), torch.from_numpy(wq), rtol=1e-4)
    assert float((smooth * wq).sum()) == pytest.approx(1.0)
    assert obj.batches == 1 and set(metrics) == {"acc"}
    # lambda = 1: every weight is 1, the loss is the plain soft-encoded cross-entropy; rebalance off: the same
    flat_obj = ColorizationObjective(ColorizationObjective.Config(rebalance_lambda=1.0))
    flat = flat_obj({"colorization/logits": logits, "colorization/ab": ab}, None)[0]
    assert flat.item() == pytest.approx(reference_loss(logits.numpy(), ab.numpy(), ab_bins("gamut").numpy(),
                                                       lam=1.0)[0], rel=1e-5)
    off_obj = ColorizationObjective(ColorizationObjective.Config(rebalance=False))
    off = off_obj({"colorization/logits": logits, "colorization/ab": ab}, None)[0]
    assert off.item() == pytest.approx(flat.item(), rel=1e-6)


def test_soft_encoding_puts_the_most_mass_on_the_nearest_bin():
    centers = ab_bins("gamut")
    idx, z = soft_encode(torch.tensor([[20.0, 30.0], [23.0, 31.0]]), centers)
    assert idx.shape == z.shape == (2, 5) and torch.allclose(z.sum(1), torch.ones(2))
    assert centers[idx[0, 0]].tolist() == [20.0, 30.0] and (z[:, 0] >= z[:, 1:].max(1).values).all()
    # at a bin center, its 4 grid neighbours are at 10: weight exp(-100 / 50) each relative to 1
    assert torch.allclose(z[0], torch.tensor([1, *[math.exp(-2)] * 4]) / (1 + 4 * math.exp(-2)), atol=1e-6)


def test_prior_is_the_running_mean_of_the_batch_histograms_and_is_saved():
    obj = ColorizationObjective()
    a, b = torch.tensor([0, 0, 1, 2]), torch.tensor([2, 2, 2, 2, 2, 2, 2, 5])
    obj.update_prior(a)
    obj.update_prior(b)
    want = (torch.bincount(a, minlength=261) / 4 + torch.bincount(b, minlength=261) / 8) / 2
    assert torch.allclose(obj.bin_freq, want) and obj.batches == 2
    assert set(obj.state_dict()) == {"bin_freq", "batches"}  # what the task writes to objectives.safetensors
    fresh = ColorizationObjective()
    fresh.load_state_dict(obj.state_dict())
    assert torch.allclose(fresh.weights(), obj.weights())


def test_head_predicts_from_the_students_tokens_of_the_l_channel():
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(copy.deepcopy(CFG), check_files=False))
    student, head = task.student.train(), task.student.colorization_head
    assert task.view_groups[0].name == "colorization" and head.cells == 2  # patch 8, stride 4
    rgb = torch.rand(3, 3, 32, 32)
    batch = Batch(image=torch.randn(3, 3, 32, 32), text=torch.zeros(3, 16, dtype=torch.long),
                  has_text=torch.zeros(3, dtype=torch.bool), label=torch.full((3,), -1), kind=torch.full((3,), 2),
                  views={"colorization": rgb[None]})
    out = student(batch)
    assert out["colorization/logits"].shape == (3, 8, 8, 261)
    assert torch.allclose(out["colorization/ab"], rgb_to_lab(rgb)[:, 1:])
    mean, std = task.ctx.mean, task.ctx.std
    gray = (lightness_image(rgb) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    tokens = student.encode_visible(gray, None)[1]                     # [3, 16, width]: a 4x4 patch grid
    ref = head.mlp(tokens).view(3, 4, 4, 2, 2, 261)
    assert torch.allclose(out["colorization/logits"][:, 2:4, 4:6], ref[:, 1, 2], atol=1e-5)  # patch (1, 2)'s cells
    # the colour of the view does not reach the encoder: a view of the same lightness, other hues, same logits
    swapped = Batch(**{**batch.__dict__, "views": {"colorization": lightness_image(rgb)[None]}})
    assert torch.allclose(student(swapped)["colorization/logits"], out["colorization/logits"], atol=1e-4)
    loss, _ = task.objectives["colorization"][0](out, batch)
    loss.backward()
    assert head.mlp[0].weight.grad.abs().sum() > 0 and student.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_colorization_trains_on_real_shards_and_checkpoints_its_prior(demo_data, tmp_path):
    cfg = run_config(demo_data, tmp_path / "color", train={"steps": 3, "log_every": 1, "save_every": 3,
                                                            "progress": False})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
    cfg["data"].update(batch={"unlabeled": 6}, workers=0)
    cfg["objectives"] = {"colorization": {"hidden_dim": 32}}
    Trainer(config_from_dict(cfg)).fit()
    steps = step_metrics(tmp_path / "color")
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(r["loss/colorization"]) and r["loss/colorization"] > 0 for r in steps.values())
    last = sorted((tmp_path / "color" / "checkpoints").glob("step_*"))[-1]
    state = load_file(last / "objectives.safetensors")
    assert state["colorization.batches"] == 3 and state["colorization.bin_freq"].sum() == pytest.approx(1.0)


def _prior_on_rank(rank, path, halves):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    obj = ColorizationObjective()
    for step in halves[rank]:
        obj.update_prior(step)
    torch.save(obj.state_dict(), f"{path}.rank{rank}")
    dist.destroy_process_group()


def test_prior_is_all_reduced_so_two_ranks_keep_the_prior_of_the_global_batch(tmp_path):
    """2 gloo processes, each holding half of every step's pixels: both end with the single-process prior of the
    whole batches."""
    g = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 261, (2, 40), generator=g) for _ in range(3)]
    halves = [[s[0] for s in steps], [s[1] for s in steps]]
    torch.multiprocessing.spawn(_prior_on_rank, args=(str(tmp_path / "pg"), halves), nprocs=2)
    single = ColorizationObjective()
    for s in steps:
        single.update_prior(s)
    for rank in range(2):
        state = torch.load(tmp_path / f"pg.rank{rank}")
        assert torch.allclose(state["bin_freq"], single.bin_freq) and state["batches"] == 3
