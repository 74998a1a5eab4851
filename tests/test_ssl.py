"""The self-supervised methods together: 2-process DDP gradients of SimCLR (gather with grad), MoCo v3 (gathered
keys), SwAV and MSN (distributed Sinkhorn) equal one process at the doubled batch (one `accelerate launch` for all);
every configs/ssl/*.yaml validates as an SSL run with kNN monitoring; each new method trains alone on real shards, and
each shipped <method>-clip config trains the method mixed with CLIP."""
import json
import math
import sys

import pytest
import torch
import yaml

from conftest import REPO, run_config, step_metrics
from test_train import run_two_processes
from vlp.config import config_from_dict, load_config
from vlp.train import Trainer

sys.path.insert(0, str(REPO / "tests" / "scripts"))
from ddp_grads_ssl import METHODS, STEP, build, global_batch, grads, objective, running_stats  # noqa: E402

SSL_CONFIGS = sorted((REPO / "configs" / "ssl").glob("*.yaml"))


@pytest.fixture(scope="module")
def ddp_grads(tmp_path_factory):
    return run_two_processes("ddp_grads_ssl.py", tmp_path_factory.mktemp("ddp_ssl"))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_process_gradients_equal_single_process(ddp_grads, method):
    """DDP over 2 CPU processes, 3 rows each, == one process on the 6 rows: exact because every loss is a mean of
    per-row terms over the global batch (negatives gathered, Sinkhorn sums all-reduced, SwAV's projector
    batch-normalised over the global batch: its gradients and running statistics)."""
    task = build(method)
    loss, _ = task.training_forward(global_batch(2), STEP)
    loss.backward()
    single, ddp = grads(task.student), ddp_grads[method]
    assert single and any(n.startswith("clip.visual.") for n in single)
    assert any(n.startswith(f"{objective(method)}_head.") for n in single)
    assert max(g.abs().max() for g in single.values()) > 1e-4
    for n, g in single.items():
        # BatchNorm over 6 rows divides by a small batch's std: float32 rounding of its reductions (one process's
        # sum against two ranks' all-reduced sums) reaches a few 1e-6 of a gradient's scale, so its tolerance grows
        # with the gradient's largest entry (never below 1e-6); every other case keeps the absolute 1e-6
        atol = max(1e-6, 1e-5 * float(g.abs().max())) if method.endswith("batchnorm") else 1e-6
        assert torch.allclose(g, ddp[n], atol=atol, rtol=1e-4), n
    assert all(ddp[n].abs().sum() == 0 for n in set(ddp) - set(single))
    running = running_stats(task.student)  # BatchNorm over the global batch (SwAV's projector): the same statistics
    assert running.keys() == ddp_grads[f"{method}/running"].keys()
    for n, b in running.items():
        assert torch.allclose(b, ddp_grads[f"{method}/running"][n], atol=1e-6, rtol=1e-5), n
    if method.endswith("batchnorm"):
        var = running["swav_head.projector.1.running_var"]
        assert not torch.equal(var, torch.ones_like(var))  # a step updated them


def test_every_ssl_config_validates_reads_the_cifar_shards_and_monitors_knn():
    names = {p.stem for p in SSL_CONFIGS}
    methods = {"simclr", "mocov3", "byol", "dino", "swav", "rotation", "jigsaw", "colorization", "context", "beit"}
    assert methods | {f"{m}-clip" for m in methods} <= names
    for path in SSL_CONFIGS:
        cfg = load_config(path, check_files=False)
        active = {n for n, o in cfg.objectives.items() if o.weight > 0}
        method = path.stem.removesuffix("-clip")
        assert method in active, path.name
        kinds = {s.kind for s in cfg.data.sources}
        if path.stem.endswith("-clip"):
            assert active == {method, "contrastive"} and kinds == {"paired", "unlabeled"}, path.name
            settings = cfg.objectives[method]
            if "kinds" in type(settings).model_fields:  # BEiT, like MAE, reads every row of the shared masked pass
                assert settings.kinds == ["unlabeled"], path.name
        else:
            assert active == {method} and kinds == {"unlabeled"}, path.name
        assert all(str(s.shards).startswith("bench_out/quality/shards/") for s in cfg.data.sources)
        assert cfg.eval.knn is not None and cfg.train.eval_every, path.name


@pytest.mark.parametrize("method", ["simclr", "mocov3", "swav", "jigsaw"])
def test_method_alone_trains_on_real_shards(demo_data, tmp_path, method):
    """A few real steps of the method alone on the digits' unlabeled shards (tiny test model), kNN at the end."""
    small = {"simclr": {"hidden_dim": 32, "proj_dim": 16}, "mocov3": {"hidden_dim": 32, "proj_dim": 16},
             "swav": {"hidden_dim": 32, "proj_dim": 16, "n_prototypes": 16, "n_local": 2,
                      "freeze_prototypes_steps": 1},
             "jigsaw": {"n_permutations": 8, "tile_dim": 8, "hidden_dim": 16}}[method]
    cfg = run_config(demo_data, tmp_path / method, train={"steps": 3, "log_every": 1, "save_every": 3,
                                                           "progress": False})
    cfg["data"]["sources"] = [s for s in cfg["data"]["sources"] if s["kind"] == "unlabeled"]
    cfg["data"]["batch"] = {"unlabeled": 6}
    cfg["data"]["workers"] = 0
    cfg["objectives"] = {method: small}
    cfg["eval"] = {"knn": {"shards": str(demo_data / "test" / "*.tar"),
                           "train_shards": str(demo_data / "labeled" / "*.tar"), "k": 5}, "batch_size": 64}
    Trainer(config_from_dict(cfg)).fit()
    steps = step_metrics(tmp_path / method)
    assert sorted(steps) == [1, 2, 3]
    assert all(math.isfinite(r[f"loss/{method}"]) and r[f"loss/{method}"] > 0 for r in steps.values())
    knn = [json for json in (tmp_path / method / "metrics.jsonl").read_text().splitlines() if "knn" in json]
    assert knn, "no kNN evaluation logged"


@pytest.mark.parametrize("path", [p for p in SSL_CONFIGS if p.stem.endswith("-clip")], ids=lambda p: p.stem)
def test_each_clip_config_trains_the_method_mixed_with_clip(demo_data, tmp_path, path):
    """The shipped ``configs/ssl/<method>-clip.yaml`` as it is (its model, objectives, views, teacher, optimizer),
    pointed at the digits' real paired + unlabeled shards: both losses are finite and non-zero every step, and the
    run ends with kNN and zero-shot evaluations."""
    tree = yaml.safe_load(path.read_text())
    method = path.stem.removesuffix("-clip")
    shards = {"paired": demo_data / "paired" / "*.tar", "unlabeled": demo_data / "unlabeled" / "*.tar"}
    for source in tree["data"]["sources"]:
        source["shards"] = str(shards[source["kind"]])
    tree["data"].update(batch={"paired": 6, "unlabeled": 6}, workers=0, shuffle_buffer=20)
    tree["output_dir"] = str(tmp_path / path.stem)
    tree["train"] = {"steps": 2, "log_every": 1, "save_every": 2, "progress": False}
    tree["optim"]["warmup_steps"] = 1
    tree["eval"] = {"knn": {"shards": str(demo_data / "test" / "*.tar"),
                            "train_shards": str(demo_data / "labeled" / "*.tar"), "k": 5},
                    "zeroshot": {"shards": str(demo_data / "test" / "*.tar")}, "batch_size": 64}
    Trainer(config_from_dict(tree)).fit()
    steps = step_metrics(tmp_path / path.stem)
    assert sorted(steps) == [1, 2]
    for rec in steps.values():
        for name in ("contrastive", method):
            assert math.isfinite(rec[f"loss/{name}"]) and rec[f"loss/{name}"] != 0, (name, rec)
    records = [json.loads(line) for line in (tmp_path / path.stem / "metrics.jsonl").read_text().splitlines()]
    evals = {k for rec in records for k in rec if k.startswith(("knn", "zeroshot", "eval/"))}
    assert any("knn" in k for k in evals) and any("zeroshot" in k for k in evals), evals
