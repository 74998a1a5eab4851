"""Shared fixtures: real digits shards of all three kinds, and run configs on them."""
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The demo's real shards (scikit-learn digits): test/, labeled/, paired/, unlabeled/."""
    from vlp.demo import write_demo_shards

    out = tmp_path_factory.mktemp("digits")
    write_demo_shards(out, maxcount=100)
    return out


def run_config(shards: Path, out_dir: Path, **sections) -> dict:
    """A small mixed run on the digits shards, with the tiny test model; sections override top-level keys."""
    cfg = {
        "output_dir": str(out_dir),
        "seed": 0,
        "model": {"name": "vlp-test-vit", "mask_ratio": 0.75},
        "data": {
            "sources": [
                {"name": "lab", "kind": "labeled", "shards": str(shards / "labeled" / "*.tar")},
                {"name": "pairs", "kind": "paired", "shards": str(shards / "paired" / "*.tar")},
                {"name": "unlab", "kind": "unlabeled", "shards": str(shards / "unlabeled" / "*.tar")},
            ],
            "batch": {"paired": 8, "labeled": 4, "unlabeled": 4},
            "workers": 1,
            "shuffle_buffer": 50,
            "templates": ["a photo of the digit {c}.", "the number {c}."],
        },
        "objectives": {"contrastive": {"weight": 1.0, "labels_as_text": True},
                       "mae": {"weight": 0.5, "decoder_width": 32, "decoder_depth": 1, "decoder_heads": 2},
                       "supervised": {"weight": 0.5}},
        "optim": {"lr": 1e-3, "warmup_steps": 2},
        "train": {"steps": 6, "log_every": 1, "save_every": 3, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def student(clip, model_cfg, num_classes: int = 0, use_mae: bool = True, **mae):
    """The student the trainer builds for CLIP (+ MAE) (+ supervised with ``num_classes``), from real objectives."""
    from vlp.objectives.base import BuildContext
    from vlp.objectives.contrastive import ContrastiveObjective
    from vlp.objectives.reconstruction import MAEObjective
    from vlp.objectives.supervised import SupervisedObjective
    from vlp.task import build_student

    patch = clip.visual.patch_size[0] if hasattr(clip.visual, "patch_size") else None
    mae_objective = MAEObjective(MAEObjective.Config(**mae), BuildContext(cfg=None, patch=patch))
    objectives = [ContrastiveObjective()] + ([mae_objective] if use_mae else []) + \
        ([SupervisedObjective()] if num_classes else [])
    return build_student(clip, model_cfg, objectives, num_classes=num_classes)


def step_metrics(run_dir: Path) -> dict[int, dict]:
    """The last logged losses record of each step in a run's metrics.jsonl (a resumed run re-logs the steps after
    its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss/total" in rec:
            out[rec["step"]] = rec
    return out
