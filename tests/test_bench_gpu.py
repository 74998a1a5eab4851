"""tools/bench_gpu.py and tools/gpu_fsdp_check.py on the CPU (#29 items 3 and 4): open_clip_train's step rebuilt in
process is open_clip_train's step (one step of it equals one of ``train_one_epoch``) and counts the FLOPs of vlp's
CLIP-only step on the same model and batch; the end-to-end rows' ratios; the FSDP check's non-FSDP path passes
and its FSDP path skips without CUDA."""
import argparse
import json
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_gpu  # noqa: E402
import gpu_fsdp_check  # noqa: E402
from benchlib.openclip import OpenClipStep, openclip_windows  # noqa: E402

CPU = torch.device("cpu")


def _args(**kw):
    return argparse.Namespace(**{"steps": 2, "warmup": 1, "compile": False, "grad_checkpointing": False, **kw})


@pytest.fixture(scope="module")
def model_json(tmp_path_factory):
    return bench_gpu.model_json("vlp-test-vit", None, tmp_path_factory.mktemp("models"))


def test_open_clip_step_row_runs_synchronized_and_counts_vlp_clip_only_flops(model_json):
    args = _args()
    vlp_row, host = bench_gpu.bench_vlp("clip", bench_gpu.recipe_config("clip", model_json, 16, 2), CPU, args, 1e10)
    oc_row = bench_gpu.bench_open_clip(model_json, host, CPU, args, 1e10)
    assert oc_row["gflop_per_step"] == vlp_row["gflop_per_step"] > 0  # the same step, counted the same way
    assert oc_row["label"] == "open_clip step (synchronized)" and oc_row["batch"] == vlp_row["batch"] == 16
    assert set(oc_row["parts_s"]) == {"data", "forward", "backward", "optimizer"}
    assert oc_row["step_s"] == pytest.approx(sum(oc_row["parts_s"].values())) and oc_row["samples_per_s"] > 0
    assert oc_row["mfu"] == pytest.approx(oc_row["gflop_per_step"] * 1e9 / oc_row["step_s"] / 1e10)
    assert "--precision fp32" in oc_row["command_line"] and "--model vlp-test-vit" in oc_row["command_line"]
    table = bench_gpu.report([{"device": "cpu", "peak": "cpu", "model": "vlp-test-vit", "args": vars(args) | {
        "batch_size": 16}, "steps": {"clip": vlp_row, "open_clip": oc_row}}])
    assert "open_clip step (synchronized)" in table and "Batch (t) - Data (t)" not in table


def test_open_clip_step_is_open_clip_trains_step(model_json):
    """One OpenClipStep step and one step of open_clip_train's own train_one_epoch, from the same init on the same
    batch, leave the same parameters (and the optimizer is open_clip_train's: no decay on gains and biases)."""
    from open_clip_train.train import train_one_epoch

    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 400, (8, 16))
    ours, theirs = OpenClipStep(model_json, CPU, 4, 8, "fp32"), OpenClipStep(model_json, CPU, 4, 8, "fp32")
    assert all(torch.equal(a, b) for a, b in zip(ours.original.parameters(), theirs.original.parameters()))
    groups = ours.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.2] and ours.scaler is None
    assert all(p.ndim >= 2 for p in groups[1]["params"])
    init = [p.detach().clone() for p in ours.original.parameters()]
    ours.step(0, images, texts, lambda: None)
    assert sum(not torch.equal(a, b) for a, b in zip(ours.original.parameters(), init)) > 10  # it trained

    loader = type("Loader", (), {"num_batches": 1, "num_samples": 8, "__iter__": lambda self: iter([(images, texts)])})()
    data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda epoch: None)}
    theirs.args.wandb = theirs.args.tensorboard = False
    train_one_epoch(theirs.model, data, theirs.loss, 0, theirs.optimizer, theirs.scaler, theirs.scheduler, None,
                    theirs.args)
    for (name, a), b in zip(ours.original.named_parameters(), theirs.original.parameters()):
        assert torch.equal(a, b), name


def test_e2e_rows_ratios_and_table():
    args = argparse.Namespace(batch_size=32, e2e_warmup=2, e2e_steps=6, e2e_log_every=1, workers=3)
    steps = {"clip": {"gflop_per_step": 10.0, "step_s": 0.1}, "mixed": {"gflop_per_step": 4.0, "step_s": 0.05},
             "open_clip": {"gflop_per_step": 10.0, "step_s": 0.1}}
    # (first step, last step, step seconds, data seconds); the windows of steps 1-2 are warm-up
    runs = {"vlp_mixed": [(1, 2, 9.0, 9.0), (3, 4, 0.2, 0.05), (5, 6, 0.2, 0.05)],
            "vlp_clip": [(1, 2, 9.0, 9.0), (3, 6, 0.64, 0.04)],
            "open_clip_train": [(1, 1, 5.0, 5.0), (2, 2, 5.0, 5.0), (3, 6, 0.8, 0.4)]}
    e2e = {name: bench_gpu.e2e_row(name, {"windows": w, "wall_s": 30.0, "peak_rss_mb": 1.0,
                                          "peak_tree_pss_mb": 2.0}, args, steps, 1e12)
           for name, w in runs.items()}
    bench_gpu.e2e_ratios(e2e)
    assert e2e["open_clip_train"]["samples_per_s"] == pytest.approx(32 * 4 / 0.8)  # 160
    assert e2e["vlp_mixed"]["samples_per_s"] == pytest.approx(32 * 4 / 0.4)  # 320
    assert e2e["vlp_mixed"]["ratio_vs_open_clip_train"] == pytest.approx(2.0)
    assert e2e["vlp_clip"]["ratio_vs_open_clip_train"] == pytest.approx(1.25)
    assert e2e["open_clip_train"]["ratio_vs_open_clip_train"] == pytest.approx(1.0)
    assert e2e["vlp_mixed"]["loader_wait_frac"] == pytest.approx(0.25)
    assert e2e["open_clip_train"]["idle_frac"] == pytest.approx(1 - 0.1 / 0.2)
    assert e2e["vlp_clip"]["mfu"] == pytest.approx(10e9 / 0.16 / 1e12)
    assert bench_gpu.e2e_ratios({"vlp_clip": dict(e2e["vlp_clip"])})["vlp_clip"]["ratio_vs_open_clip_train"] is None
    doc = {"device": "cuda", "peak": "x", "model": "m", "e2e_images": 100, "e2e_size": 224,
           "args": vars(args) | {"batch_size": 32}, "e2e": e2e}
    table = bench_gpu.report([doc])
    assert "2.00x" in table and "1.25x" in table and "1.00x" in table and "3 workers" in table
    assert bench_gpu.e2e_row("vlp_clip", {"windows": runs["vlp_clip"][:1], "wall_s": 1, "peak_rss_mb": 1,
                                          "peak_tree_pss_mb": 1}, args, steps, 1e12) is None


def test_openclip_windows_from_its_log_lines():
    log = ("Train Epoch: 0 [   64/640 ( 10%)] Data (t): 0.500 Batch (t): 2.000, 32.0/s, 32.0/s/gpu LR: 0.0001\n"
           "Train Epoch: 0 [  192/640 ( 30%)] Data (t): 0.100 Batch (t): 0.400, 160/s, 160/s/gpu LR: 0.0003\n")
    assert openclip_windows(log, 32) == [(1, 2, 4.0, 1.0), (3, 6, pytest.approx(1.6), pytest.approx(0.4))]


def test_fsdp_check_without_fsdp_passes_on_cpu(tmp_path, capsys):
    out = tmp_path / "checks.json"
    rc = gpu_fsdp_check.main(["--no-fsdp", "--steps", "4", "--resume-at", "2", "--workers", "1",
                              "--work", str(tmp_path / "work"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0 and doc["passed"], capsys.readouterr().out[-3000:]
    names = {r["check"] for r in doc["checks"]}
    assert {"first step after resume", "losses after resume", "final weights", "final teacher",
            "open_clip loads the export", "export weights", "export embeddings"} <= names
    assert all(r["ok"] for r in doc["checks"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs FSDP instead of skipping")
def test_fsdp_check_skips_without_cuda(tmp_path, capsys):
    assert gpu_fsdp_check.main(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "s.json")]) == 0
    assert "SKIPPED: no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == "no CUDA device"
    assert not (tmp_path / "w").exists()


def test_fsdp_check_names_a_broken_resume(tmp_path, monkeypatch, capsys):
    """A resume that does not continue the run (here: the checkpoint's weights are perturbed before it is read)
    fails the check, which names the step and the losses, exit 1."""
    from safetensors.torch import load_file, save_file

    real = gpu_fsdp_check.launch

    def perturbed(tree, work, name, fsdp, extra=()):
        if extra:
            weights = f"{extra[-1]}/model.safetensors"
            save_file({k: v + 1e-2 * torch.randn_like(v) for k, v in load_file(weights).items()}, weights)
        return real(tree, work, name, fsdp, extra)

    monkeypatch.setattr(gpu_fsdp_check, "launch", perturbed)
    monkeypatch.setattr(gpu_fsdp_check, "check_export", lambda *a: None)
    rc = gpu_fsdp_check.main(["--no-fsdp", "--steps", "3", "--resume-at", "1", "--workers", "0",
                              "--work", str(tmp_path / "work")])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL first step after resume" in out and "FAILED (" in out


def test_a_failing_row_is_reported_and_the_rest_still_run(tmp_path, monkeypatch, capsys):
    """On a one-shot GPU call an OOM or a compile error in one row must not lose the rows after it."""
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def fake_open_clip(mjson, host, device, args, peak):
        assert host.image.shape[0] == 16  # the CLIP-only batch, built although its row did not run
        return {"label": "open_clip step (synchronized)", "batch": 16, "samples_per_s": 10.0, "step_s": 1.6,
                "parts_s": {"data": 0.1, "forward": 0.5, "backward": 0.8, "optimizer": 0.2},
                "gflop_per_step": 1.0, "mfu": 0.1, "peak_mem_mb": 1.0}

    monkeypatch.setattr(bench_gpu, "bench_vlp", oom)
    monkeypatch.setattr(bench_gpu, "bench_open_clip", fake_open_clip)
    out = tmp_path / "r.json"
    assert bench_gpu.main(["--model", "vlp-test-vit", "--batch-size", "16", "--rows", "flip,open_clip", "--e2e", "",
                           "--no-loader", "--cache-dir", str(tmp_path), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["steps"]) == ["open_clip"] and "CUDA out of memory" in doc["errors"]["step flip"]
    assert "FAILED step flip: RuntimeError: CUDA out of memory" in bench_gpu.report([doc])
