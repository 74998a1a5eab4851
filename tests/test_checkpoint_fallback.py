"""Reading a run whose latest checkpoint is corrupt: `vlp export` and `vlp eval` fall back as `--resume auto` does."""
import shutil

import pytest
from safetensors.torch import load_file

from conftest import run_config
from vlp import checkpoint as ckpt_io
from vlp.cli import main
from vlp.config import config_from_dict
from vlp.train import Trainer


@pytest.fixture
def run_with_corrupt_latest(demo_data, tmp_path):
    """A 4-step run (checkpoints at 2 and 4) whose step-4 weights are truncated."""
    run_dir = tmp_path / "run"
    Trainer(config_from_dict(run_config(demo_data, run_dir, data={"workers": 0},
                                        train={"steps": 4, "save_every": 2, "keep_last": 2}))).fit()
    older, latest = ckpt_io.list_checkpoints(run_dir)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2])
    return run_dir, older


def test_export_and_eval_of_a_run_with_a_corrupt_latest_checkpoint_use_the_previous_one(
        run_with_corrupt_latest, demo_data, tmp_path, caplog, capsys):
    """#30: they gave a 26-line traceback."""
    run_dir, older = run_with_corrupt_latest
    out = tmp_path / "export"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    exported = load_file(str(out / "open_clip_model.safetensors"))
    expected = ckpt_io.clip_state_dict(older)
    assert exported.keys() == expected.keys() and all((exported[k] == expected[k]).all() for k in expected)
    assert main(["eval", "--model", str(run_dir), "--task", "zeroshot", "--data", str(demo_data / "test"),
                 "--device", "cpu", "--max-samples", "20"]) == 0
    assert "step_00000004" in caplog.text and "unreadable" in caplog.text


def test_export_of_a_run_with_no_readable_checkpoint_fails_with_one_line(run_with_corrupt_latest, tmp_path, capsys):
    run_dir, older = run_with_corrupt_latest
    (older / "model.safetensors").write_bytes(b"")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "export")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable" in err[0] and "no older one is left" in err[0], err


def test_an_export_folder_without_its_config_is_named_as_such(tmp_path, capsys):
    """#30: a missing open_clip_config.json said "no complete checkpoint"."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "open_clip_model.safetensors").write_bytes(b"")
    assert main(["eval", "--model", str(folder), "--task", "zeroshot", "--data", str(tmp_path), "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "open_clip_config.json" in err[0], err


def test_eval_of_a_checkpoint_pruned_by_its_live_run_says_so(run_with_corrupt_latest, demo_data, tmp_path, capsys):
    """#30: `vlp eval` of a checkpoint that its live run pruned gave a confusing "no complete checkpoint" error."""
    run_dir, older = run_with_corrupt_latest
    shutil.rmtree(older)  # what the run's keep_last pruning does
    assert main(["eval", "--model", str(older), "--task", "zeroshot", "--data", str(demo_data / "test"),
                 "--device", "cpu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no longer exists" in err[0] and "train.keep_last" in err[0], err
