"""tools/bench_quality.py without training: the plan of jobs (sweep, seeds, ablations; which ones reuse an earlier
run) and ``--reuse``, which takes trainings over from an earlier results JSON only when they trained the same
thing on the same bench."""
import json
import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_quality  # noqa: E402
import quality.plan as quality_plan  # noqa: E402

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


def doc_at(steps, knn, zeroshot, seeds=(0, 1)):
    """A results JSON of one budget: runs clip (contrastive), supervised (one objective, no text), mixed (three)."""
    objectives = {"clip": ["contrastive"], "supervised": ["supervised"],
                  "mixed": ["contrastive", "pseudolabel", "supervised"]}
    configs = {r: {"objectives": o, "text_trained": r != "supervised"} for r, o in objectives.items()}
    jobs = [{"config": r, "phases": ["seed"], "seed": s, "total_tflops": 0.066 * steps,
             "eval": {"test": {"knn_top1/pooled": knn[r] + 0.01 * s, "zeroshot_top1/templates": zeroshot[r]}}}
            for r in objectives for s in seeds]
    jobs.append({**jobs[0], "phases": ["sweep"], "eval": {"test": {"knn_top1/pooled": 0.99,  # not a headline job
                                                                   "zeroshot_top1/templates": 0.99}}})
    return {"reference_steps": steps, "reference": "mixed", "configs": configs, "jobs": jobs}


def test_gap_per_budget_against_the_best_single_objective_run(tmp_path):
    """#28: the curve's gap is the multi-objective run's seed mean minus the best single-objective run's; zero-shot
    only among runs whose text tower trains (supervised's 0.9 zero-shot is meaningless and never the best)."""
    from quality_curve import gap_table, gaps, plot_gap

    docs = [doc_at(1000, {"clip": 0.56, "supervised": 0.50, "mixed": 0.49}, {"clip": 0.56, "supervised": 0.9,
                                                                               "mixed": 0.48}),
            doc_at(250, {"clip": 0.43, "supervised": 0.45, "mixed": 0.35}, {"clip": 0.44, "supervised": 0.9,
                                                                              "mixed": 0.34})]
    rows = gaps(docs)
    assert [(r["steps"], r["run"], r["seeds"]) for r in rows] == [(250, "mixed", 2), (1000, "mixed", 2)]
    assert rows[0]["kNN"]["best_single"] == "supervised" and rows[0]["kNN"]["gap"] == pytest.approx(-10.0)
    assert rows[0]["zero-shot"]["best_single"] == "clip" and rows[0]["zero-shot"]["gap"] == pytest.approx(-10.0)
    assert rows[1]["kNN"]["best_single"] == "clip" and rows[1]["kNN"]["gap"] == pytest.approx(-7.0)
    assert rows[1]["tflops"] == pytest.approx(66.0)
    table = "\n".join(gap_table(docs))
    assert "-10.00" in table and "-7.00" in table
    png = plot_gap(docs, tmp_path / "gap_vs_budget.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parallel_jobs_wait_only_for_the_sweep_that_chooses_their_lr():
    """--parallel: a job starts as soon as its lr is known; one whose lr comes from a sweep waits for that sweep to
    end, not for other runs; a job training what a running one trains waits to reuse it."""
    configs = {"clip": dict(CONFIG), "mixed": dict(CONFIG, run="mixed")}
    jobs = bench_quality.plan_jobs(100, ["clip", "mixed"], "mixed", configs, {"clip": [5e-4, 1e-3]},
                                   {"mixed": 1e-3}, [0, 1], 1.0, [], False)
    pending, running, chosen = list(jobs), {}, {"mixed": 1e-3}

    def choose(run):
        chosen[run] = 1e-3
        return None

    def start():
        job = bench_quality.next_ready(pending, running, chosen, choose)
        if job is not None:
            running[job.name] = (job, None)
        return job and job.name

    assert [start(), start()] == ["sweep-clip-lr0.0005", "sweep-clip-lr0.001"]
    assert [start(), start()] == ["mixed-seed0", "mixed-seed1"]  # clip's seeds wait for its sweep
    assert start() is None and "clip" not in chosen
    running.pop("sweep-clip-lr0.0005")
    assert start() is None  # the other sweep job still runs
    running.pop("sweep-clip-lr0.001")
    assert start() == "clip-seed0" and chosen["clip"] == 1e-3  # the sweep is over: chosen, seeds go
    assert start() == "clip-seed1" and pending == []


def test_bench_features_are_the_pooled_token_and_the_clip_embedding_of_one_pass(demo_data):
    """The bench's probes read two features of one unmasked forward: the pooled token (before the projection) and
    exactly what ``encode_image(normalize=True)`` returns."""
    import torch

    from benchlib.evaluate import pooled_and_embed
    from vlp.data.transforms import eval_transform
    from vlp.eval.data import labeled_loader
    from vlp.models.factory import create_clip

    torch.manual_seed(0)
    clip = create_clip("vlp-test-vit")[0]
    loader = labeled_loader(str(demo_data / "test"), eval_transform(clip), 32, 0)
    pooled, embed, labels = pooled_and_embed(clip.eval(), loader)
    images = torch.cat([x for x, _ in labeled_loader(str(demo_data / "test"), eval_transform(clip), 32, 0)])
    assert pooled.shape == (len(images), 64) and embed.shape == (len(images), 32) and len(labels) == len(images)
    with torch.no_grad():
        torch.testing.assert_close(embed, clip.encode_image(images, normalize=True), rtol=1e-5, atol=1e-5)
    assert clip.visual.proj is not None  # restored after the pass


def lit_configs():
    """mixed (the reference), and the two-stage lit: lit-tower (first stage) then lit (second, locked tower)."""
    return {"mixed": dict(CONFIG, run="mixed", gflops_per_step=65.83,
                          objectives=["contrastive", "pseudolabel", "supervised"]),
            "lit-tower": dict(CONFIG, run="lit-tower", gflops_per_step=35.2, objectives=["mae", "supervised"],
                              text_trained=False, stage_of="lit"),
            "lit": dict(CONFIG, run="lit", gflops_per_step=41.9, stages=["lit-tower", "lit"], first_stage_share=0.6,
                        select="zeroshot_top1/templates", objectives=["mae", "supervised", "contrastive"])}


def test_a_two_stage_run_spends_the_budget_between_its_stages():
    """lit's two stages sum to the reference's FLOPs (each stage's steps from its own GFLOP/step; rounding: half a
    step of each), the first stage spending its share; a one-stage run matches the reference alone."""
    configs = lit_configs()
    for steps, share in ((250, 0.6), (250, 0.5), (1000, 0.625), (7, 0.3)):
        configs["lit"]["first_stage_share"] = share
        eq = bench_quality.stage_steps(steps, "mixed", configs)
        budget = steps * configs["mixed"]["gflops_per_step"]
        g1, g2 = configs["lit-tower"]["gflops_per_step"], configs["lit"]["gflops_per_step"]
        assert abs(eq["lit-tower"] * g1 + eq["lit"] * g2 - budget) <= (g1 + g2) / 2
        assert abs(eq["lit-tower"] * g1 - share * budget) <= g1 / 2
        assert eq["mixed"] == steps
    assert bench_quality.two_stage_steps(250 * 65.83, 0.6, 35.2, 41.9) == (281, 157)


def test_two_stage_plan_first_stage_then_second_from_it_each_with_its_own_sweep():
    """The plan of --runs mixed,lit: lit-tower's sweep, lit's sweep (from lit-tower at the first seed and its chosen
    lr), then per seed lit-tower and lit from it; the chosen sweep runs are the first seed's runs."""
    configs = lit_configs()
    sweep = {"lit-tower": [5e-4, 1e-3], "lit": [5e-4, 1e-3]}
    jobs = bench_quality.plan_jobs(250, ["mixed", "lit"], "mixed", configs, sweep, {"mixed": 5e-4}, [0, 1], 1.0, [],
                                   True)
    got = [(j.name, j.config, j.seed, j.lr, j.steps, j.init_of, j.phases) for j in jobs]
    assert got == [
        ("sweep-lit-tower-lr0.0005", "lit-tower", 0, 5e-4, 281, "", ["sweep"]),
        ("sweep-lit-tower-lr0.001", "lit-tower", 0, 1e-3, 281, "", ["sweep"]),
        ("sweep-lit-lr0.0005", "lit", 0, 5e-4, 157, "lit-tower-seed0", ["sweep"]),
        ("sweep-lit-lr0.001", "lit", 0, 1e-3, 157, "lit-tower-seed0", ["sweep"]),
        ("mixed-seed0", "mixed", 0, 5e-4, 250, "", ["seed"]), ("mixed-seed1", "mixed", 1, 5e-4, 250, "", ["seed"]),
        ("lit-tower-seed0", "lit-tower", 0, None, 281, "", ["stage1"]),
        ("lit-seed0", "lit", 0, None, 157, "lit-tower-seed0", ["seed"]),
        ("lit-tower-seed1", "lit-tower", 1, None, 281, "", ["stage1"]),
        ("lit-seed1", "lit", 1, None, 157, "lit-tower-seed1", ["seed"]),
        ("mixed-steps250", "mixed", 0, 5e-4, 250, "", ["equal-steps"])]  # no equal-steps row for two stages
    assert bench_quality.reused(jobs, sweep) == [False] * 6 + [True, True, False, False, True]


def test_a_second_stage_waits_for_its_first_and_its_sweep_selects_on_zero_shot():
    """next_ready: a second stage starts only once its first stage's job has finished (then its key names what that
    trained); the second stage's sweep picks the lr of the best validation zero-shot (kNN of a locked tower does not
    move), the first stage's the best kNN."""
    configs = lit_configs()
    sweep = {"lit-tower": [5e-4, 1e-3], "lit": [5e-4, 1e-3]}
    jobs = bench_quality.plan_jobs(250, ["lit"], "mixed", configs, sweep, {}, [0], 1.0, [], False)
    pending, running, chosen, finished = list(jobs), {}, {}, {}

    def choose(run):
        chosen[run] = 1e-3
        return None

    def start():
        job = bench_quality.next_ready(pending, running, chosen, choose, finished)
        if job is not None:
            running[job.name] = (job, None)
        return job

    assert [start().name, start().name, start()] == ["sweep-lit-tower-lr0.0005", "sweep-lit-tower-lr0.001", None]
    for name in list(running):
        job, _ = running.pop(name)
        finished[name] = {"config": job.config, "seed": job.seed, "lr": job.lr, "steps": job.steps}
    seed0 = start()  # lit-tower's sweep is over: its lr is chosen and its first seed may go (it reuses the sweep run)
    assert seed0.name == "lit-tower-seed0" and chosen["lit-tower"] == 1e-3 and start() is None
    running.pop(seed0.name)
    finished[seed0.name] = finished["sweep-lit-tower-lr0.001"]
    second = start()
    assert second.name == "sweep-lit-lr0.0005" and second.key() == ("lit", 0, 5e-4, 157, ("lit-tower", 0, 1e-3, 281))

    # lit's sweep is over with its best lr at the edge: the extra sweep job starts from the same first stage, and its
    # key says which (an earlier bench's run of it is taken over by --reuse)
    running.clear()
    pending[:] = [j for j in pending if j.name == "lit-seed0"]
    extra = quality_plan.Job("sweep-lit-lr0.002", "lit", 0, 2e-3, 157, ["sweep"],
                                          init_of="lit-tower-seed0")
    got = bench_quality.next_ready(pending, running, chosen, lambda run: extra, finished)
    assert got is extra and got.key() == ("lit", 0, 2e-3, 157, ("lit-tower", 0, 1e-3, 281))

    def swept(*pairs):
        return [{"lr": lr, "eval": {"val": {"knn_top1/pooled": 0.4, "zeroshot_top1/templates": z}}} for lr, z in pairs]
    assert quality_plan.best_swept(swept((5e-4, 0.30), (1e-3, 0.35)),
                                                 "zeroshot_top1/templates")["lr"] == 1e-3
    assert bench_quality.beyond_edge(swept((5e-4, 0.30), (1e-3, 0.35)), "zeroshot_top1/templates") == 2e-3


def test_a_lone_training_whose_followers_wait_on_it_gets_every_core():
    """--parallel N splits the cores between the trainings that can run side by side: a first stage whose second
    stage waits on it, with nothing else to run, gets them all; beside another training, its share."""
    from quality.run import run_threads, startable

    first = quality_plan.Job("mixed-curriculum-first-seed1", "mixed-curriculum-first", 1, 5e-4, 2757, ["seed"])
    second = quality_plan.Job("mixed-curriculum-seed1", "mixed-curriculum", 1, 5e-4, 2500, ["seed"],
                              init_of=first.name)
    other = quality_plan.Job("clip-seed2", "clip", 2, 5e-4, 5514, ["seed"])
    first_done = {first.name: {"config": first.config, "seed": 1, "lr": 5e-4, "steps": 2757}}
    assert startable([second], {}, {}, set()) == [] and startable([second], first_done, {}, set()) == [second]
    assert startable([second, other], {}, {}, set()) == [other]
    # trainings an earlier bench has done (taken over) run nothing beside it; nor does one trained in this bench
    assert startable([second, other], first_done, {}, {other.key(), ("mixed-curriculum", 1, 5e-4, 2500,
                                                                     ("mixed-curriculum-first", 1, 5e-4, 2757))}) == []
    later = quality_plan.Job("clip-seed3", "clip", 3, None, 5514, ["seed"], lr_of="clip")
    assert startable([later], {}, {}, set()) == [later]               # its lr is not chosen yet
    assert startable([later], {}, {"clip": 5e-4}, {("clip", 3, 5e-4, 5514)}) == []
    assert run_threads(1) == {}
    halves = str(max(1, (os.cpu_count() or 1) // 2))
    assert run_threads(2) == {"OMP_NUM_THREADS": halves, "MKL_NUM_THREADS": halves}


def test_report_prints_the_two_stage_row_and_its_stages():
    configs = lit_configs()
    configs["lit"]["first_stage_share_how"] = "the reference's FLOP share of its labeled+unlabeled rows"
    test = {k: 0.4 for _, k in bench_quality.COLUMNS}
    first = {"name": "lit-tower-seed0", "config": "lit-tower", "phases": ["sweep", "stage1"], "seed": 0, "lr": 1e-3,
             "steps": 281, "train": {"cut_short": False},
             "eval": {"test": dict(test), "val": {"knn_top1/pooled": 0.38, "zeroshot_top1/templates": 0.1}}}
    init = {"name": "lit-tower-seed0", "config": "lit-tower", "seed": 0, "lr": 1e-3, "steps": 281, "cut_short": False}
    second = {"name": "lit-seed0", "config": "lit", "phases": ["sweep", "seed"], "seed": 0, "lr": 5e-4, "steps": 157,
              "init": init, "train": {"cut_short": False},
              "eval": {"test": dict(test), "val": {"knn_top1/pooled": 0.38, "zeroshot_top1/templates": 0.35}}}
    mixed = {"name": "mixed-seed0", "config": "mixed", "phases": ["seed"], "seed": 0, "lr": 5e-4, "steps": 250,
             "train": {"cut_short": False}, "eval": {"test": {k: 0.3 for _, k in bench_quality.COLUMNS}, "val": {}}}
    doc = {**SETTINGS, "runs": ["mixed", "lit"], "seeds": [0], "reference": "mixed", "reference_steps": 250,
           "configs": configs, "jobs": [mixed, first, second],
           "lr": {"mixed": {"lr": 5e-4, "how": "given"}, "lit-tower": {"lr": 1e-3, "how": "sweep"},
                  "lit": {"lr": 5e-4, "how": "sweep"}}}
    text = bench_quality.report(doc)
    row = next(line for line in text.splitlines() if line.startswith("lit "))
    assert row.split()[:6] == ["lit", "35.2+41.9", "281+157", "16.5", "0.001/0.0005", "1"]
    assert "16.5" in next(line for line in text.splitlines() if line.startswith("mixed "))
    assert "lit − best single-objective run" not in text  # no single-objective run in this doc
    assert "first-stage share 0.6: the reference's FLOP share of its labeled+unlabeled rows" in text
    stage_rows = [line.split() for line in text.splitlines() if line.startswith(("1 ", "2 "))]
    assert [r[:2] for r in stage_rows] == [["1", "lit-tower"], ["2", "lit"]]
    assert stage_rows[0][2:4] == ["mae,", "supervised"] and stage_rows[1][2] == "contrastive"  # older JSON: the new
    configs["lit"]["second_stage_objectives"] = ["contrastive", "supervised"]  # a second stage that keeps one
    stage2 = next(line for line in bench_quality.report(doc).splitlines() if line.startswith("2 "))
    assert stage2.split()[2:4] == ["contrastive,", "supervised"]
    assert "seed 0: 40.00 / 40.00" in text
    sweep = {line.split()[0]: line.split() for line in text.split("LR sweep")[1].splitlines()[3:5]}
    assert sweep["lit-tower"][1:] == ["281", "-", "38.00*", "0.001"]
    assert sweep["lit"][1:] == ["†", "157", "35.00*", "-", "0.0005"]
    assert "† lit: validation zeroshot_top1/templates (its image tower is locked" in text


def test_ablate_names_the_pieces_to_remove_and_refuses_one_the_run_lacks():
    """``--ablate mixed:pseudolabel`` builds only that ablation; ``--ablate mixed`` all of them; an unknown piece
    is an error naming the pieces there are."""
    tree = quality_plan.base_tree("mixed")
    assert quality_plan.parse_ablate("mixed") == ("mixed", ())
    assert quality_plan.parse_ablate("mixed:pseudolabel, labels-as-text") == ("mixed", ("pseudolabel", "labels-as-text"))
    everything = quality_plan.ablation_trees("mixed", tree)
    assert {"mixed-no-pseudolabel", "mixed-no-contrastive", "mixed-no-labels-as-text"} <= set(everything)
    only = quality_plan.ablation_trees("mixed", tree, ("pseudolabel",))
    assert list(only) == ["mixed-no-pseudolabel"]
    assert "pseudolabel" not in only["mixed-no-pseudolabel"][0]["objectives"]
    assert only["mixed-no-pseudolabel"][0]["objectives"].keys() == tree["objectives"].keys() - {"pseudolabel"}
    with pytest.raises(ValueError, match="mae not ablatable in mixed"):
        quality_plan.ablation_trees("mixed", tree, ("mae",))
