"""The quality curve across budgets (``tools/bench_quality.py --steps 250,1000,2500``): per budget, every
multi-objective run's gap to the best single-objective run on kNN and zero-shot, and ``gap_vs_budget.png`` (kNN and
zero-shot of every run against its training TFLOP, mean ± sample std over seeds).

Input: bench_quality results JSONs, one per budget (layout in ``quality.run.results_doc``).
"""
from __future__ import annotations

import statistics
from pathlib import Path

KNN, ZEROSHOT = "knn_top1/pooled", "zeroshot_top1/templates"
METRICS = (("kNN", KNN, False), ("zero-shot", ZEROSHOT, True))  # (label, key, needs a trained text tower)


def run_points(doc: dict) -> dict[str, dict]:
    """``{run: {tflops, seeds, KEY: [per-seed values]}}`` over the headline (``seed`` phase) jobs of one budget."""
    out: dict[str, dict] = {}
    for job in doc["jobs"]:
        if "seed" not in job["phases"]:
            continue
        point = out.setdefault(job["config"], {"tflops": [], "seeds": []})
        point["tflops"].append(job["total_tflops"])
        point["seeds"].append(job["seed"])
        for _, key, _ in METRICS:
            point.setdefault(key, []).append(job["eval"]["test"][key])
    return out


def gaps(docs: list[dict]) -> list[dict]:
    """One row per (budget, multi-objective run): its mean minus the best single-objective run's, in points."""
    rows = []
    for doc in sorted(docs, key=lambda d: d["reference_steps"]):
        points, configs = run_points(doc), doc["configs"]
        singles = [r for r in points if len(configs[r]["objectives"]) == 1]
        for run in points:
            if len(configs[run]["objectives"]) < 2:
                continue
            row = {"steps": doc["reference_steps"], "tflops": round(statistics.fmean(points[run]["tflops"]), 2),
                   "run": run, "seeds": len(points[run]["seeds"])}
            for label, key, text_only in METRICS:
                pool = [r for r in singles if not text_only or configs[r]["text_trained"]]
                if not pool or (text_only and not configs[run]["text_trained"]):
                    continue
                mean = {r: statistics.fmean(points[r][key]) for r in pool + [run]}
                best = max(pool, key=mean.get)
                row[label] = {"value": round(100 * mean[run], 2), "best_single": best,
                              "best_single_value": round(100 * mean[best], 2),
                              "best_single_seeds": len(points[best]["seeds"]),
                              "gap": round(100 * (mean[run] - mean[best]), 2)}
            rows.append(row)
    return rows


def gap_table(docs: list[dict]) -> list[str]:
    head = (f"{'steps':>6} {'TFLOP':>7} {'run':<22} {'seeds':>5}  {'kNN':>6} {'best single':>22} {'gap':>6}  "
            f"{'zero-shot':>9} {'best single':>22} {'gap':>6}")
    lines = ["Gap per budget: multi-objective run minus the best single-objective run at the same training FLOPs "
             "(test top-1 %, mean over seeds)", head, "-" * len(head)]
    for row in gaps(docs):
        cells = []
        for label, _, _ in METRICS:
            m = row.get(label)
            width = 9 if label == "zero-shot" else 6
            cells.append(f"{m['value']:>{width}.2f} {m['best_single'] + ' ' + format(m['best_single_value'], '.2f'):>22}"
                         f" {m['gap']:>+6.2f}" if m else f"{'n/a':>{width}} {'':>22} {'':>6}")
        lines.append(f"{row['steps']:>6} {row['tflops']:>7.1f} {row['run']:<22} {row['seeds']:>5}  " + "  ".join(cells))
    return lines


def curve_report(docs: list[dict], report) -> str:
    """Each budget's own report (``report(doc)``, bench_quality's), then the gap per budget."""
    parts = [f"=== budget: {d['reference_steps']} reference steps ({d['reference']}) ===\n{report(d)}"
             for d in sorted(docs, key=lambda d: d["reference_steps"])]
    return "\n\n".join(parts + ["\n".join(gap_table(docs))])


def plot_gap(docs: list[dict], png: Path) -> Path:
    """kNN and zero-shot of every run against training TFLOP, one line per run across the budgets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    series: dict[str, list] = {}
    budgets = []  # each budget's TFLOP (its runs' mean): the x ticks
    for doc in sorted(docs, key=lambda d: d["reference_steps"]):
        points = run_points(doc)
        for run, point in points.items():
            series.setdefault(run, []).append((doc, point))
        budgets.append(statistics.fmean(statistics.fmean(p["tflops"]) for p in points.values()))
    for ax, (label, key, text_only) in zip(axes, METRICS):
        for run, items in sorted(series.items()):
            if text_only and not items[0][0]["configs"][run]["text_trained"]:
                continue  # zero-shot of a run whose text tower never trained is meaningless
            x = [statistics.fmean(p["tflops"]) for _, p in items]
            y = [100 * statistics.fmean(p[key]) for _, p in items]
            err = [100 * statistics.stdev(p[key]) if len(p[key]) > 1 else 0.0 for _, p in items]
            multi = len(items[0][0]["configs"][run]["objectives"]) > 1
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=run, linewidth=2.2 if multi else 1.2,
                        linestyle="-" if multi else "--")
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{t:.3g}" for t in budgets])
        ax.xaxis.set_minor_formatter(NullFormatter())  # the log axis' own minor labels crowd the budgets'
        ax.set_xlabel("training TFLOP (forward + teacher + backward)")
        ax.set_ylabel(f"test {label} top-1 %")
        ax.set_title(f"{label} (CIFAR-10, 5,000 held-out images)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    steps = ", ".join(str(d["reference_steps"]) for d in sorted(docs, key=lambda d: d["reference_steps"]))
    fig.suptitle(f"vlp bench_quality at equal training FLOPs; budgets {steps} reference steps (mean ± std over seeds)",
                 fontsize=10)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
