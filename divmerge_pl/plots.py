"""Figures of a merge: coefficients, divergence curves, method comparisons.

matplotlib's Agg backend draws without a screen (clusters, CI). ``*_figure`` functions return
the figure (for the loggers, see run_outputs.py); the others write one PNG file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.figure import Figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BLOCK_WORDS = ("layer", "layers", "h", "block", "blocks")
BLOCK = re.compile(r"^(?:.*\.)?(?:layers?|h|blocks?)\.(\d+)(\.|$)")
MAX_LABELS_PER_INCH = 6  # 6-point labels, rotated: readable without overlapping


def short_group_names(groups: Sequence[str]) -> list[str]:
    """Axis labels for coefficient groups: the prefix all groups share dropped, a transformer
    block as ``L<n>`` (``bert.encoder.layer.3.output.dense.weight`` -> ``L3.output.dense``)."""
    if len(groups) > 1:
        parts = [g.split(".") for g in groups]
        shared = 0
        while parts[0][shared] not in BLOCK_WORDS and all(
            len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts
        ):  # the block word stays: it becomes the L<n> label
            shared += 1
        groups = [".".join(p[shared:]) for p in parts]
    return [BLOCK.sub(r"L\1\2", g).removesuffix(".weight") for g in groups]


def label_every(num_groups: int, width_inches: float) -> int:
    """Label every n-th group, so that at most ``MAX_LABELS_PER_INCH`` labels share an inch."""
    return max(1, math.ceil(num_groups / max(1, int(width_inches * MAX_LABELS_PER_INCH))))


def coefficient_figure(table: Mapping) -> Figure:
    """Tasks x groups heatmap of ``coefficients.json``'s ``values``: where each expert is kept.
    Groups are named on the x axis (every n-th one when there are too many to read)."""
    values, tasks, groups = table["values"], table["tasks"], table["groups"]
    names = short_group_names(groups)
    width = min(max(6.0, len(groups) / MAX_LABELS_PER_INCH + 3), 24.0)  # up to 24 inches
    step = label_every(len(groups), width - 2.5)  # the colour bar and task names take the rest
    label_height = 0.07 * max(len(n) for n in names)  # rotated labels hang below the heatmap
    fig, ax = plt.subplots(figsize=(width, 1.2 + 0.5 * len(tasks) + label_height))
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(tasks)), tasks)
    shown = range(0, len(groups), step)
    ax.set_xticks(list(shown), [names[i] for i in shown], rotation=90, fontsize=6)
    every = "" if step == 1 else f", 1 in {step} named"
    ax.set_xlabel(f"{len(groups)} coefficient group(s) ({table['granularity']}{every})")
    fig.colorbar(image, ax=ax, label="coefficient")
    ax.set_title(f"DivMerge coefficients ({table['objective']})")
    fig.tight_layout()
    return fig


def coefficient_heatmap(table: Mapping, path: Path) -> Path:
    """``coefficient_figure`` written to ``path``."""
    return _save(coefficient_figure(table), path)


def divergence_curves(history: Mapping[str, Sequence[tuple[int, float]]], objective: str, path: Path) -> Path:
    """``divergence_figure`` written to ``path``."""
    return _save(divergence_figure(history, objective), path)


def divergence_figure(history: Mapping[str, Sequence[tuple[int, float]]], objective: str) -> Figure:
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
    fig.tight_layout()
    return fig


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


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and keep it open (loggers take it next); ``close_figure`` after."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def close_figure(fig: Figure) -> None:
    plt.close(fig)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    save_figure(fig, path)
    close_figure(fig)
    return path
