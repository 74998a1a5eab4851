"""model.mask_policy: attention (A-CLIP, Yang et al. 2023; AttMask, Kakogeorgiou et al. 2022): the teacher's
class-token attention against torch's own attention weights, the noise -> ids_keep path, determinism, the missing
teacher, the FLOPs the teacher pass adds, and real trainer steps on the demo shards."""
import pytest
import torch
from torch import nn

from conftest import run_config
from test_pseudolabel import _batch  # the same 8-row mixed batch (two of each kind, four unlabeled)
from vlp.config import ConfigError, config_from_dict
from vlp.models.model import cls_attention, random_masking
from vlp.task import PretrainTask, attention_noise

CLASSES = ["cat", "dog", "ship"]


def _tree(policy: str = "attention", objectives: dict | None = None, **model) -> dict:
    return {
        "data": {"sources": [{"kind": k, "shards": "x.tar"} for k in ("paired", "labeled", "unlabeled")],
                 "batch": {"paired": 2, "labeled": 2, "unlabeled": 4}},
        "model": {"name": "vlp-test-vit", "mask_ratio": 0.5, "mask_policy": policy, **model},
        "objectives": objectives or {"contrastive": {"labels_as_text": True}, "pseudolabel": {}},
        "train": {"steps": 100},
    }


def _task(policy: str = "attention", objectives: dict | None = None, **model) -> PretrainTask:
    torch.manual_seed(0)
    task = PretrainTask(config_from_dict(_tree(policy, objectives, **model), check_files=False), classnames=CLASSES)
    task.on_train_start()
    return task


@pytest.mark.parametrize("bias", [True, False])
def test_cls_attention_equals_torch_multihead_attention_weights(bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(48, 4, bias=bias, batch_first=True)
    with torch.no_grad():  # non-trivial biases (torch initializes them to 0)
        if bias:
            mha.in_proj_bias.normal_()
    x = torch.randn(3, 1 + 9, 48)
    _, weights = mha(x, x, x, need_weights=True, average_attn_weights=True)  # [B, L, L], mean over heads
    ours = cls_attention(mha, x)
    assert ours.shape == (3, 9)
    torch.testing.assert_close(ours, weights[:, 0, 1:], rtol=1e-5, atol=1e-6)


def test_cls_patch_attention_is_the_last_block_map_of_the_vit():
    """The model's map: the last open_clip block's own attention (need_weights=True) on its ln_1 input."""
    task = _task()
    model = task.teacher.model
    images = _batch(task).image
    captured = {}
    last = model.clip.visual.transformer.resblocks[-1]
    hook = last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    model.encode_visible(images, None)
    hook.remove()
    h = last.ln_1(captured["x"])
    _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)
    with torch.no_grad():
        torch.testing.assert_close(model.cls_patch_attention(images), weights[:, 0, 1:].detach(), rtol=1e-5, atol=1e-6)


def test_planted_map_keeps_exactly_the_top_patches_through_random_masking():
    N, keep = 16, 6
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(4, N, generator=g)
    uniform = torch.rand(4, N, generator=g)
    noise = attention_noise(scores, uniform, keep, random_fraction=0.0)
    ids_keep, mask, _ = random_masking(noise, 1 - keep / N)  # the masked pass's own selection
    assert ids_keep.shape == (4, keep)
    top = torch.topk(scores, keep, dim=1).indices
    assert torch.equal(ids_keep.sort(1).values, top.sort(1).values)
    assert torch.equal(mask.sum(1), torch.full((4,), float(N - keep)))
    assert torch.equal(mask.gather(1, top), torch.zeros(4, keep))
    # the order is a ranking: the kept patches by descending score, the others after them by descending score
    assert torch.equal(ids_keep, top)
    rest = torch.argsort(noise, 1)[:, keep:]
    assert (scores.gather(1, rest).diff(dim=1) <= 0).all()


def test_random_share_keeps_the_top_and_draws_the_rest_from_the_uniform_noise():
    N, keep = 16, 8
    g = torch.Generator().manual_seed(2)
    scores, uniform = torch.rand(3, N, generator=g), torch.rand(3, N, generator=g)
    noise = attention_noise(scores, uniform, keep, random_fraction=0.25)  # 2 of 8 at random
    ids_keep = random_masking(noise, 1 - keep / N)[0]
    top6 = torch.topk(scores, 6, dim=1).indices
    assert torch.equal(ids_keep[:, :6], top6)
    masked_out = uniform.clone().scatter_(1, top6, float("inf"))
    assert torch.equal(ids_keep[:, 6:], torch.argsort(masked_out, 1)[:, :2])
    # fraction 1: exactly the random policy's patches
    all_random = attention_noise(scores, uniform, keep, random_fraction=1.0)
    assert torch.equal(random_masking(all_random, 0.5)[0], random_masking(uniform, 0.5)[0])


def test_task_noise_keeps_the_teachers_most_attended_patches_and_is_deterministic():
    task = _task()
    task.student.train()
    batch = _batch(task)
    noise = task.masking_noise(batch, step=5, micro=0)
    with torch.no_grad():
        scores = task.teacher.model.cls_patch_attention(batch.image)
    ids_keep = random_masking(noise, 0.5)[0]
    assert torch.equal(ids_keep.sort(1).values, torch.topk(scores, 8, dim=1).indices.sort(1).values)
    # same (seed, step, micro, rank) and teacher -> the same mask, on a fresh task too (exact resume); with a random
    # share, another step draws other random patches (the teacher, unchanged here, gives the same top ones)
    again = _task().masking_noise(batch, step=5, micro=0)
    assert torch.equal(noise, again)
    mixed = _task(mask_random_fraction=0.5)
    a, b = mixed.masking_noise(batch, 5, 0), mixed.masking_noise(batch, 6, 0)
    assert torch.equal(a, _task(mask_random_fraction=0.5).masking_noise(batch, 5, 0))
    assert not torch.equal(random_masking(a, 0.5)[0].sort(1).values, random_masking(b, 0.5)[0].sort(1).values)


def test_default_policy_noise_is_unchanged():
    attn, plain = _task(mask_random_fraction=1.0), _task("random")
    batch = _batch(plain)
    # fraction 1 keeps what the random policy keeps; the random policy's noise is the seeded uniform draw itself
    assert torch.equal(random_masking(attn.masking_noise(batch, 3, 1), 0.5)[0],
                       random_masking(plain.masking_noise(batch, 3, 1), 0.5)[0])
    from vlp.data.sources import stream_seed
    g = torch.Generator().manual_seed(stream_seed(0, "mask", 3, 1, 0))
    assert torch.equal(plain.masking_noise(batch, 3, 1), torch.rand(8, 16, generator=g))


def test_attention_policy_without_a_teacher_names_the_key():
    with pytest.raises(ConfigError, match="model.mask_policy"):
        _task(objectives={"contrastive": {"labels_as_text": True}})


def test_teacher_pass_is_counted_in_the_step_flops(tmp_path):
    from vlp.flops import training_flops_per_step

    def flops(policy):
        return training_flops_per_step(config_from_dict(_tree(policy), check_files=False), CLASSES, steps=1)

    assert flops("attention") > flops("random")


def test_trainer_steps_with_attention_masking(demo_data, tmp_path):
    from vlp.train import Trainer

    cfg = run_config(demo_data, tmp_path / "run", model={"name": "vlp-test-vit", "mask_ratio": 0.5,
                                                         "mask_policy": "attention", "mask_random_fraction": 0.25},
                     objectives={"contrastive": {"weight": 1.0, "labels_as_text": True}, "pseudolabel": {},
                                 "supervised": {"weight": 0.5}},
                     train={"steps": 3, "log_every": 1, "save_every": 100, "progress": False})
    result = Trainer(config_from_dict(cfg)).fit()
    assert result["step"] == 3
    assert all(torch.isfinite(torch.tensor(float(result[k]))) for k in ("loss/contrastive", "loss/pseudolabel"))


def test_accum_freq_grad_pass_reuses_the_cache_pass_mask():
    task = _task()
    task.student.train()
    batches = [_batch(task, 0), _batch(task, 1)]
    fresh = [task.masking_noise(b, 7, j) for j, b in enumerate(batches)]
    task.cache_features(batches, step=7)
    calls = []
    hook = task.teacher.model.clip.visual.conv1.register_forward_hook(lambda *a: calls.append(1))
    reused = [task.masking_noise(b, 7, j) for j, b in enumerate(batches)]
    hook.remove()
    assert not calls  # no second teacher pass
    assert all(torch.equal(a, b) for a, b in zip(fresh, reused))
    loss, _ = task.training_forward(batches[1], 7, micro=1)
    assert torch.isfinite(loss)
