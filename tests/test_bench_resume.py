"""The benches' trainings (``tools/benchlib/train.py``'s ``launch``, which bench_quality runs with ``resume``): a
training of the same config stopped by a kill continues from its last checkpoint when the bench runs again, with the
losses of an uninterrupted one; anything else in its folder is trained afresh."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, run_config, step_metrics

sys.path.insert(0, str(REPO / "tools"))
from benchlib.train import launch, seconds_per_step, unfinished_step  # noqa: E402
from vlp import checkpoint as ckpt_io  # noqa: E402

STEPS, SAVE_EVERY = 12, 4
LOSSES = ("loss/total", "loss/contrastive", "loss/mae", "loss/supervised")


def bench_tree(demo_data, run_dir, **train) -> dict:
    return run_config(demo_data, run_dir, train={"steps": STEPS, "save_every": SAVE_EVERY, "log_every": 1,
                                                  "progress": False, **train})


def killed_bench_training(tree: dict, run_dir) -> int:
    """What a bench killed mid-training leaves: ``launch``'s folder (its ``bench_config.yaml``) and a ``vlp.train``
    of it SIGKILLed with its process group once its first checkpoint exists. The step of that checkpoint."""
    run_dir.mkdir(parents=True)
    (run_dir / "bench_config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config", str(run_dir / "bench_config.yaml")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while not ckpt_io.list_checkpoints(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = ckpt_io.list_checkpoints(run_dir)
    assert saved, "no checkpoint before the kill"
    return json.loads((saved[-1] / ckpt_io.STATE_FILE).read_text())["step"]


def test_a_killed_training_resumes_from_its_checkpoint_with_the_uninterrupted_losses(demo_data, tmp_path):
    reference = launch(bench_tree(demo_data, tmp_path / "ref"), tmp_path / "ref")
    assert reference["steps_done"] == STEPS and "resumed_at" not in reference

    run_dir = tmp_path / "killed"
    tree = bench_tree(demo_data, run_dir)
    killed_at = killed_bench_training(tree, run_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"
    assert unfinished_step(tree, run_dir) == killed_at

    resumed = launch(tree, run_dir, resume=True)
    assert resumed["resumed_at"] == killed_at and resumed["steps_done"] == STEPS and not resumed["cut_short"]
    assert "resumed from" in (run_dir / "train.log").read_text()
    ref, got = step_metrics(tmp_path / "ref"), step_metrics(run_dir)
    for step in range(killed_at + 1, STEPS + 1):
        for key in LOSSES:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
    # the steps logged twice (after the checkpoint, before the kill and after the resume) are timed once
    assert sorted(step_metrics(run_dir)) == list(range(1, STEPS + 1))
    assert 0 < seconds_per_step(resumed["metrics"], 1, 0) < resumed["wall_s"]

    # finished now: nothing is left to resume, and a bench stopped before it evaluated it does not train it again
    assert unfinished_step(tree, run_dir) is None
    log_before = (run_dir / "train.log").read_text()
    again = launch(tree, run_dir, resume=True)
    assert again["finished_before"] and again["steps_done"] == STEPS and again["resumed_at"] == killed_at
    assert again["last"] == resumed["last"] and again["metrics"] == resumed["metrics"]
    assert (run_dir / "train.log").read_text() == log_before


def test_a_folder_of_another_config_or_without_a_checkpoint_is_trained_afresh(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    tree = bench_tree(demo_data, run_dir)
    assert unfinished_step(tree, run_dir) is None          # no folder
    killed_bench_training(tree, run_dir)
    other = bench_tree(demo_data, run_dir)
    other["optim"]["lr"] = 2e-3                             # the bench now trains something else in that folder
    assert unfinished_step(other, run_dir) is None
    res = launch(dict(other, train=dict(other["train"], steps=2)), run_dir, resume=True)
    assert "resumed_at" not in res and res["steps_done"] == 2
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)] == ["step_00000002"]  # the old run's are gone
    assert "resumed from" not in (run_dir / "train.log").read_text()

    # a finished training is taken as it is only with its own config and its record
    assert launch(dict(other, train=dict(other["train"], steps=2)), run_dir, resume=True)["finished_before"]
    (run_dir / "bench_train.json").unlink()
    res = launch(dict(other, train=dict(other["train"], steps=2)), run_dir, resume=True)
    assert "finished_before" not in res and res["steps_done"] == 2
    assert "finished_before" not in launch(dict(other, train=dict(other["train"], steps=3)), run_dir, resume=True)
