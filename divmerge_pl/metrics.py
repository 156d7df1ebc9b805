"""Per-task scores (torchmetrics) and the expert / merged / normalised report."""

from __future__ import annotations

import re
import string
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from torchmetrics.text.rouge import ROUGEScore

MetricName = Literal["accuracy", "f1", "exact_match", "rouge1", "rougeL"]
ANSWER_METRICS = ("accuracy", "exact_match", "rouge1", "rougeL")
"""Metrics of a causal LM's generated answer against the reference text (or label word)."""


def build_metric(name: MetricName, num_classes: int, sync_on_compute: bool = True) -> Metric:
    """``accuracy`` (micro) or ``f1`` (macro over the task's classes, for unbalanced labels)."""
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_classes, average="micro", sync_on_compute=sync_on_compute)
    if name == "f1":
        return MulticlassF1Score(num_classes=num_classes, average="macro", sync_on_compute=sync_on_compute)
    raise ValueError(f"metric {name!r}: choose accuracy or f1")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and surrounding/repeated spaces dropped: ``" Positive."`` is
    ``"positive"``, so a label word is matched however the model spaces or ends it."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


class AnswerMatch(Metric):
    """Share of generated answers equal to the reference after :func:`normalize_answer`
    (label-word accuracy, or exact match for free generation)."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: list[str], target: list[str]) -> None:
        self.correct += sum(
            normalize_answer(p) == normalize_answer(t) for p, t in zip(preds, target, strict=True)
        )
        self.total += len(target)

    def compute(self) -> Tensor:
        return self.correct / self.total.clamp_min(1.0)


class RougeF1(ROUGEScore):
    """torchmetrics' ROUGE, reduced to the F-measure of one key (``rouge1`` or ``rougeL``)."""

    def __init__(self, key: str, **kwargs: Any) -> None:
        super().__init__(rouge_keys=(key,), **kwargs)
        self.key = key

    def update(self, preds: Any, target: Any) -> None:
        """One reference per answer, however the references come: torchmetrics reads only a
        ``list`` of strings so; any other sequence (a tuple, a ``datasets`` column) it reads as
        lists of references, each string's characters, and the score falls to ~0."""
        super().update(list(preds), list(target))

    def compute(self) -> Tensor:
        return super().compute()[f"{self.key}_fmeasure"]


def build_answer_metric(name: MetricName, sync_on_compute: bool = True) -> Metric:
    if name in ("accuracy", "exact_match"):
        return AnswerMatch(sync_on_compute=sync_on_compute)
    if name in ("rouge1", "rougeL"):
        return RougeF1(name, sync_on_compute=sync_on_compute)
    raise ValueError(f"metric {name!r}: for causal LM tasks choose one of {', '.join(ANSWER_METRICS)}")


class TaskScores(nn.Module):
    """One metric per task: class metrics sized to each task's own label set, or answer metrics
    over generated text (causal LMs)."""

    def __init__(self, metrics: list[Metric], names: list[MetricName]) -> None:
        super().__init__()
        self.names = list(names)
        self.metrics = nn.ModuleList(metrics)
        self.seen = [False] * len(metrics)

    @classmethod
    def for_classes(
        cls, num_classes: list[int], names: list[MetricName] | None = None, sync_on_compute: bool = True
    ) -> TaskScores:
        names = list(names or ["accuracy"] * len(num_classes))
        metrics = [build_metric(n, k, sync_on_compute) for n, k in zip(names, num_classes, strict=True)]
        return cls(metrics, names)

    @classmethod
    def for_answers(cls, names: list[MetricName], sync_on_compute: bool = True) -> TaskScores:
        return cls([build_answer_metric(n, sync_on_compute) for n in names], names)

    def update(self, task_index: int, preds: Tensor | list[str], target: Tensor | list[str]) -> None:
        """``preds``: predicted class ids (or generated answers); ``target``: labels (or references)."""
        self.metrics[task_index].update(preds, target)
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
