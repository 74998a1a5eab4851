"""Context prediction (Doersch, Gupta & Efros 2015): the 3x3 grid with gap and jitter, the 8 relative-position labels
against hand-computed geometry, each patch encoded alone, cross-entropy over the 8 positions, colour dropping, and a
few real training steps on the digits shards."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import run_config, step_metrics
from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives.base import BuildContext
from vlp.objectives.context import ContextObjective, context_geometry, drop_colors
from vlp.task import PretrainTask
from vlp.train import Trainer

CFG = {"data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": 4}},
       "model": {"name": "vlp-tiny-vit", "mask_ratio": 0.0},
       "objectives": {"context": {"patch_dim": 8, "hidden_dim": 16}}}

# label -> the neighbour's (row, col) on the 3x3 grid, as the paper's Fig. 2 numbers them (1..8, here 0..7)
HAND = {0: (0, 0), 1: (0, 1), 2: (0, 2), 3: (1, 0), 4: (1, 2), 5: (2, 0), 6: (2, 1), 7: (2, 2)}


def task(**settings):
    cfg = copy.deepcopy(CFG)
    cfg["objectives"]["context"].update(settings)
    torch.manual_seed(0)
    return PretrainTask(config_from_dict(cfg, check_files=False))


def test_default_geometry_scales_the_papers_to_the_image():
    c = ContextObjective.Config()
    assert context_geometry(c, BuildContext(cfg=None, patch=4, is_vit=True, image_size=32)) == (12, 6, 1)
    assert context_geometry(c, BuildContext(cfg=None, patch=16, is_vit=True, image_size=224)) == (80, 40, 6)
    assert context_geometry(ContextObjective.Config(patch_size=8, gap=2, jitter=0),
                            BuildContext(cfg=None, patch=4, is_vit=True, image_size=32)) == (8, 2, 0)
    with pytest.raises(ValueError, match="patch_size: 10 is not a multiple of the ViT patch size 4"):
        context_geometry(ContextObjective.Config(patch_size=10), BuildContext(cfg=None, patch=4, is_vit=True))
    with pytest.raises(ValueError, match="needs a ViT"):
        context_geometry(c, BuildContext(cfg=None, is_vit=False))
    t = task()
    head = t.student.context_head
    assert (head.tile, head.gap, head.jitter) == (12, 6, 1)
    assert t.view_groups[0].name == "context" and t.view_groups[0].recipe.endswith("@50")  # 3*12 + 2*6 + 2*1


def test_patches_are_cut_at_the_hand_computed_corners():
    """Top-left of grid cell (r, c) in the 50px view: 1 + 18 r, 1 + 18 c (jitter margin 1, pitch 12 + 6), moved by
    the jitter; the center's is (19, 19)."""
    head = task().student.context_head
    view = torch.randn(4, 3, 50, 50)
    torch.manual_seed(3)
    patches, target = head.sample(view)
    torch.manual_seed(3)
    drawn = torch.randint(0, 8, (4,))
    jitter = torch.randint(-1, 2, (4, 2, 2))
    assert torch.equal(drawn, target) and patches.shape == (4, 2, 3, 12, 12)
    for b in range(4):
        r, c = HAND[int(target[b])]
        for i, (y, x) in enumerate([(19, 19), (1 + 18 * r, 1 + 18 * c)]):
            y, x = y + int(jitter[b, i, 0]), x + int(jitter[b, i, 1])
            assert torch.equal(patches[b, i], view[b, :, y:y + 12, x:x + 12]), (b, i)
    # the extreme jitters stay inside the view and keep a gap of at least 6 - 2 = 4 pixels between patches
    corners = head.corners(torch.tensor([[0, 0], [2, 2], [1, 1]]), torch.tensor([[-1, -1], [1, 1], [1, 1]]))
    assert corners.tolist() == [[0, 0], [38, 38], [20, 20]] and 38 + 12 == 50
    assert 20 - (1 + 18 * 0 + 1 + 12) == 6 and (1 + 18 - 1) - (1 + 1 + 12) == 4


def test_labels_name_the_neighbours_position_relative_to_the_center():
    """A view whose every grid cell is painted with its own (row, col): the neighbour patch shows the cell its label
    names, whatever the jitter; the center patch always shows (1, 1)."""
    head = task().student.context_head
    view = torch.full((1, 3, 50, 50), -1.0)
    for r in range(3):
        for c in range(3):
            y, x = 18 * r, 18 * c  # the cell with its jitter margin: rows 18 r .. 18 r + 14
            view[0, 0, y:y + 14, x:x + 14], view[0, 1, y:y + 14, x:x + 14] = r, c
    view = view.expand(64, -1, -1, -1)
    torch.manual_seed(0)
    patches, target = head.sample(view)
    assert set(target.tolist()) == set(range(8))
    for b in range(64):
        cells = [tuple(int(ch.unique().item()) for ch in patches[b, i, :2]) for i in range(2)]  # one value each
        assert cells == [(1, 1), HAND[int(target[b])]], b


def test_loss_is_cross_entropy_over_the_eight_positions_of_each_pair():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(6, 8, generator=g), torch.tensor([0, 3, 7, 4, 1, 6])
    loss, m = ContextObjective()({"context/logits": logits, "context/target": target}, None)
    manual = -torch.log_softmax(logits, 1)[torch.arange(6), target].mean()
    assert torch.allclose(loss, manual, atol=1e-6) and m["acc"] == (logits.argmax(1) == target).float().mean()


def test_head_encodes_each_patch_alone_and_classifies_the_concatenation():
    t = task()
    student, head = t.student.train(), t.student.context_head
    view = torch.randn(4, 3, 50, 50)
    batch = Batch(image=torch.randn(4, 3, 32, 32), text=torch.zeros(4, 16, dtype=torch.long),
                  has_text=torch.zeros(4, dtype=torch.bool), label=torch.full((4,), -1), kind=torch.full((4,), 2),
                  views={"context": view[None]})
    torch.manual_seed(1)
    out = student(batch)
    torch.manual_seed(1)
    patches, target = head.sample(view)
    assert torch.equal(out["context/target"], target) and out["context/logits"].shape == (4, 8)
    center, neighbour = (head.patch_fc(student.encode_pooled(patches[:, i])) for i in range(2))
    ref = head.classifier(torch.cat([center, neighbour], dim=1))
    assert torch.allclose(out["context/logits"], ref, atol=1e-5)
    loss, _ = t.objectives["context"][0](out, batch)
    assert torch.allclose(loss, F.cross_entropy(ref, target), atol=1e-5)
    loss.backward()
    assert student.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_pair_encoding_is_both_patches_as_one_image_each_feature_the_mean_of_its_tokens():
    """``encode: pair``: center | neighbour side by side (12 x 24 px: a 3 x 6 token grid on patch 4), each patch's
    feature the mean of the 9 tokens over it, then the same fc6 and classifier."""
    t = task(encode="pair")
    student, head = t.student.train(), t.student.context_head
    torch.manual_seed(0)
    patches = torch.randn(3, 2, 3, 12, 12)
    image = torch.cat([patches[:, 0], patches[:, 1]], dim=-1)
    assert image.shape == (3, 3, 12, 24) and torch.equal(image[:, :, :, 12:], patches[:, 1])
    tokens = student.encode_visible(image, None)[1].view(3, 3, 6, -1)   # [B, rows, cols, width]
    center, neighbour = tokens[:, :, :3].mean(dim=(1, 2)), tokens[:, :, 3:].mean(dim=(1, 2))
    ref = head.classifier(torch.cat([head.patch_fc(center), head.patch_fc(neighbour)], dim=1))
    logits = head.classify(student, patches)
    assert torch.allclose(logits, ref, atol=1e-5)
    F.cross_entropy(logits, torch.tensor([0, 4, 7])).backward()
    assert student.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_tile_norm_normalizes_each_patch_channel_alone():
    head = task(tile_norm=True).student.context_head
    torch.manual_seed(0)
    patches, _ = head.sample(torch.randn(8, 3, 50, 50) * 3 + 2)
    flat = patches.flatten(-2)
    assert torch.allclose(flat.mean(-1), torch.zeros(8, 2, 3), atol=1e-5)
    assert torch.allclose(flat.std(-1), torch.ones(8, 2, 3), atol=1e-4)


def test_color_dropping_keeps_one_channel_and_fills_the_others_with_faint_noise():
    torch.manual_seed(0)
    patches = torch.randn(50, 2, 3, 12, 12) * 2 + 1
    out = drop_colors(patches, 0.01)
    kept = (out == patches).flatten(-2).all(-1)                       # [50, 2, 3]
    assert torch.equal(kept.sum(-1), torch.ones(50, 2, dtype=torch.long))
    assert len(set(kept.float().argmax(-1).flatten().tolist())) == 3  # each channel gets kept somewhere
    std = patches[kept].flatten(1).std(1)                             # the kept channel's std, per patch
    dropped = out[~kept].view(100, 2, -1)
    assert torch.allclose(dropped.std(-1), 0.01 * std[:, None].expand(100, 2), rtol=0.25)
    assert dropped.mean(-1).abs().max() < 0.01
    head = task(color_drop=True).student.context_head
    torch.manual_seed(2)
    got, _ = head.sample(torch.randn(4, 3, 50, 50))
    assert ((got.abs().flatten(-2).amax(-1) < 0.2).sum(-1) == 2).all()  # two faint channels in every patch


@pytest.mark.parametrize("settings", [{"color_drop": True}, {"encode": "pair", "tile_norm": True}])
def test_context_trains_on_real_shards(demo_data, tmp_path, settings):
    cfg = run_config(demo_data, tmp_path / "ctx", train={"steps": 3, "log_every": 1, "save_every": 3,
                                                          "progress": False})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
    cfg["data"].update(batch={"unlabeled": 6}, workers=0)
    cfg["objectives"] = {"context": {"patch_dim": 8, "hidden_dim": 16, **settings}}
    Trainer(config_from_dict(cfg)).fit()
    steps = step_metrics(tmp_path / "ctx")
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(r["loss/context"]) and r["loss/context"] > 0 and "context/acc" in r
               for r in steps.values())
