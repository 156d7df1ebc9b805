"""Per-task scores (torchmetrics) and the expert / merged / normalised report."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

MetricName = Literal["accuracy", "f1"]


def build_metric(name: MetricName, num_classes: int, sync_on_compute: bool = True) -> Metric:
    """``accuracy`` (micro) or ``f1`` (macro over the task's classes, for unbalanced labels)."""
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=sync_on_compute)
    if name == "f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro", sync_on_compute=sync_on_compute)
    raise ValueError(f"metric {name!r}: choose accuracy or f1")


class TaskScores(nn.Module):
    """One metric per task, each sized to that task's own label set."""

    def __init__(
        self, num_classes: list[int], metrics: list[MetricName] | None = None, sync_on_compute: bool = True
    ) -> None:
        super().__init__()
        self.names = list(metrics or ["accuracy"] * len(num_classes))
        self.metrics = nn.ModuleList(
            build_metric(name, k, sync_on_compute) for name, k in zip(self.names, num_classes, strict=True)
        )
        self.seen = [False] * len(num_classes)

    def update(self, task_index: int, scores: Tensor, labels: Tensor) -> None:
        """``scores``: logits or log-probabilities of shape [rows, classes of this task]."""
        self.metrics[task_index].update(scores.argmax(-1), labels)
        self.seen[task_index] = True

    def compute(self) -> dict[int, float]:
        return {i: float(m.compute()) for i, m in enumerate(self.metrics) if self.seen[i]}

    def reset(self) -> None:
        for metric in self.metrics:
            metric.reset()
        self.seen = [False] * len(self.metrics)


def build_report(
    expert: dict[str, float], merged: dict[str, float], metrics: dict[str, str], method: str | None = None
) -> dict:
    """Per task: expert score, merged score and merged / expert; then the mean of each.

    ``metric`` is the tasks' common metric name, or ``mixed`` (each task row names its own)."""
    tasks = {}
    for task, expert_score in expert.items():
        if task not in merged:
            continue
        merged_score = merged[task]
        normalized = merged_score / expert_score if expert_score > 0 else float("nan")
        tasks[task] = {
            "expert": expert_score,
            "merged": merged_score,
            "normalized": normalized,
            "metric": metrics[task],
        }
    average = {
        key: sum(row[key] for row in tasks.values()) / len(tasks) if tasks else float("nan")
        for key in ("expert", "merged", "normalized")
    }
    names = {metrics[t] for t in tasks} or {"accuracy"}
    report = {"metric": names.pop() if len(names) == 1 else "mixed", "tasks": tasks, "average": average}
    if method is not None:
        report["method"] = method
    return report
