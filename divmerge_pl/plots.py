"""PNG figures of a merge: coefficients, divergence curves, method comparisons.

matplotlib's Agg backend draws without a screen (clusters, CI); every function writes one file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def coefficient_heatmap(table: Mapping, path: Path) -> Path:
    """Tasks x groups heatmap of ``coefficients.json``'s ``values``: where each expert is kept."""
    values, tasks, groups = table["values"], table["tasks"], table["groups"]
    width = min(max(6.0, 0.12 * len(groups) + 3), 24.0)
    fig, ax = plt.subplots(figsize=(width, 1.0 + 0.5 * len(tasks)))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel(f"{len(groups)} coefficient group(s) ({table['granularity']})")
    if len(groups) <= 24:
        ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    fig.colorbar(image, ax=ax, label="coefficient")
    ax.set_title(f"DivMerge coefficients ({table['objective']})")
    return _save(fig, path)


def divergence_curves(history: Mapping[str, Sequence[tuple[int, float]]], objective: str, path: Path) -> Path:
    """Per-task divergence (or entropy) against the optimisation step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, points in history.items():
        if points:
            steps, values = zip(*points, strict=True)
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            # a few rows per task per batch make each point noisy: show a running mean too
            window = max(1, len(values) // 20)
            smooth = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            ax.plot(
                steps,
                smooth,
                color=line.get_color(),
                label=task if window == 1 else f"{task} (mean of {window} steps)",
            )
    ax.set_xlabel("step")
    ax.set_ylabel(f"{objective} to the expert" if objective != "entropy" else "entropy")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def comparison_bars(results: Mapping[str, Mapping], path: Path) -> Path:
    """Normalised score per task (groups of bars) and method (colours), plus the average."""
    methods = list(results)
    tasks = list(next(iter(results.values()))["tasks"]) + ["average"]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(tasks) * max(1, len(methods)) / 3), 4.5))
    width = 0.8 / max(1, len(methods))
    for m, method in enumerate(methods):
        report = results[method]
        scores = [report["tasks"][t]["normalized"] for t in tasks[:-1]] + [report["average"]["normalized"]]
        ax.bar([i + m * width - 0.4 + width / 2 for i in range(len(tasks))], scores, width, label=method)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("normalised score (merged / expert)")
    ax.legend(fontsize=7, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
