"""Every config shipped in configs/ validates, and names a model config open_clip can build."""
from pathlib import Path

import pytest

from vlp.config import load_config
from vlp.models.factory import resolve_model_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


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


def test_unknown_model_name_suggests_close_matches():
    """#16: the hint named the first three open_clip models alphabetically; now the closest names."""
    import pytest

    from vlp.models.factory import resolve_model_config

    with pytest.raises(ValueError, match=r"model.name: unknown model 'vit-b-61' .*did you mean ViT-B-16"):
        resolve_model_config("vit-b-61")
    with pytest.raises(ValueError, match=r"did you mean vlp-tiny-vit"):
        resolve_model_config("vlp-tiny-vt")
