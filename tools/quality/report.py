"""The quality bench's report of a results JSON: the headline table at equal FLOPs (mean ± sample std over seeds),
each multi-objective run against the best single-objective one, the sweep, the ablations and equal steps."""
from __future__ import annotations

import statistics

from quality.plan import SELECT_KEY

COLUMNS = [("kNN pooled", "knn_top1/pooled"), ("kNN embed", "knn_top1/embed"),
           ("linear pooled", "linear_top1/pooled"), ("linear embed", "linear_top1/embed"),
           ("zero-shot tmpl", "zeroshot_top1/templates"), ("zero-shot photo", "zeroshot_top1/photo")]


def jobs_in(doc: dict, phase: str, config: str | None = None) -> list[dict]:
    return [j for j in doc["jobs"] if phase in j["phases"] and (config is None or j["config"] == config)]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float], mark: str = " ", width: int = 15) -> str:
    m, s = mean_std([100 * v for v in values])
    text = f"{m:.2f}" + (f" ± {s:.2f}" if s is not None else "")
    return f"{text:>{width - 1}}{mark}"


def name_width(doc: dict) -> int:
    """The run-name column's width: the longest run name, at least 11."""
    return max([11] + [len(r) for r in doc["runs"]])


def results_table(doc: dict, phase: str, title: str) -> list[str]:
    """One row per run: FLOPs, steps, lr, then every test metric (mean ± std over the phase's seeds). A two-stage
    run's row gives both stages: GFLOP/step, steps and lr as ``first+second`` / ``first/second``, TFLOP their sum."""
    w = name_width(doc)
    rows = []
    for run in doc["runs"]:
        jobs = jobs_in(doc, phase, run)
        if not jobs:
            continue
        c = doc["configs"][run]
        cells = [cell([j["eval"]["test"][key] for j in jobs],
                      "*" if key.startswith("zeroshot") and not c["text_trained"] else " ") for _, key in COLUMNS]
        steps = sorted({j["steps"] for j in jobs})
        cut = " (cut short)" if any(j["train"]["cut_short"] or (j.get("init") or {}).get("cut_short")
                                    for j in jobs) else ""
        gf, st, lr = f"{c['gflops_per_step']:.2f}", "/".join(map(str, steps)), f"{jobs[0]['lr']:g}"
        tflops = c["gflops_per_step"] * steps[0] / 1e3
        if c.get("stages") and jobs[0].get("init"):
            first, init = doc["configs"][c["stages"][0]], jobs[0]["init"]
            gf = f"{first['gflops_per_step']:.1f}+{c['gflops_per_step']:.1f}"
            st, lr = f"{init['steps']}+{st}", f"{init['lr']:g}/{lr}"
            tflops += first["gflops_per_step"] * init["steps"] / 1e3
        rows.append((run, gf, st, f"{tflops:.1f}", lr, len(jobs), cells, cut))
    ws, wl = max([6] + [len(r[2]) for r in rows]), max([7] + [len(r[4]) for r in rows])
    head = f"{'run':<{w}} {'GFLOP/step':>10} {'steps':>{ws}} {'TFLOP':>7} {'lr':>{wl}} {'seeds':>5}  " + \
        "  ".join(f"{c:>15}" for c, _ in COLUMNS)
    lines = [title, head, "-" * len(head)]
    for run, gf, st, tf, lr, n, cells, cut in rows:
        lines.append(f"{run:<{w}} {gf:>10} {st:>{ws}} {tf:>7} {lr:>{wl}} {n:>5}  " + "  ".join(cells) + cut)
    return lines


def stages_table(doc: dict) -> list[str]:
    """Each two-stage run's stages: config, objectives, GFLOP/step, steps, TFLOP, share of the run's FLOPs, lr (how
    chosen), and per seed the first stage's test kNN (pooled) beside the final model's (equal when the second stage
    locks the image tower)."""
    lines = []
    for run in doc["runs"]:
        c = doc["configs"][run]
        jobs = jobs_in(doc, "seed", run)
        if not c.get("stages") or not jobs or not jobs[0].get("init"):
            continue
        first, init = c["stages"][0], jobs[0]["init"]
        f = doc["configs"][first]
        head = f"{'stage':<8} {'config':<16} {'objectives':<24} {'GFLOP/step':>10} {'steps':>6} {'TFLOP':>7} " \
               f"{'share':>6} {'lr':>8}  lr chosen by"
        if not lines:
            lines.append("Two-stage runs: each stage's training FLOPs (the two sum to the budget), steps and lr")
        lines += [f"{run}: first stage {first}, then {run} from its run folder; first-stage share "
                  f"{c['first_stage_share']:.4g}: {c.get('first_stage_share_how', '')}", head, "-" * len(head)]
        total = f["gflops_per_step"] * init["steps"] + c["gflops_per_step"] * jobs[0]["steps"]
        lr_how = {first: (doc["lr"].get(first) or {}).get("how", "-"), run: (doc["lr"].get(run) or {}).get("how", "-")}
        select = {first: "val kNN pooled", run: f"val {c.get('select', SELECT_KEY)}"}
        for i, (name, cfg, steps, lr) in enumerate(((first, f, init["steps"], init["lr"]),
                                                    (run, c, jobs[0]["steps"], jobs[0]["lr"]))):
            g = cfg["gflops_per_step"]
            objectives = ", ".join(doc["configs"][name]["objectives"] if i == 0 else c.get(
                "second_stage_objectives", [o for o in c["objectives"] if o not in f["objectives"]]))  # older JSONs
            how = f"{lr_how[name]} ({select[name]})" if lr_how[name] == "sweep" else lr_how[name]
            lines.append(f"{i + 1:<8} {name:<16} {objectives:<24} {g:>10.2f} {steps:>6} {g * steps / 1e3:>7.2f} "
                         f"{g * steps / total:>6.3f} {lr:>8g}  {how}")
        def first_knn(j):  # the first stage's record (the seed's job, or the sweep run it reused)
            i = j["init"]
            return next((100 * r["eval"]["test"][SELECT_KEY] for r in doc["jobs"] if (r["config"], r["seed"], r["lr"],
                         r["steps"]) == (i["config"], i["seed"], i["lr"], i["steps"])), None)

        knn = [(j["seed"], 100 * j["eval"]["test"][SELECT_KEY], first_knn(j)) for j in jobs]
        lines.append("test kNN pooled, first stage / final, per seed: " + ", ".join(
            f"seed {s}: {'-' if a is None else f'{a:.2f}'} / {b:.2f}" for s, b, a in knn))
        lines.append("")
    return lines[:-1] if lines else []


def sweep_table(doc: dict) -> list[str]:
    """The validation metric of every swept lr per run (a two-stage run: its first stage's row, then its own; the
    second stage of a locked tower selects on validation zero-shot, marked)."""
    jobs = jobs_in(doc, "sweep")
    if not jobs:
        return []
    lrs = sorted({j["lr"] for j in jobs})
    order = []
    for run in doc["runs"]:
        order += doc["configs"][run].get("stages") or [run]
    w = max([name_width(doc)] + [len(r) + 2 for r in order])
    head = f"{'run':<{w}} {'steps':>6}  " + "  ".join(f"{f'lr {lr:g}':>10}" for lr in lrs) + "   chosen"
    lines = [f"LR sweep: validation kNN top-1 % (pooled; {doc['val']['n']} images of the unlabeled pool, "
             f"never the test set), seed {doc['seeds'][0]}", head, "-" * len(head)]
    notes = []
    for run in dict.fromkeys(order):
        mine = {j["lr"]: j for j in jobs if j["config"] == run}
        if not mine:
            continue
        key = doc["configs"][run].get("select", SELECT_KEY)
        name = run + (" †" if key != SELECT_KEY else "")
        if key != SELECT_KEY:
            init = next(iter(mine.values())).get("init") or {}
            notes.append(f"† {run}: validation {key} (its image tower is locked: kNN pooled is its first stage's), "
                         f"from {init.get('name', 'its first stage')}" + (f" (lr {init['lr']:g})" if init else ""))
        best = (doc["lr"].get(run) or {}).get("lr")  # None: a partial bench, not chosen yet
        cells = [f"{100 * mine[lr]['eval']['val'][key]:>9.2f}{'*' if lr == best else ' '}" if lr in mine
                 else f"{'-':>10}" for lr in lrs]
        steps = next(iter(mine.values()))["steps"]
        lines.append(f"{name:<{w}} {steps:>6}  " + "  ".join(cells) + (f"   {best:g}" if best else "   -"))
    return lines + notes


def ablation_table(doc: dict) -> list[str]:
    jobs = jobs_in(doc, "ablation")
    if not jobs:
        return []
    run = doc["configs"][jobs[0]["config"]]["run"]
    seed = jobs[0]["seed"]
    full = next((j for j in jobs_in(doc, "seed", run) if j["seed"] == seed), None)
    if full is None:
        return [f"ablations of {run}: no full run at seed {seed}"]
    head = f"{'config':<26} {'change':<34} {'GFLOP/step':>10} {'steps':>6} {'kNN pooled':>10} {'delta':>7} " \
           f"{'zero-shot':>10} {'delta':>7}"
    lines = [f"Ablations of {run} (seed {seed}, lr {full['lr']:g}, equal FLOPs to {doc['reference']}; test top-1 %, "
             f"kNN pooled and zero-shot templates)", head, "-" * len(head)]
    f = full["eval"]["test"]
    zs = "zeroshot_top1/templates"
    lines.append(f"{run:<26} {'(full)':<34} {doc['configs'][run]['gflops_per_step']:>10.2f} {full['steps']:>6} "
                 f"{100 * f[SELECT_KEY]:>10.2f} {'':>7} {100 * f[zs]:>10.2f}")
    for j in jobs:
        c, e = doc["configs"][j["config"]], j["eval"]["test"]
        meaningful = c["text_trained"] and doc["configs"][run]["text_trained"]
        dz = f"{100 * (e[zs] - f[zs]):>+7.2f}" if meaningful else f"{'n/a':>7}"
        cut = " (cut short)" if j["train"]["cut_short"] else ""
        lines.append(f"{j['config']:<26} {c['change']:<34} {c['gflops_per_step']:>10.2f} {j['steps']:>6} "
                     f"{100 * e[SELECT_KEY]:>10.2f} {100 * (e[SELECT_KEY] - f[SELECT_KEY]):>+7.2f} "
                     f"{100 * e[zs]:>9.2f}{' ' if c['text_trained'] else '*'} {dz}{cut}")
    return lines


def versus_single_lines(doc: dict) -> list[str]:
    """For every multi-objective run: its mean minus the best single-objective run's mean on kNN / zero-shot."""
    means = {r: {k: statistics.fmean(j["eval"]["test"][k] for j in jobs_in(doc, "seed", r)) for _, k in COLUMNS}
             for r in doc["runs"] if jobs_in(doc, "seed", r)}
    singles = [r for r in means if len(doc["configs"][r]["objectives"]) == 1]
    lines = []
    for run in means:
        if len(doc["configs"][run]["objectives"]) < 2:
            continue
        for label, key, text_only in (("kNN", SELECT_KEY, False), ("zero-shot", "zeroshot_top1/templates", True)):
            if text_only and not doc["configs"][run]["text_trained"]:
                continue
            pool = [r for r in singles if not text_only or doc["configs"][r]["text_trained"]]
            if pool:
                best = max(pool, key=lambda r: means[r][key])
                lines.append(f"{run} − best single-objective run ({best}) on {label}: "
                             f"{100 * (means[run][key] - means[best][key]):+.1f} points")
    return lines


def report(doc: dict) -> str:
    n = len(doc["seeds"])
    parts = [results_table(doc, "seed", f"Equal training FLOPs (reference {doc['reference']} at "
                                        f"{doc['reference_steps']} steps, batch {doc['batch_size']}); test top-1 %, "
                                        f"mean ± sample std over {n} seed{'s' if n > 1 else ''} ({doc['seeds']})")]
    parts[0] += ["* text tower never trained: zero-shot is meaningless (chance 10%). GFLOP/step: vlp.flops "
                 "(FlopCounterMode: forward + teacher + backward + hooks); TFLOP: total training FLOPs."]
    parts[0] += versus_single_lines(doc)
    for extra in (stages_table(doc), sweep_table(doc), ablation_table(doc),
                  results_table(doc, "equal-steps", f"Equal steps ({doc['reference_steps']} each, seed "
                                                    f"{doc['seeds'][0]}); test top-1 %")):
        if len(extra) > 3 or len(extra) == 1:  # a table with rows, or a one-line note
            parts.append(extra)
    taken = [j for j in doc["jobs"] if j.get("reused_from")]
    if taken:
        sources = sorted({j["reused_from"] for j in taken})
        parts.append([f"{len(taken)} of {len(doc['jobs'])} trainings taken over (--reuse) from {'; '.join(sources)}: "
                      + ", ".join(j["name"] for j in taken)])
    return "\n\n".join("\n".join(p) for p in parts)
