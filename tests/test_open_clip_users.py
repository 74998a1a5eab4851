"""#16: meet open_clip users where they are (label spaces, pretrained checkpoints, accum_freq, CLI, logs, export)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, run_config, write_config
from vlp.config import config_from_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
COLORS = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255), "dog": (255, 255, 0)}


def _nearest_class(rgb) -> str:
    return min(COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(COLORS[c], map(int, rgb))))


@pytest.fixture(scope="module")
def two_label_orders(tmp_path_factory):
    """The same kind of classes written by `vlp shards folder` (sorted folder names: ant bee cat) and by
    `vlp shards hf` (ClassLabel order: cat dog ant bee): index 0 means ant in one, cat in the other."""
    import datasets

    from vlp.shards.write import write_hf_dataset, write_image_folder

    root = tmp_path_factory.mktemp("labels")
    for name in ("cat", "ant", "bee"):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), COLORS[name]).save(root / "folder" / name / f"{i}.png")
    folder = write_image_folder(root / "folder", root / "a", maxcount=100)
    assert folder["classnames"] == ["ant", "bee", "cat"]
    hf_names = ["cat", "dog", "ant", "bee"]
    rows = [(Image.new("RGB", (32, 32), COLORS[n]), i) for i, n in enumerate(hf_names) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.ClassLabel(names=hf_names)}))
    hf = write_hf_dataset(ds, root / "b", label_col="label", maxcount=100)
    assert hf["classnames"] == hf_names
    return root


def test_two_labeled_sources_share_one_label_space_by_class_name(two_label_orders, demo_data, tmp_path):
    from vlp.data.format import decode_image
    from vlp.train import Trainer

    root = two_label_orders
    tree = run_config(
        demo_data, tmp_path / "run",
        data={"sources": [{"name": "folder", "kind": "labeled", "shards": str(root / "a" / "*.tar")},
                          {"name": "hf", "kind": "labeled", "shards": str(root / "b" / "*.tar")}],
              "batch": {"labeled": 8}, "workers": 0, "augment": False,
              "templates": ["a photo of a {c}."]},
        model={"name": "vlp-test-vit", "mask_ratio": 0.0})
    tree["objectives"] = {"supervised": {"weight": 1.0}, "contrastive": {"weight": 1.0, "labels_as_text": True}}
    cfg = config_from_dict(tree)
    trainer = Trainer(cfg)
    try:
        assert trainer.classnames == ["ant", "bee", "cat", "dog"]  # first source's order, then new names
        assert trainer.task.num_classes == 4
        assert trainer.task.student.classifier.fc.out_features == 4
        for src in trainer.sources:  # every record's label names the class its image shows
            for n, rec in enumerate(src.records(seed=0, resampled=False, epochs=1)):
                rgb = np.asarray(decode_image(rec["image"]))[16, 16]
                assert trainer.classnames[rec["label"]] == _nearest_class(rgb), (src.name, rec["key"])
            assert n + 1 >= 12
        # the supervised head's targets in real batches, and the labels-as-text prompts, by name
        it = iter(trainer.dataset)
        seen = set()
        for _ in range(4):
            batch, _ = next(it)
            for i, label in enumerate(batch.label.tolist()):
                name = trainer.classnames[label]
                seen.add(name)
                text = trainer.tokenizer([f"a photo of a {name}."])[0]
                assert torch.equal(batch.text[i], text)
        assert {"dog", "ant", "cat"} <= seen
    finally:
        trainer.release()
