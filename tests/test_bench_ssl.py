"""tools/bench_ssl.py without training: every method's run config validates with the bench's shards and batch,
the self-supervised ones read only the unlabeled split, and the report table ranks the evaluated runs."""
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from vlp.config import config_from_dict

sys.path.insert(0, str(REPO / "tools"))
import bench_ssl  # noqa: E402


def test_every_method_config_validates_with_the_bench_shards_and_batch(tmp_path):
    assert {"simclr", "mocov3", "byol", "dino", "swav", "rotation", "jigsaw", "colorization", "context", "mae",
            "beit", "supervised", "random"} <= set(bench_ssl.METHODS)
    for method, (config, paper) in bench_ssl.METHODS.items():
        assert paper
        if config is None:
            continue
        tree = bench_ssl.run_tree(method, tmp_path / "shards", 32)
        cfg = config_from_dict(tree, check_files=False)
        assert sum(cfg.data.batch.model_dump().values()) == 32 and cfg.eval.knn is None
        assert all(str(s).startswith(str(tmp_path / "shards")) for src in cfg.data.sources
                   for s in (src.shards if isinstance(src.shards, list) else [src.shards]))
        if config.startswith("ssl/"):
            assert [s.kind for s in cfg.data.sources] == ["unlabeled"]
            assert Path(cfg.data.sources[0].shards).parent.name == "unlabeled"
            assert method in {n for n, o in cfg.objectives.items() if o.weight > 0}


def test_table_ranks_the_evaluated_runs_by_knn():
    def run(knn, linear, **kw):
        return {"eval": {"test": {"knn_top1/pooled": knn, "linear_top1/pooled": linear}}, **kw}
    doc = {"reference": "simclr", "runs": {
        "random": run(0.2, 0.3, steps_done=0),
        "simclr": run(0.4, 0.45, steps=20, steps_done=20, gflops_per_step=50.0, wall_s=100),
        "dino": run(0.3, 0.35, steps=12, steps_done=10, gflops_per_step=100.0, wall_s=90, cut_short=True),
        "swav": run(0.25, 0.3, steps=8, steps_done=8, gflops_per_step=70.0, wall_s=90, cut_short=True)}}
    lines = bench_ssl.table(doc).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["simclr (reference)", "dino", "swav", "random"]
    assert "| 40.0 | 45.0 |" in lines[2] and "10 of 12 (cut short)" in lines[3] and "| 8 |" in lines[4] and "| 1.0 |" in lines[2]


def test_a_short_run_keeps_the_configs_schedule_fractions():
    """DINO's config is written for 2,000 steps (last layer frozen 250, teacher tau 0.99): a 200-step bench run
    freezes 25 steps and its teacher keeps the time constant 1 / (1 - tau) at the same fraction of the run."""
    tree = bench_ssl.run_tree("dino", Path("shards"), 32)
    assert tree["train"]["steps"] == 2000 and tree["teacher"]["tau"] == 0.99
    short = bench_ssl.compress_schedule(tree, 200)
    assert short["objectives"]["dino"]["freeze_last_layer_steps"] == 25
    assert short["teacher"]["tau"] == 0.9  # 1 / (1 - 0.9) = 10 steps = 5% of 200, as 100 steps of 2,000
    config_from_dict(short, check_files=False)
    full = bench_ssl.compress_schedule(bench_ssl.run_tree("dino", Path("shards"), 32), 2000)
    assert full["objectives"]["dino"]["freeze_last_layer_steps"] == 250 and full["teacher"]["tau"] == 0.99


def test_results_of_parallel_processes_merge_into_one_table_and_other_benches_are_refused():
    def doc(runs, budget=300):
        return {"reference": "simclr", "budget_steps": budget, "batch_size": 64, "split": "full", "seed": 0,
                "runs": {m: {"eval": {"test": {"knn_top1/pooled": k, "linear_top1/pooled": k}}, "steps": 10,
                             "steps_done": 10, "gflops_per_step": 1.0} for m, k in runs.items()}}
    merged = bench_ssl.merge_results([doc({"simclr": 0.4, "dino": 0.2}), doc({"dino": 0.3, "swav": 0.25})])
    assert merged["runs"]["dino"]["eval"]["test"]["knn_top1/pooled"] == 0.3  # the later file's run
    assert [line.split("|")[1].strip() for line in bench_ssl.table(merged).splitlines()[2:]] == \
        ["simclr (reference)", "dino", "swav"]
    with pytest.raises(SystemExit, match="budget_steps"):
        bench_ssl.merge_results([doc({"simclr": 0.4}), doc({"dino": 0.3}, budget=800)])


def test_run_all_runs_every_method_at_most_parallel_at_once():
    import threading

    running, peak, lock = [0], [0], threading.Lock()

    def job(i, m, together=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        if together is not None and i < together.parties:
            together.wait(timeout=10)  # the first `parallel` jobs must run at the same time, or this breaks
        with lock:
            running[0] -= 1
        return i

    methods = ["simclr", "dino", "swav", "byol", "random"]
    assert list(bench_ssl.run_all(methods, job)) == [(m, i) for i, m in enumerate(methods)]  # one at a time, in order
    assert peak[0] == 1
    peak[0] = 0
    together = threading.Barrier(3)
    done = list(bench_ssl.run_all(methods, lambda i, m: job(i, m, together), parallel=3))
    assert sorted(done) == sorted((m, i) for i, m in enumerate(methods)) and peak[0] == 3


def test_set_overrides_one_methods_config_and_shows_in_the_table(tmp_path):
    sets = bench_ssl.parse_sets(["swav:objectives.swav.epsilon=0.07", "swav:objectives.swav.projector_norm=layer",
                                 "jigsaw:objectives.jigsaw.encode=image"], ["simclr", "swav", "jigsaw"])
    assert sets == {"swav": [("objectives.swav.epsilon", 0.07), ("objectives.swav.projector_norm", "layer")],
                    "jigsaw": [("objectives.jigsaw.encode", "image")]}
    cfg = config_from_dict(bench_ssl.run_tree("swav", tmp_path, 32, overrides=sets["swav"]), check_files=False)
    assert cfg.objectives["swav"].epsilon == 0.07 and cfg.objectives["swav"].projector_norm == "layer"
    plain = config_from_dict(bench_ssl.run_tree("swav", tmp_path, 32), check_files=False).objectives["swav"]
    shipped = yaml.safe_load((REPO / "configs" / "ssl" / "swav.yaml").read_text())["objectives"]["swav"]
    assert (plain.epsilon, plain.projector_norm) == (shipped["epsilon"], shipped["projector_norm"]) != (0.07, "layer")
    run = {"overrides": [["objectives.swav.epsilon", 0.07]]}
    assert bench_ssl.config_cell("swav", run) == "`configs/ssl/swav.yaml` + objectives.swav.epsilon=0.07"
    assert bench_ssl.config_cell("swav", {}) == "`configs/ssl/swav.yaml`"
    for bad in ("swav", "mocov3:optim.lr=1", "random:optim.lr=1", "swav:optim.lr"):
        with pytest.raises(SystemExit, match="--set"):
            bench_ssl.parse_sets([bad], ["simclr", "swav", "random"])


def test_a_swept_lr_is_chosen_on_validation_knn_never_on_test():
    def run(val, test):
        return {"eval": {"val": {"knn_top1/pooled": val}, "test": {"knn_top1/pooled": test}}}
    lr, best = bench_ssl.choose_lr({1e-3: run(0.30, 0.50), 5e-4: run(0.35, 0.20), 2e-4: run(0.10, 0.60)})
    assert lr == 5e-4 and best["eval"]["test"]["knn_top1/pooled"] == 0.20


def test_table_gives_the_binomial_standard_error_of_each_top1():
    assert bench_ssl.pct_se(0.3, 5000) == f"30.0 ± {100 * (0.3 * 0.7 / 5000) ** 0.5:.1f}" == "30.0 ± 0.6"
    doc = {"reference": "simclr", "runs": {"simclr": {
        "lr": 5e-4, "swept": [2e-4, 5e-4], "steps": 4, "steps_done": 4, "gflops_per_step": 10.0,
        "eval": {"input": "lightness", "val": {"knn_top1/pooled": 0.31},
                 "test": {"n": 5000, "knn_top1/pooled": 0.3, "linear_top1/pooled": 0.5}}}}}
    row = bench_ssl.table(doc).splitlines()[2]
    assert "| 0.0005 of 0.0002/0.0005 | 31.0 | 30.0 ± 0.6 | 50.0 ± 0.7 |" in row and "(lightness input)" in row


def test_lightness_input_is_colorizations_student_input_before_normalization():
    import torch
    from PIL import Image
    from torchvision import transforms

    from vlp.objectives.colorization import lightness_image

    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.25,) * 3)])
    image = Image.fromarray((torch.rand(8, 8, 3) * 255).to(torch.uint8).numpy())
    grey = bench_ssl.lightness_preprocess(preprocess)(image)
    expected = (lightness_image(transforms.ToTensor()(image)) - 0.5) / 0.25
    assert torch.allclose(grey, expected, atol=1e-6)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[1], grey[2], atol=1e-5)


def test_several_seeds_report_the_mean_its_standard_error_and_the_difference_from_random_init():
    def doc(seed, runs):
        return {"reference": "simclr", "budget_steps": 300, "batch_size": 64, "split": "full", "seed": seed,
                "runs": {m: {"eval": {"test": {"knn_top1/pooled": k, "linear_top1/pooled": k + 0.1}}, "steps": 10,
                             "steps_done": 10 * (m != "random"), "gflops_per_step": 1.0} for m, k in runs.items()}}
    docs = [doc(0, {"random": 0.28, "context": 0.305}), doc(1, {"random": 0.27}), doc(1, {"context": 0.31}),
            doc(2, {"random": 0.29, "context": 0.33})]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in bench_ssl.seeds_table(docs).splitlines()[2:]}
    assert list(rows) == ["context", "random"]                       # ranked by mean kNN
    mean, se = bench_ssl.mean_se([30.5, 31.0, 33.0])
    assert mean == pytest.approx(31.5) and se == pytest.approx((((1.0 + 0.25 + 2.25) / 2) ** 0.5) / 3 ** 0.5)
    r_mean, r_se = bench_ssl.mean_se([28.0, 27.0, 29.0])
    assert rows["context"][:3] == ["0,1,2", f"{mean:.1f} ± {se:.1f}", f"{mean - r_mean:+.1f} ± {(se ** 2 + r_se ** 2) ** 0.5:.1f}"]
    assert rows["context"][4] == f"+{mean - r_mean:.1f} ± {(se ** 2 + r_se ** 2) ** 0.5:.1f}"  # linear: the same shift
    assert rows["context"][5] == "30.5, 31.0, 33.0" and rows["random"][2] == "-"
    assert bench_ssl.mean_se([0.3]) == (0.3, None)
