"""Unlabelled mixed-task inputs for the merge, and labelled eval splits for the report.

Every row carries its task id and a row id: the task id says which expert it is scored
against, the row id finds that expert's cached outputs (teachers are computed once, by the
module, not by the data pipeline).
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoTokenizer
from typing_extensions import override

from .hub import local_or_snapshot
from .metrics import ANSWER_METRICS, MetricName
from .quiet import follow_trainer
from .sources import (
    DatasetSource,
    Files,
    OpenedDataset,
    as_source,
    check_paths,
    open_dataset,
    peek_columns,  # noqa: F401 (public: the columns of one data file)
    read_paths,
)

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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
    their scale (and TIES its density). Never used by a learned merge, never scored."""
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


class MergeDataModule(L.LightningDataModule):
    """Serves batches that mix tasks at random (about ``batch_size / num_tasks`` rows each)."""

    def __init__(
        self,
        tasks: list[TaskSpec],
        tokenizer: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_length: int = 128,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            tasks: the tasks, each matching an expert of the model by name.
            tokenizer: folder of the tokenizer (the CLI links it to ``model.base``).
            batch_size: rows per optimisation step, all tasks together (paper: 4 x tasks).
            eval_batch_size: rows per evaluation step.
            max_length: inputs are truncated to this many tokens.
            num_workers: DataLoader workers.
            seed: which ``num_samples`` rows are drawn from each task's files.
        """
        super().__init__()
        if not tasks:
            raise ValueError("data.tasks is empty: give at least one task")
        names = [t.name for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"data.tasks: task name {duplicates[0]!r} appears more than once")
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
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.tasks = list(tasks)
        self.tokenizer_path = tokenizer
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        self.seed = seed
        self.tokenizer = None
        self.train_rows: Dataset | None = None
        # labelled files read (not tokenised) in prepare_data, to check their class ids, and
        # reused by setup: every file is read once
        self._labelled_files: dict[tuple[str, str], Dataset] = {}
        self._class_labels: dict[str, list[int]] | None = None
        self.eval_rows: Dataset | None = None
        self.tuning_rows: Dataset | None = None  # labelled validation rows (val_files)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def is_causal_lm(self) -> bool:
        """Inputs are prompts for causal LMs (left-padded, answers appended by the module)."""
        return self.tasks[0].prompt is not None

    @property
    def metrics(self) -> dict[str, MetricName]:
        return {t.name: t.metric for t in self.tasks}

    @override
    def prepare_data(self) -> None:
        follow_trainer(self.trainer)  # a Hub dataset's download bars too
        self.check_sources()

    def check_sources(self) -> None:
        """Every task's files and fields, checked cheaply before any of them is read in full."""
        for task in self.tasks:
            check_files(task.name, task.train_files, task.input_fields, "train_files")
            for source, files in (("eval_files", task.eval_files), ("val_files", task.val_files)):
                if files is not None:
                    if task.label_field is None:
                        raise ValueError(f"task {task.name!r}: {source} given but no label_field")
                    check_files(task.name, files, [*task.input_fields, task.label_field], source)

    def _read_labelled(self, task: TaskSpec, source: str, files: Files) -> Dataset:
        key = (task.name, source)
        if key not in self._labelled_files:
            columns = [*task.input_fields, task.label_field]
            self._labelled_files[key] = read_rows(task.name, files, columns, source)
        return self._labelled_files[key]

    def class_labels(self) -> dict[str, list[int]]:
        """Each classification task's class ids in its eval and val files, read without
        tokenising, so they can be checked against the experts' heads before anything is written."""
        if self._class_labels is not None:  # a datamodule shared by several runs (compare)
            return self._class_labels
        labels: dict[str, list[int]] = {}
        for task in self.tasks:
            if task.prompt is not None or task.label_field is None:
                continue
            labels[task.name] = [
                _as_label(task.name, value)
                for source, files in (("eval_files", task.eval_files), ("val_files", task.val_files))
                if files is not None
                for value in self._read_labelled(task, source, files)[task.label_field]
            ]
        self._class_labels = labels
        return labels

    def setup(self, stage: str) -> None:
        follow_trainer(self.trainer)  # tokenising bars only where the Trainer shows its own
        if self.train_rows is not None:
            return
        if self.tokenizer_path is None:
            raise ValueError("data.tokenizer is not set: give the base model's folder")
        folder = local_or_snapshot(self.tokenizer_path, "data.tokenizer")  # a folder, or a Hub id's snapshot
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        if self.is_causal_lm:
            # answers are appended after the prompt, so pads go first; too long a prompt loses
            # its start, never the "Answer:" it ends with
            self.tokenizer.padding_side = "left"
            self.tokenizer.truncation_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        train_parts, eval_parts, tuning_parts = [], [], []
        for task_id, task in enumerate(self.tasks):
            rows = drop_empty_texts(
                read_rows(task.name, task.train_files, task.input_fields, "train_files"), task, "train_files"
            )
            if len(rows) < task.num_samples:
                log.warning(
                    "task %r: %d rows asked for but the files hold %d; using all of them",
                    task.name,
                    task.num_samples,
                    len(rows),
                )
            rows = rows.shuffle(seed=self.seed).select(range(min(task.num_samples, len(rows))))
            train_parts.append(self._encode(rows, task, task_id, with_labels=False))
            for source, files, cap, parts in (
                ("eval_files", task.eval_files, task.eval_samples, eval_parts),
                ("val_files", task.val_files, task.val_samples, tuning_parts),
            ):
                if files is not None:
                    parts.append(self._labelled_rows(task, task_id, source, files, cap))
        if tuning_parts and len(tuning_parts) != len(self.tasks):
            given = [t.name for t in self.tasks if t.val_files is not None]
            raise ValueError(
                f"data.tasks: {given} have val_files but "
                f"{[t.name for t in self.tasks if t.val_files is None]} "
                "do not; give every task a validation split, or none"
            )
        self.train_rows = _with_row_ids(concatenate_datasets(train_parts))
        self.eval_rows = _with_row_ids(concatenate_datasets(eval_parts)) if eval_parts else None
        self.tuning_rows = _with_row_ids(concatenate_datasets(tuning_parts)) if tuning_parts else None
        self._labelled_files = {}  # tokenised now: the raw rows are not needed again

    def _labelled_rows(self, task: TaskSpec, task_id: int, source: str, files, cap: int | None) -> Dataset:
        if task.label_field is None:
            raise ValueError(f"task {task.name!r}: {source} given but no label_field")
        rows = drop_empty_texts(self._read_labelled(task, source, files), task, source)
        if cap is not None:
            rows = rows.select(range(min(cap, len(rows))))
        return self._encode(rows, task, task_id, with_labels=True)

    def _encode(self, rows: Dataset, task: TaskSpec, task_id: int, with_labels: bool) -> Dataset:
        def encode(batch: dict[str, list]) -> dict[str, Any]:
            if task.prompt is None:
                texts = [[str(x) if x is not None else "" for x in batch[f]] for f in task.text_fields]
            else:
                n = len(batch[task.input_fields[0]])
                texts = [[task.format_prompt({f: batch[f][i] for f in task.input_fields}) for i in range(n)]]
            full = self.tokenizer(*texts, truncation=False)["input_ids"]
            encoded = self.tokenizer(*texts, truncation=True, max_length=self.max_length)
            out = {k: encoded[k] for k in MODEL_INPUTS if k in encoded}
            out["truncated"] = [len(ids) > self.max_length for ids in full]
            out["task_id"] = [task_id] * len(texts[0])
            if with_labels and task.prompt is None:
                out["labels"] = [_as_label(task.name, v) for v in batch[task.label_field]]
            elif with_labels:
                out["reference"] = [_as_reference(task, v) for v in batch[task.label_field]]
            return out

        encoded = rows.map(
            encode, batched=True, remove_columns=rows.column_names, desc=f"tokenising {task.name}"
        )
        truncated = sum(encoded["truncated"])
        if truncated:
            log.warning(
                "task %r: %d of %d %s inputs are longer than max_length=%d tokens and were truncated",
                task.name,
                truncated,
                len(encoded),
                "eval" if with_labels else "merge",
                self.max_length,
            )
        return encoded.remove_columns("truncated")

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad model inputs; carry ``task_id``, ``row_id`` (and ``labels`` or ``references``)."""
        inputs = [{k: r[k] for k in MODEL_INPUTS if k in r} for r in rows]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        for key in ("task_id", "row_id", "labels"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        if "reference" in rows[0]:
            batch["references"] = [r["reference"] for r in rows]
        return batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_rows,
            batch_size=self.batch_size,
            sampler=self._train_sampler(),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def _train_sampler(self) -> EpochShuffle:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(len(self.train_rows), self.seed, replicas, rank)
        if trainer is not None:
            # Resumed mid-epoch: Lightning restores its loop counters but restarts the loader, so
            # skip the rows of that epoch already used; the run then ends exactly as unbroken.
            loop = trainer.fit_loop
            done = loop.epoch_loop.batch_progress.current.processed
            if done:
                sampler.skip_at(loop.epoch_progress.current.completed, done * self.batch_size * replicas)
        return sampler

    def ordered_dataloader(self, rows: Dataset, shortest_first: bool = False) -> DataLoader:
        """All of ``rows`` in order (teacher outputs, whose order is their row order), or
        ``shortest_first`` to score them: a score does not depend on the order of its rows, and
        batches of similar length carry little padding."""
        order = range(len(rows))
        if shortest_first:
            lengths = [len(ids) for ids in rows["input_ids"]]
            order = sorted(order, key=lengths.__getitem__)
        return DataLoader(
            rows,
            batch_size=self.eval_batch_size,
            sampler=order,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.eval_rows is None else self.ordered_dataloader(self.eval_rows, shortest_first=True)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()


class EpochShuffle(DistributedSampler):
    """A fresh permutation per epoch that depends only on ``(seed, epoch)``: the order does not
    hang on whatever else consumed the global RNG (expert fine-tuning, teacher passes), so reruns
    and resumed runs see the same batches. Lightning calls ``set_epoch`` every epoch.

    With several processes, rank ``r`` takes every ``num_replicas``-th row of the one global
    order, so the processes' batches together are exactly the single-process batch of
    ``num_replicas x batch_size`` rows. (A DistributedSampler, so Lightning keeps it as it is.)
    """

    def __init__(self, size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ needs a dataset and a process group: neither is needed here
        self.size = size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.shuffle = True
        self._skip: tuple[int, int] | None = None

    def skip_at(self, epoch: int, rows: int) -> None:
        """Leave out the first ``rows`` of ``epoch``'s global order, once (resuming mid-epoch)."""
        self._skip = (epoch, rows)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self._skip is not None and self._skip[0] == self.epoch:
            order = order[self._skip[1] :]
            self._skip = None
        padding = -len(order) % self.num_replicas  # equal shares, as DistributedSampler does
        order += order[:padding]
        return iter(order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)


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


def _with_row_ids(rows: Dataset) -> Dataset:
    return rows.add_column("row_id", list(range(len(rows))))


def _as_label(task: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"task {task!r}: eval label {value!r} is not an integer class id; "
            "map labels to 0..K-1 in the eval files"
        )
    return value


def _check_prompt(task: TaskSpec) -> None:
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


def _as_reference(task: TaskSpec, value: Any) -> str:
    """The answer an eval row expects: its class's label word, or its own text."""
    if task.label_words is None:
        return "" if value is None else str(value)
    label = _as_label(task.name, value)
    if not 0 <= label < len(task.label_words):
        raise ValueError(
            f"task {task.name!r}: eval label {label} has no label word (label_words has "
            f"{len(task.label_words)}: {task.label_words})"
        )
    return task.label_words[label]


def checked_datamodule(dm: object, tasks: tuple[str, ...]) -> MergeDataModule:
    """``dm`` if it is a MergeDataModule whose task names are exactly ``tasks`` (the experts')."""
    if not isinstance(dm, MergeDataModule):
        raise TypeError(
            "DivMergeModule needs a MergeDataModule (its rows carry task and row ids); "
            f"got {type(dm).__name__}"
        )
    missing = [t for t in tasks if t not in dm.task_names]
    extra = [t for t in dm.task_names if t not in tasks]
    if missing or extra:
        raise ValueError(
            f"tasks and experts differ: experts without a task {missing}, "
            f"tasks without an expert {extra}; model.experts keys must equal data.tasks names"
        )
    return dm
