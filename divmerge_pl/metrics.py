"""Per-task scores (torchmetrics) and the expert / merged / normalised report."""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy


class TaskScores(nn.Module):
    """One accuracy metric per task, each sized to that task's own label set."""

    metric_name = "accuracy"

    def __init__(self, num_classes: list[int], sync_on_compute: bool = True) -> None:
        super().__init__()
        self.metrics = nn.ModuleList(
            MulticlassAccuracy(num_classes=k, average="micro", sync_on_compute=sync_on_compute)
            for k in num_classes
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


def build_report(expert: dict[str, float], merged: dict[str, float], metric: str) -> dict:
    """Per task: expert score, merged score and merged / expert; then the mean of each."""
    tasks = {}
    for task, expert_score in expert.items():
        if task not in merged:
            continue
        merged_score = merged[task]
        normalized = merged_score / expert_score if expert_score > 0 else float("nan")
        tasks[task] = {"expert": expert_score, "merged": merged_score, "normalized": normalized}
    average = {
        key: sum(row[key] for row in tasks.values()) / len(tasks) if tasks else float("nan")
        for key in ("expert", "merged", "normalized")
    }
    return {"metric": metric, "tasks": tasks, "average": average}
