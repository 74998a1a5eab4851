"""``vlp plot RUN_DIR``: the run's loss curves, learning rate and evaluations (if any) as one PNG."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics logged yet")
    by_step: dict[tuple[int, bool], dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_step[(rec["step"], "loss/total" in rec)] = rec  # a resumed run re-logs steps: keep the last
    return [by_step[k] for k in sorted(by_step)]


EVAL_PREFIXES = ("zeroshot/", "knn/", "linear_probe/", "retrieval/")


def plot_figure(records: list[dict], title: str = ""):
    """The figure ``vlp plot`` writes: losses (linear axis, so every loss reads in its own units and a negative or
    zero loss plots), the learning rate, and the evaluations (markers, so one evaluation is a visible point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    losses = sorted({k for r in records for k in r if k.startswith("loss/")})
    evals = sorted({k for r in records for k in r if k.startswith(EVAL_PREFIXES)
                    and isinstance(r[k], float) and 0 <= r[k] <= 1})
    has_lr = any("lr" in r for r in records)
    panels = ["loss"] + (["lr"] if has_lr else []) + (["eval"] if evals else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    axes = dict(zip(panels, axes[0]))
    ax = axes["loss"]
    for key in losses:
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), label=key.split("/", 1)[1], marker="o" if len(pts) == 1 else None)
    ax.set_ylabel("loss")
    ax.set_title(f"{title}: losses" if title else "losses")
    ax.legend(fontsize="small")
    if has_lr:
        ax = axes["lr"]
        pts = [(r["step"], r["lr"]) for r in records if "lr" in r]
        ax.plot(*zip(*pts), color="tab:gray", marker="o" if len(pts) == 1 else None)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.set_title("learning rate")
    if evals:
        ax = axes["eval"]
        for key in evals:
            pts = [(r["step"], 100 * r[key]) for r in records if key in r]
            ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_ylabel("accuracy / recall (%)")
        ax.set_title("evaluation")
        ax.legend(fontsize="small")
    for ax in axes.values():
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = plot_figure(read_metrics(run_dir), Path(run_dir).name)
    out = Path(out) if out else Path(run_dir) / "losses.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
