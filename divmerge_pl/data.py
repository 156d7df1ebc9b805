"""Unlabelled mixed-task inputs for the merge, and labelled eval splits for the report.

Every row carries its task id and a row id: the task id says which expert it is scored
against, the row id finds that expert's cached outputs (teachers are computed once, by the
module, not by the data pipeline). A batch also carries a ``BatchIndex``: where each task's rows
are, known on the host, so the training step never reads the device to find them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from datasets import Dataset, concatenate_datasets
from torch.utils.data import DataLoader
from transformers import AutoTokenizer
from typing_extensions import override

from .hub import local_or_snapshot
from .metrics import MetricName
from .quiet import follow_trainer
from .sampling import EpochShuffle, ResumableLoader
from .sources import Files
from .tasks import TaskSpec, as_label, as_reference, check_files, check_tasks, drop_empty_texts, read_rows

log = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class BatchIndex:
    """Where each task's rows sit in a batch, built on the CPU by the collate.

    Finding them on the device (``unique``, boolean masks) would stall the host on every step.
    Lightning moves ``rows`` with the batch (asynchronously, as a dataclass field) and leaves the
    ints on the host; picking rows by index tensor, unlike by boolean mask, needs no host sync.
    """

    task_ids: tuple[int, ...]  # the datamodule's task ids present, ascending
    rows: tuple[torch.Tensor, ...]  # each of those tasks' positions in the batch, ascending (long)
    row_ids: tuple[int, ...]  # every row's ``row_id``, in batch order

    @classmethod
    def of(cls, task_ids: Sequence[int], row_ids: Sequence[int]) -> BatchIndex:
        """The index of a batch whose rows have these task and row ids (Python ints)."""
        present = sorted(set(task_ids))
        rows = tuple(
            torch.tensor([i for i, t in enumerate(task_ids) if t == task], dtype=torch.long)
            for task in present
        )
        return cls(tuple(present), rows, tuple(row_ids))


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
        check_tasks(tasks)
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
                as_label(task.name, value)
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
                out["labels"] = [as_label(task.name, v) for v in batch[task.label_field]]
            elif with_labels:
                out["reference"] = [as_reference(task, v) for v in batch[task.label_field]]
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

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Pad model inputs; carry ``task_id``, ``row_id`` (and ``labels`` or ``references``) and
        their ``BatchIndex`` (``index``)."""
        inputs = [{k: r[k] for k in MODEL_INPUTS if k in r} for r in rows]
        batch = dict(self.tokenizer.pad(inputs, return_tensors="pt"))
        for key in ("task_id", "row_id", "labels"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        if "reference" in rows[0]:
            batch["references"] = [r["reference"] for r in rows]
        batch["index"] = BatchIndex.of([r["task_id"] for r in rows], [r["row_id"] for r in rows])
        return batch

    def train_dataloader(self) -> ResumableLoader:
        """The merge's rows in an order fixed by ``(seed, epoch)``, this process's share of it under
        DDP; Lightning checkpoints the loader's place in the epoch and restores it on resume."""
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableLoader(
            self.train_rows,
            batch_size=self.batch_size,
            sampler=EpochShuffle(self.train_rows, self.seed, replicas, rank),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            steps_done=None if trainer is None else lambda: trainer.global_step,
        )

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

    @property
    def validation_split(self) -> Literal["tuning", "eval"]:
        """What a validation epoch scores: the labelled validation rows (``val_files``) when the
        tasks have them, so that a choice made on ``val/`` metrics (early stopping, the best
        epoch) never sees the scored rows; else the scored rows, as ``test``."""
        return "tuning" if self.tuning_rows is not None else "eval"

    def _scoring_dataloader(self, rows: Dataset | None) -> DataLoader | list:
        return [] if rows is None else self.ordered_dataloader(rows, shortest_first=True)

    def val_dataloader(self) -> DataLoader | list:
        on_tuning_rows = self.validation_split == "tuning"
        return self._scoring_dataloader(self.tuning_rows if on_tuning_rows else self.eval_rows)

    def test_dataloader(self) -> DataLoader | list:
        return self._scoring_dataloader(self.eval_rows)


def _with_row_ids(rows: Dataset) -> Dataset:
    return rows.add_column("row_id", list(range(len(rows))))


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
