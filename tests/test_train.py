"""The trainer on real shards, real open_clip models and real Accelerate processes."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_config, step_metrics, write_config
from vlp import checkpoint as ckpt_io
from vlp.config import config_from_dict
from vlp.data.mixing import live_children
from vlp.optim import param_groups, warmup_cosine
from vlp.run_dir import RunDirBusy, lock_run_dir
from vlp.train import NonFiniteLoss, Trainer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def sigkill_after_first_checkpoint(config: Path, run_dir: Path, timeout: float) -> list[Path]:
    """Start `vlp.train` on ``config``, SIGKILL it once a checkpoint exists; the checkpoints left behind."""
    proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config", str(config)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not ckpt_io.list_checkpoints(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return ckpt_io.list_checkpoints(run_dir)


def run_two_processes(script: str, tmp_path: Path) -> dict:
    """Launch tests/scripts/SCRIPT under `accelerate launch` with 2 CPU processes; what rank 0 saved."""
    out = tmp_path / "g.pt"
    proc = subprocess.run([*LAUNCH_2, str(REPO / "tests" / "scripts" / script), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    return ddp


def _single_process_grads() -> torch.Tensor:
    """tests/scripts/ddp_grads.py's step in this process, on the whole (doubled) global batch."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from grads_common import build, global_batch, loss_of

    task = build()
    model = task.student
    batch, noise = global_batch(task.tokenizer)
    loss_of(task, model, batch, noise).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_two_process_gradients_equal_single_process(tmp_path):
    """CLIP (gathered features, own masking ratio) + MAE + supervised + teacher pseudo-labels: DDP over 2 CPU
    processes == one process, doubled batch."""
    ddp = run_two_processes("ddp_grads.py", tmp_path)
    single = _single_process_grads()
    assert single.shape == ddp["grads"].shape
    assert single.abs().max() > 1e-3
    assert torch.allclose(single, ddp["grads"], atol=1e-5, rtol=0)


def test_fsdp_two_processes_teacher_and_checkpoints_equal_single_process(tmp_path):
    """torch FSDP1 over 2 CPU processes (the fsdp.yaml wrapping; tests/scripts/fsdp_step.py): after one SGD step
    the momentum teacher (updated against the sharded student), the gathered full state dict and the sharded DCP
    checkpoint read back in one process (vlp.checkpoint) all equal one process at the doubled batch."""
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from grads_common import build, global_batch, loss_of

    from vlp.checkpoint import read_weights

    proc = subprocess.run([*LAUNCH_2, str(REPO / "tests" / "scripts" / "fsdp_step.py"), str(tmp_path)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    task = build()
    model = task.student
    n_params = sum(p.numel() for p in model.parameters())
    assert got["world"] == 2 and got["sharded"] < n_params  # rank 0 held a shard, not the model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch, noise = global_batch(task.tokenizer)
    loss_of(task, model, batch, noise).backward()
    opt.step()
    task.after_optimizer_step(0)
    want, teacher = model.state_dict(), task.teacher.state_dict_tracked()
    assert set(got["teacher"]) == set(teacher) and "clip.visual.proj" in teacher
    for k in teacher:
        torch.testing.assert_close(got["teacher"][k], teacher[k], atol=2e-6, rtol=0)
    sharded = read_weights(tmp_path / "pytorch_model_fsdp_0")
    for state in (got["full"], sharded):
        assert set(state) == set(want)
        for k in want:
            assert state[k].shape == want[k].shape, k  # logit_scale back to 0-dim
            torch.testing.assert_close(state[k], want[k], atol=2e-6, rtol=0)
    before = build()  # the step moved both the student and the teacher
    assert not torch.equal(want["clip.visual.proj"], before.student.state_dict()["clip.visual.proj"])
    assert not torch.equal(teacher["clip.visual.proj"], before.teacher.state_dict_tracked()["clip.visual.proj"])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_loopback_gradients_and_shard_split(demo_data, tmp_path):
    """Two "nodes" of one process each on this machine (`accelerate launch --multi_gpu --num_machines 2
    --machine_rank {0,1} --main_process_ip 127.0.0.1`, gloo on CPU, started concurrently): the gradients equal one
    process at the doubled batch, and the ranks (one per node) read disjoint shards covering one exact epoch."""
    from vlp.config import SourceConfig
    from vlp.data.sources import Source

    out, port = tmp_path / "g.pt", _free_port()
    shards = str(demo_data / "unlabeled" / "*.tar")
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                               "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                               str(REPO / "tests" / "scripts" / "ddp_grads.py"), str(out), shards],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2
    # one process per node: global ranks 0 and 1, each local rank 0 on its own "machine"
    assert [(r["rank"], r["local_rank"]) for r in ddp["ranks"]] == [(0, 0), (1, 0)]
    single = _single_process_grads()
    assert single.abs().max() > 1e-3 and torch.allclose(single, ddp["grads"], atol=1e-5, rtol=0)
    first, second = (set(r["keys"]) for r in ddp["ranks"])
    assert first and second and not first & second
    epoch = [r["key"] for r in Source(SourceConfig(kind="unlabeled", shards=shards)).records(0, resampled=False,
                                                                                               epochs=1)]
    assert first | second == set(epoch) and len(first) + len(second) == len(epoch)


def test_two_process_training_run(demo_data, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m vlp.train` on CPU: trains, checkpoints, logs."""
    cfg = run_config(demo_data, tmp_path / "run", train={"steps": 4, "save_every": 2})
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.run([*LAUNCH_2, "-m", "vlp.train", "--config", str(path)], env=ENV, capture_output=True,
                          text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = ckpt_io.read_run_info(tmp_path / "run")
    assert info["step"] == 4 and info["world_size"] == 2
    # samples seen count both ranks: 4 steps x 2 ranks x per-rank composition
    assert info["samples_seen"] == {"paired": 64, "labeled": 32, "unlabeled": 32}
    steps = step_metrics(tmp_path / "run")
    assert sorted(steps) == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss/contrastive"]) for r in steps.values())


def test_two_process_run_reports_bad_samples_of_every_rank(demo_data, tmp_path):
    """#17 item 6: in DDP `bad_samples/*` (logged and checkpointed) counted rank 0's workers only."""
    import tarfile
    import webdataset as wds

    good = [m for m in tarfile.open(next((demo_data / "unlabeled").glob("*.tar"))).getmembers()
            if m.name.endswith(".jpg")][:20]
    with tarfile.open(next((demo_data / "unlabeled").glob("*.tar"))) as tar:
        images = [tar.extractfile(m).read() for m in good]
    (tmp_path / "junk").mkdir()
    with wds.TarWriter(str(tmp_path / "junk" / "junk-000000.tar")) as sink:
        for i, img in enumerate(images):
            sink.write({"__key__": f"good{i:03d}", "jpg": img})
            sink.write({"__key__": f"bad{i:03d}", "jpg": b"not a jpeg"})
    cfg = run_config(demo_data, tmp_path / "run", train={"steps": 3, "save_every": 3})
    cfg["data"]["sources"][2] = {"name": "junk", "kind": "unlabeled", "shards": str(tmp_path / "junk" / "*.tar")}
    out = tmp_path / "bad.json"
    proc = subprocess.run([*LAUNCH_2, str(REPO / "tests" / "scripts" / "ddp_bad_samples.py"),
                           str(write_config(tmp_path / "c.yaml", cfg)), str(out)],
                          env=ENV, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]
    per_rank = [r["local"].get("junk", 0) for r in reports]
    assert all(n > 0 for n in per_rank), reports
    saved = ckpt_io.read_run_info(tmp_path / "run")["bad_samples"]["junk"]
    assert reports[0]["logged"] == sum(per_rank) == saved, (reports, saved)


def test_killed_run_resumes_to_identical_losses(demo_data, tmp_path):
    """SIGKILL after a checkpoint, `--resume auto`: same steps, same losses as an uninterrupted run."""
    steps, save_every = 12, 4
    ref_cfg = run_config(demo_data, tmp_path / "ref", train={"steps": steps, "save_every": save_every})
    ref_path = write_config(tmp_path / "ref.yaml", ref_cfg)
    subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(ref_path)], env=ENV, check=True,
                   capture_output=True, timeout=300)
    reference = step_metrics(tmp_path / "ref")

    run_dir = tmp_path / "killed"
    # a larger batch slows each step so the kill lands between the first checkpoint and the end
    cfg = run_config(demo_data, run_dir, train={"steps": steps, "save_every": save_every})
    path = write_config(tmp_path / "killed.yaml", cfg)
    saved = sigkill_after_first_checkpoint(path, run_dir, timeout=240)
    assert saved, "no checkpoint before the kill"
    killed_at = json.loads((saved[-1] / ckpt_io.STATE_FILE).read_text())["step"]
    assert killed_at < steps, "the run finished before it could be killed"

    subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(path), "--resume", "auto"], env=ENV,
                   check=True, capture_output=True, timeout=300)
    resumed = step_metrics(run_dir)
    assert ckpt_io.read_run_info(run_dir)["step"] == steps
    for step in range(killed_at + 1, steps + 1):
        for key in ("loss/total", "loss/contrastive", "loss/mae", "loss/supervised"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_sigkill_with_two_workers_then_resume_at_once_gives_the_uninterrupted_losses(demo_data, tmp_path):
    """#30: the run lock was an flock that forked DataLoader workers inherited: after a SIGKILL of the trainer its
    workers held it on (~5 s, for ever when stuck in a read), and a `--resume auto` right away exited 4. Kill the main
    pid once a checkpoint exists, its 2 workers running; the folder is free at once and the resume gives the
    uninterrupted losses."""
    steps = 12

    def config(name):
        cfg = run_config(demo_data, tmp_path / name, data={"workers": 2}, train={"steps": steps, "save_every": 4})
        return write_config(tmp_path / f"{name}.yaml", cfg)

    subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(config("ref"))], env=ENV, check=True,
                   capture_output=True, timeout=300)
    reference = step_metrics(tmp_path / "ref")
    run_dir, path = tmp_path / "run", config("run")
    proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not ckpt_io.list_checkpoints(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    workers = live_children(proc.pid)
    proc.kill()
    proc.wait()
    assert len(workers) == 2, workers
    killed_at = ckpt_io.read_run_info(run_dir)["step"]
    assert killed_at < steps, "the run finished before it could be killed"
    lock_run_dir(run_dir).close()  # free the moment the trainer is gone: no worker holds it
    resume = subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(path), "--resume", "auto"], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-3000:]
    resumed = step_metrics(run_dir)
    assert ckpt_io.read_run_info(run_dir)["step"] == steps
    for step in range(killed_at + 1, steps + 1):
        for key in ("loss/total", "loss/contrastive", "loss/mae", "loss/supervised"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


def _start_stalled_run(demo_data, tmp_path, **data) -> tuple[subprocess.Popen, Path]:
    """A run (2 workers, its own process group) whose unlabeled stream is a `pipe:` command that sends nothing and
    ignores SIGTERM (a hung mount, a stalled `curl`); returned once both workers are in that command."""
    marker = tmp_path / "stalled"
    marker.mkdir()
    cfg = run_config(demo_data, tmp_path / "run", data={"workers": 2, **data})
    cfg["data"]["sources"][2]["shards"] = f"pipe:trap '' TERM; touch {marker}/$$; exec sleep 300"
    proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config",
                             str(write_config(tmp_path / "c.yaml", cfg))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while len(list(marker.iterdir())) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    if len(list(marker.iterdir())) < 2:
        _end_group(proc)
        pytest.fail(f"the workers did not start the stalled command: {proc.stderr.read()[-3000:]}")
    return proc, tmp_path / "run"


def _end_group(proc: subprocess.Popen) -> None:
    try:  # the stalled `sleep` commands, orphaned in the run's process group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_a_stalled_stream_ends_the_run_at_data_timeout_s_with_one_line(demo_data, tmp_path):
    """#30: a stream that sends nothing hung the run for ever, with no output."""
    proc, _ = _start_stalled_run(demo_data, tmp_path, timeout_s=3)
    try:
        code = proc.wait(timeout=120)
    finally:
        _end_group(proc)
    err = proc.stderr.read()  # once the group is gone: the orphaned commands hold the pipe open
    assert code == 7, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no batch from the data loader in ") and "data.timeout_s: 3" in last, last


def test_sigterm_ends_a_stalled_run_and_frees_the_folder(demo_data, tmp_path):
    """#30: SIGTERM to the process group of a run waiting on a stalled stream was ignored for minutes."""
    proc, run_dir = _start_stalled_run(demo_data, tmp_path)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _end_group(proc)
    err = proc.stderr.read()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "a stream stalls" in err, err[-3000:]
    lock_run_dir(run_dir).close()


def test_sigkill_of_a_stalled_run_takes_its_workers_along(demo_data, tmp_path):
    """#30: after a SIGKILL of the trainer, workers stuck in a stalled read lived on (holding the run lock)."""
    proc, run_dir = _start_stalled_run(demo_data, tmp_path)
    try:
        workers = live_children(proc.pid)
        proc.kill()
        proc.wait()
        deadline = time.time() + 30  # they get SIGKILL the moment the trainer dies; 30 s is slack, not a race
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.05)
        alive = [w for w in workers if _running(w)]
    finally:
        _end_group(proc)
    assert workers and not alive, (workers, alive)
    lock_run_dir(run_dir).close()


def test_nonfinite_loss_step_is_skipped_and_counted(demo_data, tmp_path):
    cfg = config_from_dict(run_config(demo_data, tmp_path / "run", train={"steps": 5, "save_every": 5,
                                                                         "progress": False}))

    class NaNAtStep3(Trainer):
        def compute_loss(self, batch, micro):
            loss, metrics = super().compute_loss(batch, micro)
            return (loss * float("nan") if self.step == 2 else loss), metrics

    trainer = NaNAtStep3(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    result = trainer.fit()
    assert result["step"] == 5 and result["nonfinite_steps"] == 1
    info = ckpt_io.read_run_info(tmp_path / "run")
    assert info["nonfinite_steps"] == 1
    assert 3 not in step_metrics(tmp_path / "run")  # the skipped step logged no losses
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_consecutive_nonfinite_losses_abort_with_last_good_checkpoint(demo_data, tmp_path):
    cfg = config_from_dict(run_config(demo_data, tmp_path / "run", train={"steps": 20, "max_bad_steps": 3,
                                                                         "save_every": 100, "progress": False}))

    class AlwaysNaNAfter2(Trainer):
        def compute_loss(self, batch, micro):
            loss, metrics = super().compute_loss(batch, micro)
            return (loss * float("inf") if self.step >= 2 else loss), metrics

    trainer = AlwaysNaNAfter2(cfg)
    with pytest.raises(NonFiniteLoss, match="3 consecutive steps"):
        trainer.fit()
    ckpt = ckpt_io.find_checkpoint(tmp_path / "run")
    weights = ckpt_io.model_state_dict(ckpt)
    assert all(torch.isfinite(v).all() for v in weights.values())
    live = {k: v for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    assert all(torch.equal(weights[k], live[k]) for k in weights)  # the saved state is the last good one


def _wait_for_logged_steps(run_dir: Path, n: int, proc, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None and not (
            path.exists() and len(path.read_text().splitlines()) >= n):
        time.sleep(0.05)


@pytest.mark.parametrize("group", [False, True], ids=["main-pid", "process-group"])
def test_sigterm_saves_a_checkpoint_before_exiting(demo_data, tmp_path, group):
    """SIGTERM to the trainer, or to its whole process group as clusters, `timeout` and torch's elastic agent send
    it (the DataLoader worker gets it too): a checkpoint of the step reached, no .tmp left, exit code 143."""
    run_dir = tmp_path / "run"
    cfg = run_config(demo_data, run_dir, train={"steps": 100000, "save_every": 100000, "log_every": 1})
    path = write_config(tmp_path / "c.yaml", cfg)
    proc = subprocess.Popen([sys.executable, "-m", "vlp.train", "--config", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_logged_steps(run_dir, 2, proc)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
    assert code == 128 + signal.SIGTERM, proc.stderr.read().decode()[-3000:]
    info = ckpt_io.read_run_info(run_dir)
    assert 2 <= info["step"] < 100000
    assert not list((run_dir / "checkpoints").glob("*.tmp*"))


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "accelerate-2-processes"])
def test_sigterm_to_the_group_then_resume_gives_the_uninterrupted_losses(demo_data, tmp_path, processes):
    """#17 item 5, as a cluster delivers it: SIGTERM to the whole process group (launcher, every rank, both
    DataLoader workers of each rank) mid-interval; the checkpoint of the step reached is written, the exit status
    is non-zero, and `--resume auto` continues with the losses of an uninterrupted run."""
    steps = 10
    launch = [sys.executable] if processes == 1 else [*LAUNCH_2]
    keys = ("loss/total", "loss/contrastive", "loss/mae", "loss/supervised")

    def config(name):
        cfg = run_config(demo_data, tmp_path / name, data={"workers": 2},
                         train={"steps": steps, "save_every": 1000, "log_every": 1})
        return write_config(tmp_path / f"{name}.yaml", cfg)

    subprocess.run([*launch, "-m", "vlp.train", "--config", str(config("ref"))], env=ENV, check=True,
                   capture_output=True, timeout=300)
    reference = step_metrics(tmp_path / "ref")
    run_dir, path = tmp_path / "run", config("run")
    proc = subprocess.Popen([*launch, "-m", "vlp.train", "--config", str(path)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    _wait_for_logged_steps(run_dir, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=120)
    err = proc.stderr.read().decode()[-3000:]
    assert code != 0, err
    saved = ckpt_io.list_checkpoints(run_dir)
    assert saved and not list((run_dir / "checkpoints").glob("*.tmp*")), err
    stopped_at = ckpt_io.read_run_info(run_dir)["step"]
    assert 3 <= stopped_at < steps, err
    subprocess.run([*launch, "-m", "vlp.train", "--config", str(path), "--resume", "auto"], env=ENV, check=True,
                   capture_output=True, timeout=300)
    resumed = step_metrics(run_dir)
    assert ckpt_io.read_run_info(run_dir)["step"] == steps
    for step in range(1, steps + 1):
        for key in keys:
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_config_errors_fail_before_any_work(demo_data, tmp_path):
    cfg = run_config(demo_data, tmp_path / "run")
    path = write_config(tmp_path / "c.yaml", cfg)
    cases = [
        (["optim.lr=fast"], "optim.lr"),
        (["optim.learning_rate=0.1"], "optim.learning_rate: unknown key"),
        ([f"data.sources.0.shards={tmp_path}/missing-{{000..002}}.tar"], "missing-000.tar"),
        (["model.num_classes=4"], "model.num_classes: 4 is fewer than the 10 classes"),  # was an error mid-run
        (["data.templates=['unclosed"], "data.templates: the value"),  # not YAML: was a traceback, exit 1
    ]
    for overrides, expected in cases:
        proc = subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(path), *overrides], env=ENV,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        assert expected in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "run").exists()


def test_param_groups_skip_decay_on_norms_biases_embeddings_and_logit_scale():
    from vlp.config import ModelConfig
    from vlp.models.factory import create_clip
    from conftest import student

    clip, _, _ = create_clip("vlp-test-vit")
    model = student(clip, ModelConfig(), num_classes=3)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"clip.logit_scale", "clip.positional_embedding", "clip.token_embedding.weight",
            "clip.visual.class_embedding", "clip.visual.ln_pre.weight", "mae_decoder.mask_token"} <= no_decay_names
    assert "clip.visual.transformer.resblocks.0.attn.in_proj_weight" in decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_warmup_cosine_schedule():
    f = warmup_cosine(10, 110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_fresh_run_into_a_used_output_dir_and_two_live_runs_are_refused(demo_data, tmp_path):
    """#17: a fresh run into a folder with checkpoints would have its own pruned and mixed with the old run's;
    a second live run into the same folder would interleave checkpoints and metrics."""
    from vlp.config import ConfigError

    run_dir = tmp_path / "run"
    cfg = config_from_dict(run_config(demo_data, run_dir, data={"workers": 0}, train={"steps": 2, "save_every": 2}))
    first = Trainer(cfg)
    with pytest.raises(RunDirBusy, match="in use by a running training"):
        Trainer(cfg)  # while `first` holds the folder
    first.fit()  # releases it
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)] == ["step_00000002"]
    with pytest.raises(ConfigError, match="holds checkpoints of an earlier run .*--resume auto"):
        Trainer(cfg)
    resumed = Trainer(cfg, resume="auto")  # continuing it is fine
    assert resumed.step == 2
    resumed.release()
    proc = subprocess.run([sys.executable, "-m", "vlp.train", "--config",
                           str(write_config(tmp_path / "c.yaml", run_config(demo_data, run_dir)))],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "holds checkpoints of an earlier run" in proc.stderr.splitlines()[-1]


def test_resume_falls_back_past_a_corrupt_latest_checkpoint(demo_data, tmp_path, caplog):
    """#17: a latest checkpoint corrupted after publishing (a truncated weight file) gave a raw traceback."""
    run_dir = tmp_path / "run"
    cfg = config_from_dict(run_config(demo_data, run_dir, data={"workers": 0},
                                      train={"steps": 4, "save_every": 2, "keep_last": 2}))
    Trainer(cfg).fit()
    older, latest = ckpt_io.list_checkpoints(run_dir)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 2 and "falling back" in caplog.text
    resumed.release()
    (older / "model.safetensors").write_bytes(b"")
    with pytest.raises(RuntimeError, match="unreadable .* no older one is left"):
        Trainer(cfg, resume="auto")


def test_after_a_fallback_pruning_keeps_the_good_checkpoint_not_the_corrupt_one(demo_data, tmp_path, caplog):
    """#30: resumed past a corrupt newest checkpoint with keep_last=1, pruning kept the corrupt one (the newest step)
    and deleted the good one the resumed run had just written."""
    run_dir = tmp_path / "run"
    raw = run_config(demo_data, run_dir, data={"workers": 0}, train={"steps": 4, "save_every": 2, "keep_last": 2})
    Trainer(config_from_dict(raw)).fit()
    latest = ckpt_io.list_checkpoints(run_dir)[-1]
    (latest / "model.safetensors").write_bytes(b"")
    resumed = Trainer(config_from_dict({**raw, "train": {**raw["train"], "steps": 3, "save_every": 1,
                                                         "keep_last": 1}}), resume="auto")
    assert resumed.step == 2
    resumed.fit()
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)] == ["step_00000003"]
    assert ckpt_io.read_run_info(run_dir)["step"] == 3 and ckpt_io.model_state_dict(run_dir)
    assert (run_dir / "checkpoints" / "step_00000004.unreadable").is_dir()  # kept for a look, out of the list
    assert "set aside as step_00000004.unreadable" in caplog.text


def test_resume_with_another_model_is_a_config_error(demo_data, tmp_path):
    """#30: resuming with another model logged "unreadable, falling back" for each checkpoint, then a traceback."""
    run_dir = tmp_path / "run"
    Trainer(config_from_dict(run_config(demo_data, run_dir, data={"workers": 0},
                                        train={"steps": 2, "save_every": 2}))).fit()
    other = run_config(demo_data, run_dir, model={"name": "vlp-tiny-vit", "mask_ratio": 0.75},
                       train={"steps": 4, "save_every": 2})
    proc = subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(write_config(tmp_path / "c.yaml", other)),
                           "--resume", "auto"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "was trained with another model" in last and "falling back" not in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in ckpt_io.list_checkpoints(run_dir)] == ["step_00000002"]


def test_resume_with_changed_settings_says_what_changed(demo_data, tmp_path, caplog):
    """#17 item 6: resuming after changing the batch, the workers or the mask ratio was accepted silently (and the
    changed worker count turned exact data resume off without a word)."""
    run_dir = tmp_path / "run"
    raw = run_config(demo_data, run_dir, data={"workers": 0}, train={"steps": 2, "save_every": 2})
    Trainer(config_from_dict(raw)).fit()
    same = Trainer(config_from_dict({**raw, "train": {**raw["train"], "steps": 4}}), resume="auto")
    same.release()
    assert "changed settings" not in caplog.text  # a longer run is the same run
    changed = run_config(demo_data, run_dir, data={"workers": 1, "batch": {"paired": 6, "labeled": 4,
                                                                         "unlabeled": 4}},
                         model={"name": "vlp-test-vit", "mask_ratio": 0.5}, train={"steps": 4, "save_every": 2})
    Trainer(config_from_dict(changed), resume="auto").release()
    warning = next(r.message for r in caplog.records if "changed settings" in r.message)
    for text in ("data.batch.paired: 8 -> 6", "data.workers: 0 -> 1", "model.mask_ratio: 0.75 -> 0.5",
                 "data streams restart"):
        assert text in warning, warning
    record = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["resume_changes"]["data.workers"] == [0, 1] and record["exact_data_resume"] is False


def test_checkpoint_write_failure_leaves_no_partial_checkpoint_and_says_so(demo_data, tmp_path):
    """#17 item 7: a full disk gave torch's `unexpected pos` traceback and left a .tmp checkpoint that kept the disk
    full. A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG as they fail with ENOSPC on a
    full disk) makes the checkpoint write fail the same way, without filling this machine's disk."""
    import resource

    run_dir = tmp_path / "run"
    # workers 0: the limit would also stop DataLoader workers from sharing batches (their /dev/shm files)
    path = write_config(tmp_path / "c.yaml", run_config(demo_data, run_dir, data={"workers": 0},
                                                        train={"steps": 4, "save_every": 2}))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(path)], env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=limit_file_size)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert last.startswith("error: could not write checkpoint step_00000002") and "partial checkpoint is removed" in last
    assert not list((run_dir / "checkpoints").glob("*")), "a partial checkpoint was left behind"


def test_a_source_with_no_readable_shard_ends_the_run_with_one_line(demo_data, tmp_path):
    """#17 item 4 end to end: the error raised in the DataLoader worker ended the step, but the process then hung
    at exit (multiprocessing's exit handler sends the worker one SIGTERM, which workers absorb, then joins it)."""
    bad = tmp_path / "unreadable"
    bad.mkdir()
    (bad / "a-000000.tar").write_bytes(b"this is not a tar archive" * 40)
    (bad / "a-000001.tar").write_bytes(b"")
    cfg = run_config(demo_data, tmp_path / "run", data={"workers": 1})
    cfg["data"]["sources"][1] = {"name": "brokenpairs", "kind": "paired", "shards": str(bad / "*.tar")}
    proc = subprocess.run([sys.executable, "-m", "vlp.train", "--config", str(write_config(tmp_path / "c.yaml", cfg))],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 6, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: source brokenpairs: none of its 2 shard(s)")
