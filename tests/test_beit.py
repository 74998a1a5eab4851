"""BEiT masked token prediction (Bao et al. 2021): the loss against the paper's formula written out by hand, the
tokenizer's code assignment against torch.cdist, the k-means fit (deterministic, lowers the inertia, fitted once from
the unmasked image, identical on two ranks), the decoder head on the shared masked pass, and real training steps on
the digits shards with the codebook saved in the checkpoint and kept across a resume."""
import copy
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_config, step_metrics
from vlp.config import ConfigError, config_from_dict
from vlp.data.batch import Batch
from vlp.objectives.base import BuildContext
from vlp.objectives.beit import BEiTObjective, assign, beit_loss, kmeans, patch_features
from vlp.objectives.masked_decoder import patchify
from vlp.task import PretrainTask
from vlp.train import Trainer

CFG = {"data": {"sources": [{"kind": "unlabeled", "shards": "x.tar"}], "batch": {"unlabeled": 4}},
       "model": {"name": "vlp-test-vit", "mask_ratio": 0.75},
       "objectives": {"beit": {"codebook_size": 16, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2}}}


def reference_loss(logits, codes, mask):
    """BEiT Eq. 1 by hand: -log p(z_i | x^M) = -(logit_{z_i} - log sum_k exp logit_k) at each masked i, averaged
    over the masked positions of the batch."""
    terms = []
    for b in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if mask[b, i] == 1:
                row = logits[b, i].double()
                terms.append(-(row[codes[b, i]] - math.log(sum(math.exp(v) for v in row.tolist()))))
    return sum(terms) / len(terms)


def test_loss_is_the_mean_negative_log_likelihood_of_the_codes_at_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, 7, generator=g) * 3
    codes = torch.randint(0, 7, (3, 10), generator=g)
    mask = (torch.rand(3, 10, generator=g) < 0.6).float()
    assert beit_loss(logits, codes, mask).item() == pytest.approx(reference_loss(logits, codes, mask), rel=1e-6)
    # the unmasked positions do not count: changing their logits or codes changes nothing
    other = torch.where(mask.bool()[..., None], logits, torch.randn(3, 10, 7, generator=g))
    other_codes = torch.where(mask.bool(), codes, (codes + 1) % 7)
    assert beit_loss(other, other_codes, mask).item() == pytest.approx(beit_loss(logits, codes, mask).item())


def test_codes_are_the_nearest_centroids_by_cdist():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(2, 50, 12, generator=g), torch.randn(9, 12, generator=g)
    want = torch.cdist(x.reshape(-1, 12).double(), c.double()).argmin(1).reshape(2, 50)
    assert torch.equal(assign(x, c), want)
    assert torch.equal(assign(x, c, chunk=7), want)  # chunking changes nothing


def test_patch_features_are_per_patch_normalized_pixels():
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    f = patch_features(img, 4)
    p = patchify(img, 4)[1, 5]
    assert f.shape == (2, 16, 48)
    assert torch.allclose(f[1, 5], (p - p.mean()) / (p.var() + 1e-6).sqrt(), atol=1e-6)


def test_kmeans_is_deterministic_lowers_the_inertia_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 6, generator=g) * 10
    x = (centers[:, None] + 0.1 * torch.randn(4, 100, 6, generator=g)).reshape(-1, 6)
    x = x[torch.randperm(400, generator=g)]
    c1, inertia = kmeans(x, 8, 10, torch.Generator().manual_seed(0))
    c2, _ = kmeans(x, 8, 10, torch.Generator().manual_seed(0))
    assert torch.equal(c1, c2)
    assert all(b <= a + 1e-6 for a, b in zip(inertia, inertia[1:])) and inertia[-1] < inertia[0]
    # k = the true number of well-separated clusters: each true center gets a centroid within the noise
    c4, inertia4 = kmeans(x, 4, 20, torch.Generator().manual_seed(1))
    assert inertia4[-1] < 0.1 ** 2 * 6 * 1.5
    assert torch.cdist(centers, c4).min(1).values.max() < 0.1
    with pytest.raises(ValueError, match="centroids from only"):
        kmeans(x[:3], 4, 1, torch.Generator())


def test_objective_fits_its_codebook_once_from_the_unmasked_images_and_scores_its_codes():
    g = torch.Generator().manual_seed(4)
    obj = BEiTObjective(BEiTObjective.Config(codebook_size=8, kmeans_iters=5),
                        BuildContext(cfg=None, patch=4, is_vit=True, seed=7))
    images = torch.randn(3, 3, 16, 16, generator=g)
    logits = torch.randn(3, 16, 8, generator=g)
    mask = (torch.rand(3, 16, generator=g) < 0.75).float()
    loss, metrics = obj({"beit/logits": logits, "beit/mask": mask}, {"image": images})
    assert obj.fitted == 1 and set(metrics) == {"acc", "codes_used"}
    x = patch_features(images, 4)
    # the codebook is k-means of the batch's normalized pixel patches (every patch, masked or not), seeded by the seed
    again = BEiTObjective(BEiTObjective.Config(codebook_size=8, kmeans_iters=5),
                          BuildContext(cfg=None, patch=4, is_vit=True, seed=7))
    again.fit(x)
    assert torch.equal(again.codebook, obj.codebook)
    codes = torch.cdist(x.reshape(-1, 48).double(), obj.codebook.double()).argmin(1).reshape(3, 16)
    assert loss.item() == pytest.approx(reference_loss(logits, codes, mask), rel=1e-6)
    # a later batch is coded with the same codebook, not refitted
    before = obj.codebook.clone()
    obj({"beit/logits": logits, "beit/mask": mask}, {"image": torch.randn(3, 3, 16, 16, generator=g)})
    assert torch.equal(obj.codebook, before)
    assert set(obj.state_dict()) == {"codebook", "fitted"}  # what the task writes to objectives.safetensors


def test_fit_uses_at_most_fit_patches_sampled_with_the_seed():
    from vlp.data.sources import stream_seed

    x = torch.randn(48, 12, generator=torch.Generator().manual_seed(6))
    obj = BEiTObjective(BEiTObjective.Config(codebook_size=4, kmeans_iters=3, fit_patches=20),
                        BuildContext(cfg=None, patch=2, is_vit=True, seed=9))
    obj.fit(x)
    pick = torch.randperm(48, generator=torch.Generator().manual_seed(stream_seed(9, "beit-fit-sample", 0)))[:20]
    want, _ = kmeans(x[pick], 4, 3, torch.Generator().manual_seed(stream_seed(9, "beit-codebook")))
    assert torch.equal(obj.codebook, want)
    full = BEiTObjective(BEiTObjective.Config(codebook_size=4, kmeans_iters=3),
                         BuildContext(cfg=None, patch=2, is_vit=True, seed=9))
    full.fit(x)
    assert not torch.equal(full.codebook, obj.codebook)


def test_a_saved_codebook_is_used_as_is(tmp_path):
    book = torch.randn(5, 48)
    save_file({"beit.codebook": book}, str(tmp_path / "objectives.safetensors"))
    obj = BEiTObjective(BEiTObjective.Config(codebook=str(tmp_path / "objectives.safetensors")),
                        BuildContext(cfg=None, patch=4, is_vit=True))
    assert obj.fitted == 1 and torch.equal(obj.codebook, book)
    save_file({"codebook": torch.randn(5, 12)}, str(tmp_path / "small.safetensors"))
    with pytest.raises(ValueError, match=r"need \[K, 48\]"):
        BEiTObjective(BEiTObjective.Config(codebook=str(tmp_path / "small.safetensors")),
                      BuildContext(cfg=None, patch=4, is_vit=True))


def test_config_errors_name_the_key():
    no_mask = copy.deepcopy(CFG)
    no_mask["model"]["mask_ratio"] = 0.0
    with pytest.raises(ConfigError, match="objectives.beit: model.mask_ratio is 0"):
        PretrainTask(config_from_dict(no_mask, check_files=False))
    too_many = copy.deepcopy(CFG)
    too_many["objectives"]["beit"]["codebook_size"] = 100  # 4 rows x 16 patches = 64
    with pytest.raises(ConfigError, match="objectives.beit.codebook_size: 100 centroids, but .* 64 patches"):
        PretrainTask(config_from_dict(too_many, check_files=False))
    # the default (512) is capped to the first step's patches, with a warning; a value set is not
    default = copy.deepcopy(CFG)
    del default["objectives"]["beit"]["codebook_size"]
    task = PretrainTask(config_from_dict(default, check_files=False))
    assert task.objectives["beit"][0].codebook.shape == (64, 8 * 8 * 3)
    assert task.student.beit_decoder.decoder.pred.out_features == 64


def test_head_decodes_the_shared_masked_pass_into_code_logits():
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(copy.deepcopy(CFG), check_files=False))
    student, head = task.student.train(), task.student.beit_decoder
    batch = Batch(image=torch.randn(4, 3, 32, 32), text=torch.zeros(4, 16, dtype=torch.long),
                  has_text=torch.zeros(4, dtype=torch.bool), label=torch.full((4,), -1), kind=torch.full((4,), 2),
                  views={})
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    out = student(batch, noise=noise)
    assert out["beit/logits"].shape == (4, 16, 16) and torch.equal(out["beit/mask"], out["mask"])
    assert out["mask"].sum(1).tolist() == [12] * 4
    assert torch.allclose(out["beit/logits"], head.decoder(out["tokens"], out["ids_restore"]))
    loss, _ = task.objectives["beit"][0](out, batch)
    loss.backward()
    assert head.decoder.pred.weight.grad.abs().sum() > 0 and student.clip.visual.conv1.weight.grad.abs().sum() > 0


def test_beit_trains_on_real_shards_and_keeps_its_codebook_across_a_resume(demo_data, tmp_path):
    run = tmp_path / "beit"
    cfg = run_config(demo_data, run, train={"steps": 3, "log_every": 1, "save_every": 2, "progress": False})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
    cfg["data"].update(batch={"unlabeled": 6}, workers=0)
    cfg["objectives"] = {"beit": {"codebook_size": 32, "kmeans_iters": 5, "decoder_width": 32, "decoder_depth": 1,
                                  "decoder_heads": 2}}
    Trainer(config_from_dict(copy.deepcopy(cfg))).fit()
    steps = step_metrics(run)
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(r["loss/beit"]) and r["loss/beit"] > 0 for r in steps.values())
    assert steps[1]["loss/beit"] < math.log(32) * 1.5
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    saved = [load_file(c / "objectives.safetensors") for c in ckpts]
    assert [c.name for c in ckpts] == ["step_00000002", "step_00000003"]
    assert saved[0]["beit.fitted"] == 1 and saved[0]["beit.codebook"].shape == (32, 8 * 8 * 3)
    assert saved[0]["beit.codebook"].abs().sum() > 0
    assert torch.equal(saved[0]["beit.codebook"], saved[1]["beit.codebook"])  # fitted once, at step 1
    cfg["train"]["steps"] = 4
    trainer = Trainer(config_from_dict(cfg), resume="auto")
    obj = trainer.task.objectives["beit"][0]
    assert trainer.step == 3 and obj.fitted == 1 and torch.equal(obj.codebook.cpu(), saved[1]["beit.codebook"])
    trainer.fit()
    last = load_file(sorted((run / "checkpoints").glob("step_*"))[-1] / "objectives.safetensors")
    assert torch.equal(last["beit.codebook"], saved[0]["beit.codebook"])
    assert math.isfinite(step_metrics(run)[4]["loss/beit"])


def _fit_on_rank(rank, path, halves):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    obj = BEiTObjective(BEiTObjective.Config(codebook_size=8, kmeans_iters=5),
                        BuildContext(cfg=None, patch=4, is_vit=True, seed=3))
    obj.fit(halves[rank])
    torch.save(obj.state_dict(), f"{path}.rank{rank}")
    dist.destroy_process_group()


def test_two_ranks_fit_the_codebook_of_the_gathered_patches(tmp_path):
    """2 gloo processes, each with half of the first step's patches: both hold the single-process codebook of all
    of them."""
    x = torch.randn(2, 40, 48, generator=torch.Generator().manual_seed(5))
    torch.multiprocessing.spawn(_fit_on_rank, args=(str(tmp_path / "pg"), [x[0], x[1]]), nprocs=2)
    single = BEiTObjective(BEiTObjective.Config(codebook_size=8, kmeans_iters=5),
                           BuildContext(cfg=None, patch=4, is_vit=True, seed=3))
    single.fit(x.reshape(-1, 48))
    for rank in range(2):
        state = torch.load(tmp_path / f"pg.rank{rank}")
        assert torch.equal(state["codebook"], single.codebook) and state["fitted"] == 1
