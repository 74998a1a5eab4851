"""Every config shipped in configs/ validates, and names a model config open_clip can build."""
from pathlib import Path

import pytest

from vlp.config import load_config
from vlp.models.factory import resolve_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "accelerate" not in p.parts)  # run configs


def test_configs_are_shipped():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"demo.yaml", "cifar10-mixed.yaml", "laion-vitb16-mixed.yaml", "bench/quality-mixed.yaml",
            "bench/throughput-mixed.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_validates_and_its_model_resolves(path):
    cfg = load_config(path, check_files=False)  # shards are written by `vlp demo` / the benchmarks
    model_cfg = resolve_model_config(cfg.model.name)
    assert model_cfg["vision_cfg"]["image_size"] > 0 and model_cfg["embed_dim"] > 0
    assert sum(cfg.data.batch.model_dump().values()) > 0
    assert any(o.weight > 0 for o in cfg.objectives.values())


def test_shipped_configs_name_their_masking():
    """#31: model.mask_ratio's default became 0 unless MAE is on (was 0.75); every shipped run config names its
    ratio, so each trains as it did."""
    import yaml

    for path in CONFIGS:
        tree = yaml.safe_load(path.read_text())
        assert "mask_ratio" in (tree.get("model") or {}), path
        assert load_config(path, check_files=False).model.mask_ratio == tree["model"]["mask_ratio"], path


def test_unknown_model_name_suggests_close_matches():
    """#16: the hint named the first three open_clip models alphabetically; now the closest names."""
    import pytest

    from vlp.models.factory import resolve_model_config

    with pytest.raises(ValueError, match=r"model.name: unknown model 'vit-b-61' .*did you mean ViT-B-16"):
        resolve_model_config("vit-b-61")
    with pytest.raises(ValueError, match=r"did you mean vlp-tiny-vit"):
        resolve_model_config("vlp-tiny-vt")


@pytest.mark.parametrize("name", ["ddp", "fsdp", "multinode"])
def test_accelerate_configs(name, monkeypatch):
    """configs/accelerate/*.yaml pass `accelerate launch`'s own validation; the FSDP one builds accelerate's FSDP
    plugin from the environment launch sets, wrapping a class open_clip's towers really have."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO / "configs/accelerate" / f"{name}.yaml"),
                                               "x.py"])
    args, _, _ = _validate_launch_command(args)
    assert (args.use_fsdp, args.multi_gpu) == ((True, False) if name == "fsdp" else (False, True))
    assert args.num_machines == (2 if name == "multinode" else 1)
    if name != "fsdp":
        return
    import torch
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils.dataclasses import get_module_class_from_name

    from vlp.models.factory import create_clip

    env = prepare_multi_gpu_env(args)
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    clip = create_clip("vlp-test-vit")[0]
    for cls in env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(","):
        assert get_module_class_from_name(clip.visual, cls) is not None
        assert get_module_class_from_name(clip.transformer, cls) is not None
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if not torch.cuda.is_available():
        return  # accelerate builds its FSDP plugin only with an accelerator (its refusal's wording is not ours to pin)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.use_orig_params and plugin.transformer_cls_names_to_wrap == ["ResidualAttentionBlock"]
