"""``vlp plot RUN_DIR``: the run's loss curves (and zero-shot accuracy, if evaluated) as one PNG."""
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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    losses = sorted({k for r in records for k in r if k.startswith("loss/")})
    evals = sorted({k for r in records for k in r if k.startswith("zeroshot/top")})
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key in losses:
        pts = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*pts), label=key.split("/", 1)[1])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(Path(run_dir).name)
    if evals:
        ax = axes[0][1]
        for key in evals:
            pts = [(r["step"], 100 * r[key]) for r in records if key in r]
            ax.plot(*zip(*pts), marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "losses.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
