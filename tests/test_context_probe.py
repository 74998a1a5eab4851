"""tools/context_probe.py: the bare context-prediction loop runs every encoding on real shards and reports the
pretext loss and accuracy and the validation kNN at the start, every ``--knn-every`` steps and at the end."""
import math
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import context_probe  # noqa: E402


@pytest.mark.parametrize("encode, extra", [("tiles", []), ("tiles-up", []), ("pair", ["--tile-norm"]),
                                           ("pair-cls", []), ("tiles", ["--encoder", "cnn"])])
def test_probe_trains_and_reports_knn(demo_data, encode, extra):
    out = context_probe.main(["--shards", str(demo_data), "--val", str(demo_data / "test"), "--encode", encode,
                              "--steps", "4", "--batch", "8", "--images", "32", "--log-every", "2",
                              "--knn-every", "2", "--warmup", "1", *extra])
    history = out["history"]
    assert [r["step"] for r in history] == [0, 2, 4]
    assert all(0.0 <= r["val_knn"] <= 1.0 for r in history)
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["acc"] <= 1.0 for r in history[1:])


def test_cnn_encodes_tiles_alone_only():
    with pytest.raises(SystemExit):
        context_probe.main(["--encoder", "cnn", "--encode", "pair"])
