"""Jigsaw puzzles (Noroozi & Favaro 2016): the fixed permutation set, tiles cut from the 3x3 cells and shuffled by
the drawn permutation, each tile encoded alone, cross-entropy over the permutations."""
import copy

import pytest
import torch
import torch.nn.functional as F

from vlp.config import config_from_dict
from vlp.data.batch import Batch
from vlp.objectives.base import BuildContext
from vlp.objectives.jigsaw import (JigsawObjective, assemble, cut_tiles, max_hamming_permutations,
                                   normalize_tiles, tile_geometry, tile_token_means)
from vlp.task import PretrainTask

CFG = {"data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": 3}},
       "model": {"name": "vlp-test-vit", "mask_ratio": 0.0},
       "objectives": {"jigsaw": {"n_permutations": 10, "tile_dim": 8, "hidden_dim": 16}}}


def test_permutation_set_is_deterministic_distinct_and_far_apart():
    p = max_hamming_permutations(30, 0)
    assert p.shape == (30, 9) and torch.equal(p.sort(1).values, torch.arange(9).expand(30, 9))  # permutations
    assert len({tuple(r) for r in p.tolist()}) == 30
    assert torch.equal(p, max_hamming_permutations.__wrapped__(30, 0))  # recomputed, not only cached
    assert not torch.equal(p, max_hamming_permutations(30, 1))
    assert torch.equal(max_hamming_permutations(10, 0), p[:10])  # greedy: a prefix of the larger set
    d = (p[:, None] != p[None]).sum(-1)
    assert d[~torch.eye(30, dtype=torch.bool)].min() >= 7  # far apart (random pairs average 8)
    with pytest.raises(ValueError, match="n_permutations"):
        max_hamming_permutations.__wrapped__(0, 0)


def test_tiles_are_cut_from_their_cells_at_the_offsets():
    g = torch.Generator().manual_seed(0)
    view = torch.randn(2, 3, 15, 15, generator=g)  # cells of 5, tiles of 3
    offsets = torch.randint(0, 3, (2, 9, 2), generator=g)
    tiles = cut_tiles(view, 3, offsets)
    assert tiles.shape == (2, 9, 3, 3, 3)
    for b in range(2):
        for t in range(9):
            y, x = 5 * (t // 3) + offsets[b, t, 0], 5 * (t % 3) + offsets[b, t, 1]
            assert torch.equal(tiles[b, t], view[b, :, y:y + 3, x:x + 3]), (b, t)
    whole = cut_tiles(view[:, :, :15, :15], 5, torch.zeros(2, 9, 2, dtype=torch.long))  # gap 0: the image again
    assert torch.equal(whole.reshape(2, 3, 3, 3, 5, 5).permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 15, 15), view)


def test_puzzle_shuffles_by_the_target_permutation_and_the_loss_is_cross_entropy():
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(copy.deepcopy(CFG), check_files=False))
    obj, student = task.objectives["jigsaw"][0], task.student.train()
    head = student.jigsaw_head
    assert (head.tile, head.gap) == (8, 8) and task.view_groups[0].name == "jigsaw"
    view = torch.randn(3, 3, 48, 48)
    torch.manual_seed(1)
    tiles, target = head.puzzle(view)
    torch.manual_seed(1)
    offsets = torch.randint(0, head.gap + 1, (3, 9, 2))
    unshuffled = normalize_tiles(cut_tiles(view, 8, offsets))  # tile_norm: on by default, as the paper
    for b in range(3):
        for i, src in enumerate(head.permutations[target[b]].tolist()):
            assert torch.equal(tiles[b, i], unshuffled[b, src])
    batch = Batch(image=torch.randn(3, 3, 32, 32), text=torch.zeros(3, 16, dtype=torch.long),
                  has_text=torch.zeros(3, dtype=torch.bool), label=torch.full((3,), -1), kind=torch.full((3,), 2),
                  views={"jigsaw": view[None]})
    torch.manual_seed(1)
    out = student(batch)
    assert torch.equal(out["jigsaw/target"], target)
    assert torch.allclose(out["jigsaw/logits"], head.classify(student, tiles), atol=1e-5)
    assert out["jigsaw/logits"].shape == (3, 10)
    loss, metrics = obj(out, batch)
    assert torch.allclose(loss, F.cross_entropy(out["jigsaw/logits"], target)) and set(metrics) == {"acc"}
    # each tile is encoded alone: a tile's feature does not depend on the others
    alone = student.encode_pooled(tiles[0, :1])
    assert torch.allclose(student.encode_pooled(tiles[0])[:1], alone, atol=1e-5)


def test_tile_geometry_defaults_to_a_third_of_the_image_on_the_patch_grid():
    c = JigsawObjective.Config()
    assert tile_geometry(c, BuildContext(cfg=None, patch=4, is_vit=True, image_size=32)) == (12, 4)
    assert tile_geometry(c, BuildContext(cfg=None, patch=16, is_vit=True, image_size=224)) == (80, 16)
    assert tile_geometry(JigsawObjective.Config(tile_size=8, gap=0),
                         BuildContext(cfg=None, patch=4, is_vit=True, image_size=32)) == (8, 0)
    with pytest.raises(ValueError, match="tile_size: 10 is not a multiple of the patch size 4"):
        tile_geometry(JigsawObjective.Config(tile_size=10), BuildContext(cfg=None, patch=4, is_vit=True))
    with pytest.raises(ValueError, match="needs a ViT"):
        tile_geometry(c, BuildContext(cfg=None, is_vit=False))


def test_tiles_are_normalized_alone_as_the_authors_code_does():
    """normalize_tiles against Noroozi & Favaro's PyTorch port (bbrattoli/JigsawPuzzlePytorch, JigsawLoader): per
    tile, ``m, s = tile.view(3, -1).mean(dim=1), tile.view(3, -1).std(dim=1); s[s == 0] = 1``, then
    ``transforms.Normalize(m, s)``; a constant channel keeps std 1."""
    from torchvision import transforms as T

    torch.manual_seed(0)
    tiles = torch.rand(2, 9, 3, 6, 6) * 4 - 1
    tiles[0, 4, 1] = 0.5  # a constant channel (its mean exact in float)
    got = normalize_tiles(tiles)
    for b in range(2):
        for t in range(9):
            tile = tiles[b, t]
            m, s = tile.view(3, -1).mean(dim=1), tile.view(3, -1).std(dim=1)
            s[s == 0] = 1
            assert torch.allclose(got[b, t], T.Normalize(m.tolist(), s.tolist())(tile), atol=1e-6)
    assert torch.equal(got[0, 4, 1], torch.zeros(6, 6))


def test_tile_norm_off_keeps_the_raw_tiles():
    cfg = copy.deepcopy(CFG)
    cfg["objectives"]["jigsaw"]["tile_norm"] = False
    head = PretrainTask(config_from_dict(cfg, check_files=False)).student.jigsaw_head
    view = torch.randn(2, 3, 48, 48)
    torch.manual_seed(1)
    tiles, target = head.puzzle(view)
    torch.manual_seed(1)
    raw = cut_tiles(view, 8, torch.randint(0, head.gap + 1, (2, 9, 2)))
    assert torch.equal(tiles, raw[torch.arange(2)[:, None], head.permutations[target]])


def test_assemble_puts_each_tile_at_its_position_row_major():
    tiles = torch.arange(2 * 9, dtype=torch.float).view(2, 9, 1, 1, 1).expand(2, 9, 3, 4, 4)
    image = assemble(tiles)
    assert image.shape == (2, 3, 12, 12)
    for b in range(2):
        for i in range(9):
            y, x = divmod(i, 3)
            assert torch.equal(image[b, :, 4 * y:4 * y + 4, 4 * x:4 * x + 4], tiles[b, i])


def test_encode_image_reads_each_tile_from_one_joint_encoding_of_the_shuffled_tiles():
    """``encode: image``: the 9 shuffled tiles side by side are one image through the ViT; a position's feature is
    the mean of its patch tokens, so (unlike the tiles encoded alone) it sees the other tiles."""
    cfg = copy.deepcopy(CFG)
    cfg["objectives"]["jigsaw"]["encode"] = "image"
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(cfg, check_files=False))
    student, head = task.student.eval(), task.student.jigsaw_head
    patch = student.clip.visual.patch_size[0]
    torch.manual_seed(1)
    tiles, _ = head.puzzle(torch.randn(2, 3, 48, 48))
    feats = tile_token_means(student, tiles, patch)
    tokens = student.encode_visible(assemble(tiles), None)[1]          # [2, 36, width]: a 6x6 grid of patches
    side = 3 * tiles.shape[-1] // patch
    grid = tokens.view(2, side, side, -1)
    n = side // 3
    for i in range(9):
        y, x = divmod(i, 3)
        assert torch.allclose(feats[:, i], grid[:, n * y:n * y + n, n * x:n * x + n].mean((1, 2)), atol=1e-5)
    assert torch.allclose(head.classify(student, tiles), head.classifier(head.tile_fc(feats).flatten(1)), atol=1e-5)
    other = tiles.clone()
    other[:, 0] = torch.randn_like(other[:, 0])
    assert not torch.allclose(tile_token_means(student, other, patch)[:, 4], feats[:, 4], atol=1e-4)
