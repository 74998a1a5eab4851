"""tools/bench_quality.py without training: the plan of jobs (sweep, seeds, ablations; which ones reuse an earlier
run) and ``--reuse``, which takes trainings over from an earlier results JSON only when they trained the same
thing on the same bench."""
import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_quality  # noqa: E402

CONFIG = {"objectives": ["contrastive"], "text_trained": True, "batch": {"paired": 128}, "mask_ratio": 0.5,
          "model": "vlp-tiny-vit", "change": None, "run": "clip", "gflops_per_step": 59.7}
SETTINGS = {"benchmark": "bench_quality", "quick": False, "batch_size": 128, "split": {"test": 5000},
            "split_seed": 0, "val": {"n": 2000}, "flop_steps": 10, "caption_templates": ["{c}"], "probe": {"k": 20}}


def record(name, seed, lr, steps, knn, cut_short=False):
    return {"name": name, "config": "clip", "phases": ["seed"], "seed": seed, "lr": lr, "steps": steps,
            "train": {"cut_short": cut_short},
            "eval": {"test": {"knn_top1/pooled": knn}, "val": {"knn_top1/pooled": knn - 0.01}}}


def test_plan_sweeps_at_full_length_and_the_first_seed_reuses_the_chosen_sweep_run():
    configs = {"clip": dict(CONFIG), "mixed": dict(CONFIG, gflops_per_step=2 * 59.7, run="mixed")}
    sweep = {"clip": [5e-4, 1e-3]}
    jobs = bench_quality.plan_jobs(100, ["clip"], "mixed", configs, sweep, {}, [0, 1], 1.0, [], False)
    assert [(j.name, j.seed, j.lr, j.steps) for j in jobs] == [
        ("sweep-clip-lr0.0005", 0, 5e-4, 200), ("sweep-clip-lr0.001", 0, 1e-3, 200),
        ("clip-seed0", 0, None, 200), ("clip-seed1", 1, None, 200)]
    assert bench_quality.reused(jobs, sweep) == [False, False, True, False]
    half = bench_quality.plan_jobs(100, ["clip"], "mixed", configs, sweep, {}, [0, 1], 0.5, [], False)
    assert [j.steps for j in half] == [100, 100, 200, 200] and not any(bench_quality.reused(half, sweep))


def test_reuse_takes_over_the_same_trainings_only(tmp_path):
    old = {**SETTINGS, "created": "2026-11-25 21:36:03", "configs": {"clip": dict(CONFIG)}, "jobs": [
        record("clip-seed0", 0, 0.001, 276, 0.43),
        record("clip-seed1", 1, 0.001, 276, 0.42, cut_short=True),   # stopped early: trained again
        record("clip-seed2", 2, 0.001, 250, 0.41)]}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    doc = {**SETTINGS, "configs": {"clip": dict(CONFIG, gflops_per_step=59.7001)}, "jobs": []}
    prior = bench_quality.reusable_records([path], doc)
    assert set(prior) == {("clip", 0, 1e-3, 276), ("clip", 2, 1e-3, 250)}
    source, rec = prior[("clip", 0, 1e-3, 276)]
    assert rec["eval"]["test"]["knn_top1/pooled"] == 0.43 and "2026-11-25 21:36:03" in source

    # the same name trains something else now: other masking, or other FLOPs (a changed objective or model)
    for change in ({"mask_ratio": 0.75}, {"gflops_per_step": 61.0}, {"objectives": ["contrastive", "simclr"]}):
        other = {**doc, "configs": {"clip": dict(CONFIG, **change)}}
        assert bench_quality.reusable_records([path], other) == {}


@pytest.mark.parametrize("key,value", [("batch_size", 64), ("split", {"test": 1000}), ("val", {"n": 500}),
                                       ("quick", True)])
def test_reuse_refuses_another_bench_naming_what_differs(tmp_path, key, value):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({**SETTINGS, "created": "x", "configs": {}, "jobs": []}))
    with pytest.raises(SystemExit, match=f"--reuse .*{key} differ"):
        bench_quality.reusable_records([path], {**SETTINGS, key: value, "configs": {}})


def test_report_names_the_trainings_taken_over():
    job = dict(record("clip-seed0", 0, 1e-3, 276, 0.43), reused_from="old.json of 2026-11-25 21:36:03")
    job["eval"]["test"].update({k: 0.4 for _, k in bench_quality.COLUMNS if k != bench_quality.SELECT_KEY})
    doc = {**SETTINGS, "runs": ["clip"], "seeds": [0], "reference": "clip", "reference_steps": 276,
           "configs": {"clip": dict(CONFIG)}, "jobs": [job], "lr": {"clip": {"lr": 1e-3, "how": "given"}}}
    text = bench_quality.report(doc)
    assert "43.00" in text and "1 of 1 trainings taken over (--reuse) from old.json of 2026-11-25 21:36:03: clip-seed0" \
        in text


def test_a_best_lr_at_the_edge_of_the_sweep_is_swept_one_grid_step_further():
    def swept(*pairs):
        return [{"lr": lr, "eval": {"val": {"knn_top1/pooled": v}}} for lr, v in pairs]
    assert bench_quality.beyond_edge(swept((5e-4, 0.42), (1e-3, 0.39), (2e-3, 0.36))) == 2.5e-4
    assert bench_quality.beyond_edge(swept((5e-4, 0.30), (1e-3, 0.39), (2e-3, 0.41))) == 4e-3
    assert bench_quality.beyond_edge(swept((5e-4, 0.30), (1e-3, 0.39), (2e-3, 0.36))) is None
    assert bench_quality.beyond_edge(swept((2.5e-4, 0.40), (5e-4, 0.42), (1e-3, 0.39))) is None
    assert bench_quality.beyond_edge(swept((1e-3, 0.40))) is None  # no grid: nothing to extend


def test_a_run_may_train_at_the_lr_chosen_for_another():
    configs = {"mixed": dict(CONFIG, run="mixed"), "variant": dict(CONFIG, run="variant")}
    sweep = {"mixed": [5e-4, 1e-3]}
    jobs = bench_quality.plan_jobs(100, ["mixed", "variant"], "mixed", configs, sweep, {}, [0, 1], 1.0, [], False,
                                   one_seed=("variant",), follow={"variant": "mixed"})
    assert [(j.name, j.lr, j.lr_of) for j in jobs] == [
        ("sweep-mixed-lr0.0005", 5e-4, ""), ("sweep-mixed-lr0.001", 1e-3, ""), ("mixed-seed0", None, "mixed"),
        ("mixed-seed1", None, "mixed"), ("variant-seed0", None, "mixed")]
    assert bench_quality.reused(jobs, sweep) == [False, False, True, False, False]


def test_report_of_a_bench_still_sweeping_shows_the_sweep_without_a_choice():
    job = dict(record("sweep-clip-lr0.0005", 0, 5e-4, 276, 0.43), phases=["sweep"])
    doc = {**SETTINGS, "runs": ["clip"], "seeds": [0], "reference": "clip", "reference_steps": 276,
           "configs": {"clip": dict(CONFIG)}, "jobs": [job], "lr": {}}
    row = next(line for line in bench_quality.report(doc).splitlines() if line.startswith("clip  "))
    assert row.split() == ["clip", "276", "42.00", "-"]
