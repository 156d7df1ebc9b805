"""A task of the merge: its description (name, sources, fields, prompt, metric), checked before
anything is read, and its rows read and checked with the task and source named in every error.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset

from .metrics import ANSWER_METRICS, MetricName
from .sources import DatasetSource, Files, OpenedDataset, as_source, check_paths, open_dataset, read_paths

log = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """One task: its name (a key of ``model.experts``), its files and which fields to read."""

    name: str
    # a dataset is a plain mapping here, not DatasetSource: with a class in the union, jsonargparse
    # reads a string naming an existing file as that file's contents
    train_files: str | list[str] | dict[str, str | None]
    """Inputs for the merge: files (csv, tsv, json, jsonl, parquet, txt), a ``save_to_disk``
    folder, or a dataset ``{path, name, split}`` (see ``sources.py``); any label is ignored."""
    eval_files: str | list[str] | dict[str, str | None] | None = None
    """Labelled rows for the report, taken as ``train_files`` are; without them the task gets no score."""
    val_files: str | list[str] | dict[str, str | None] | None = None
    """Labelled validation rows, apart from ``eval_files``: where training-free methods choose
    their scale (and TIES its density), and what validation epochs score (``val/`` metrics, on
    which ``BestOnValidation`` may choose an epoch). Never in the objective, never in the report."""
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    """One field, or two for pairs (premise / hypothesis)."""
    label_field: str | None = "label"
    """Integer class ids, read from ``eval_files`` only (never used by the loss)."""
    num_samples: int = 200
    """Unlabelled inputs used for the merge (the paper uses 200-400 per task)."""
    eval_samples: int | None = None
    """Cap on eval rows (None: all)."""
    val_samples: int | None = None
    """Cap on validation rows (None: all)."""
    metric: MetricName = "accuracy"
    """Score of the report: ``accuracy`` or ``f1`` (macro); for causal LMs ``accuracy`` (label
    word), ``exact_match``, ``rouge1`` or ``rougeL`` of the generated answer."""
    prompt: str | None = None
    """Causal LM experts: the input as a template over the row's fields, such as
    ``"{sentence}\\nAnswer:"`` (then ``text_fields`` is not used)."""
    label_words: list[str] | None = None
    """Causal LM classification: the answer of class ``i`` is ``label_words[i]`` (labels in the eval
    files are class ids). Without it, ``label_field`` holds the reference answer text."""

    @property
    def input_fields(self) -> list[str]:
        """The fields an input is made of: the prompt's placeholders, or ``text_fields``."""
        if self.prompt is None:
            return list(self.text_fields)
        try:
            return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(self.prompt) if f))
        except ValueError as err:
            raise self._bad_template(err) from None

    def _bad_template(self, err: Exception) -> ValueError:
        return ValueError(
            f"task {self.name!r}: prompt {self.prompt!r} is not a valid template ({err}); "
            "write fields as {name} and literal braces as {{ }}"
        )

    def format_prompt(self, row: dict[str, Any]) -> str:
        try:
            return self.prompt.format(**{f: "" if row[f] is None else row[f] for f in self.input_fields})
        except (IndexError, ValueError, AttributeError) as err:
            raise self._bad_template(err) from None


def check_tasks(tasks: list[TaskSpec]) -> None:
    """Every task's settings, and that they fit together, before any file is opened."""
    if not tasks:
        raise ValueError("data.tasks is empty: give at least one task")
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"data.tasks: task name {repeated[0]!r} appears more than once")
    for task in tasks:
        if task.num_samples <= 0:
            raise ValueError(
                f"task {task.name!r}: num_samples must be a positive integer, got {task.num_samples}"
            )
        if task.prompt is None and not 1 <= len(task.text_fields) <= 2:
            raise ValueError(
                f"task {task.name!r}: text_fields takes one or two fields, got {task.text_fields}"
            )
        _check_prompt(task)
    prompted = [t.name for t in tasks if t.prompt is not None]
    if prompted and len(prompted) != len(tasks):
        raise ValueError(
            f"data.tasks: {prompted} have a prompt (causal LM experts) but "
            f"{[t.name for t in tasks if t.prompt is None]} do not; give every task a prompt, or none"
        )


def read_rows(task: str, files: Files, columns: list[str], source: str = "data files") -> Dataset:
    """Read a task's rows with ``datasets`` after ``check_files``; the error names the task, the
    source and the column."""
    found = check_files(task, files, columns, source)
    if isinstance(found, OpenedDataset):
        rows, where = found.read(task, source), found.spec.describe()
    else:
        rows, where = read_paths(task, found), str([str(p) for p in found])
    for column in columns:
        if column not in rows.column_names:
            raise ValueError(
                f"task {task!r}: field {column!r} not found in {where} ({source}); "
                f"columns there: {rows.column_names}"
            )
    if len(rows) == 0:
        raise ValueError(f"task {task!r}: {where} ({source}) hold no rows")
    return rows


def check_files(task: str, files: Files, columns: list[str], source: str) -> list[Path] | OpenedDataset:
    """Existence, format and fields of one task's files or dataset, from their first row or
    metadata: a mistake in the last task's inputs fails before the first task's are tokenised."""
    found = as_source(task, files, source)
    if isinstance(found, DatasetSource):
        opened = open_dataset(task, found, source)
        seen = [(found.describe(), opened.columns)]
    else:
        opened = found
        seen = [(repr(str(p)), c) for p, c in zip(found, check_paths(task, found, source), strict=True)]
    for where, present in seen:
        missing = [c for c in columns if present is not None and c not in present]
        if missing:
            raise ValueError(
                f"task {task!r}: field {missing[0]!r} not found in {where} ({source}); "
                f"columns there: {present}"
            )
    return opened


def drop_empty_texts(rows: Dataset, task: TaskSpec, source: str) -> Dataset:
    """Rows whose text fields are all empty carry nothing to match: skip them, say how many."""

    def has_text(row: dict[str, Any]) -> bool:
        return any(row[f] is not None and str(row[f]).strip() for f in task.input_fields)

    kept = rows.filter(has_text, desc=f"checking {task.name}")
    if len(kept) < len(rows):
        log.warning(
            "task %r: %d row(s) of %s have empty text and are skipped",
            task.name,
            len(rows) - len(kept),
            source,
        )
    if len(kept) == 0:
        raise ValueError(f"task {task.name!r}: every row of {source} has empty {task.input_fields}")
    return kept


def as_label(task: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"task {task!r}: eval label {value!r} is not an integer class id; "
            "map labels to 0..K-1 in the eval files"
        )
    return value


def _check_prompt(task: TaskSpec) -> None:
    """The prompt, label words and metric go together: a causal LM task has all three."""
    if task.prompt is None:
        if task.label_words is not None:
            raise ValueError(f"task {task.name!r}: label_words is for causal LM tasks; give a prompt too")
        if task.metric not in ("accuracy", "f1"):
            raise ValueError(
                f"task {task.name!r}: metric {task.metric!r} scores generated text; classification "
                "experts take accuracy or f1"
            )
        return
    task.format_prompt(dict.fromkeys(task.input_fields, ""))  # a broken template fails now
    if not task.input_fields:
        raise ValueError(f"task {task.name!r}: prompt {task.prompt!r} names no field, such as {{text}}")
    if task.metric not in ANSWER_METRICS:
        raise ValueError(
            f"task {task.name!r}: metric {task.metric!r} is not for generated answers; choose one of "
            f"{', '.join(ANSWER_METRICS)}"
        )
    if task.label_words is not None and len(set(task.label_words)) != len(task.label_words):
        raise ValueError(f"task {task.name!r}: label_words {task.label_words} repeat a word")


def as_reference(task: TaskSpec, value: Any) -> str:
    """The answer an eval row expects: its class's label word, or its own text."""
    if task.label_words is None:
        return "" if value is None else str(value)
    label = as_label(task.name, value)
    if not 0 <= label < len(task.label_words):
        raise ValueError(
            f"task {task.name!r}: eval label {label} has no label word (label_words has "
            f"{len(task.label_words)}: {task.label_words})"
        )
    return task.label_words[label]
