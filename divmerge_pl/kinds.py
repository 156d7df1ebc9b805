"""The two kinds of task a merge can serve, each one small class chosen once in setup.

Classification experts share a backbone and keep one head each: targets are class
log-probabilities, scores compare predicted classes. Causal LM experts share everything, LM head
included (the paper's main setting): each expert answers its own prompts greedily once, the
targets are its distributions at those answer tokens, and scores compare generated text. The
module calls the same methods on either and never branches on the kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch import Tensor
from transformers import PreTrainedModel

from .answers import answer_logits, answer_targets, expert_generations, generate_answers
from .data import MODEL_INPUTS, MergeDataModule
from .divergences import coarsen, sharpen
from .experts import KIND_CLASS
from .merged import build_model, forward_logits, logits_per_task, swapped_weights
from .metrics import TaskScores
from .preflight import CheckedModels
from .quiet import show_progress
from .teachers import TeacherCache, Teachers, across_ranks, compute_logprobs, rows_of, teacher_key

if TYPE_CHECKING:
    from .module import DivMergeModule

Batch = dict[str, Any]
RowDivergences = list[tuple[int, Tensor]]  # (task index, the objective of each of its rows)
Compute = Callable[[], dict[str, Tensor]]  # outputs to cache, computed only when not cached


class TaskKind:
    """What differs between the kinds; ``module`` supplies the experts, settings and Trainer."""

    def __init__(self, module: DivMergeModule) -> None:
        self.module = module
        self.frozen = module.frozen

    def _key(self, name: str, rows: Dataset, evals: Dataset | None, *settings: str) -> str:
        h = self.module.hparams
        return teacher_key(self.frozen.fingerprints[name], rows, evals, h.task_vector_dtype, *settings)

    def _per_task(self, dm: MergeDataModule) -> Iterator[tuple[int, int, str, Dataset, Dataset | None]]:
        """``(datamodule task id, expert index, name, merge inputs, scored rows)`` per task."""
        for dm_id, name in enumerate(dm.task_names):
            evals = rows_of(dm.eval_rows, dm_id) if dm.eval_rows is not None else None
            yield dm_id, self.module.tasks.index(name), name, rows_of(dm.train_rows, dm_id), evals

    def _spread(self, dm: MergeDataModule, rows: Dataset, compute) -> Any:
        sharded = self.frozen.sharding is not None  # forwards gather weights: as many on every rank
        return across_ranks(self.module, dm.ordered_dataloader, rows, compute, equal_shares=sharded)

    def new_scores(self, dm: MergeDataModule, sync_on_compute: bool = True) -> TaskScores:
        raise NotImplementedError

    def build_teachers(self, dm: MergeDataModule) -> Teachers:
        raise NotImplementedError

    def row_divergences(self, merged: dict[str, Tensor], batch: Batch) -> RowDivergences:
        """The objective per row for every task in the batch, the model holding ``merged``."""
        raise NotImplementedError

    def score_batch(self, merged: dict[str, Tensor], batch: Batch, scores: TaskScores) -> None:
        raise NotImplementedError

    def validation_outputs(
        self, t: int, name: str, rows: Dataset, dm: MergeDataModule
    ) -> tuple[str, Compute]:
        """Expert ``t``'s cache key, and how to compute its predictions on its validation ``rows``."""
        raise NotImplementedError

    def score_outputs(
        self, scores: TaskScores, t: int, outputs: dict, rows: Dataset, dm: MergeDataModule
    ) -> None:
        raise NotImplementedError

    def merged_models(self, merged: dict[str, Tensor]) -> Iterator[tuple[str, PreTrainedModel]]:
        """(folder inside ``merged/``, plain ``transformers`` model) for export."""
        raise NotImplementedError

    def validation_scores(self, dm: MergeDataModule) -> dict[str, float]:
        """Each expert's score on its own task's labelled validation rows (cached on disk)."""
        cache = TeacherCache(self.module.hparams.teacher_cache)
        scores = self.new_scores(dm, sync_on_compute=False)
        for dm_id, name in enumerate(dm.task_names):
            t, rows = self.module.tasks.index(name), rows_of(dm.tuning_rows, dm_id)
            key, compute = self.validation_outputs(t, name, rows, dm)
            outputs = cache.load(key)
            if outputs is None:
                outputs = compute()
                if self.module.trainer.is_global_zero:
                    cache.save(key, outputs)
            self.score_outputs(scores, t, outputs, rows, dm)
        return _named(self.module.tasks, scores)


class ClassificationKind(TaskKind):
    """Sequence classification: a shared merged backbone, each task through its own head."""

    def new_scores(self, dm: MergeDataModule, sync_on_compute: bool = True) -> TaskScores:
        classes = [self.frozen.num_classes(t) for t in range(len(self.module.tasks))]
        return TaskScores.for_classes(classes, [dm.metrics[t] for t in self.module.tasks], sync_on_compute)

    def build_teachers(self, dm: MergeDataModule) -> Teachers:
        max_classes = max(self.frozen.num_classes(t) for t in range(len(self.module.tasks)))
        teacher = torch.full((len(dm.train_rows), max_classes), float("-inf"))
        cache = TeacherCache(self.module.hparams.teacher_cache)
        scores = self.new_scores(dm, sync_on_compute=False)
        for _, t, name, train, evals in self._per_task(dm):
            if evals is not None:
                check_labels(name, evals["labels"], self.frozen.num_classes(t))
            key = self._key(name, train, evals)
            outputs = cache.load(key)
            if outputs is None:
                outputs = {"train": self.expert_logprobs(t, dm, train, f"expert {name}: inputs")}
                if evals is not None:
                    outputs["eval"] = self.expert_logprobs(t, dm, evals, f"expert {name}: eval")
                if self.module.trainer.is_global_zero:
                    cache.save(key, outputs)
            k = self.frozen.num_classes(t)
            teacher[torch.tensor(train["row_id"]), :k] = outputs["train"]
            if evals is not None and "eval" in outputs:
                scores.update(t, outputs["eval"].argmax(-1), torch.tensor(evals["labels"]))
        teacher = sharpen(teacher, self.module.hparams.teacher_temperature)
        device = self.module.device
        return Teachers(teacher.to(device), _named(self.module.tasks, scores))

    def expert_logprobs(self, t: int, dm: MergeDataModule, rows: Dataset, desc: str) -> Tensor:
        frozen, device = self.frozen, self.module.device
        make = frozen.expert_at(t)
        eager = {} if self.module.on_demand_ok else {n: make(n) for n in frozen.names}
        head = frozen.head(t)

        def forward(batch: dict[str, Tensor]) -> Tensor:
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
            with frozen.low_rank_of_expert(t, device):
                if eager:
                    return forward_logits(frozen.base_model, {**eager, **head}, inputs)
                with frozen.on_demand(make):
                    return forward_logits(frozen.base_model, head, inputs)

        show = show_progress(self.module.trainer)
        return self._spread(dm, rows, lambda batches: compute_logprobs(forward, batches, desc, show))

    def batch_logits(self, merged: dict[str, Tensor], batch: Batch) -> list[tuple[int, Tensor, Tensor]]:
        """``(task, rows, logits)`` for every task in the batch, the backbone run once."""
        groups = list(self.module.task_rows(batch))
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        heads = [self.frozen.head(t) for t in range(len(self.module.tasks))]
        logits = logits_per_task(self.frozen.base_model, merged, heads, inputs, groups)
        return [(t, rows, out) for (t, rows), out in zip(groups, logits, strict=True)]

    def row_divergences(self, merged: dict[str, Tensor], batch: Batch) -> RowDivergences:
        teacher, objective = self.module.teachers.logprobs, self.module.objective
        out = []
        for t, rows, logits in self.batch_logits(merged, batch):
            logq = torch.log_softmax(logits.float(), dim=-1)
            out.append((t, objective(teacher[batch["row_id"][rows], : logq.shape[-1]], logq)))
        return out

    def score_batch(self, merged: dict[str, Tensor], batch: Batch, scores: TaskScores) -> None:
        for t, rows, logits in self.batch_logits(merged, batch):
            scores.update(t, logits.argmax(-1), batch["labels"][rows])

    def validation_outputs(
        self, t: int, name: str, rows: Dataset, dm: MergeDataModule
    ) -> tuple[str, Compute]:
        key = self._key(name, rows, None, "validation")

        def compute() -> dict[str, Tensor]:
            check_labels(name, rows["labels"], self.frozen.num_classes(t))
            logprobs = self.expert_logprobs(t, dm, rows, f"expert {name}: validation")
            return {"predictions": logprobs.argmax(-1)}

        return key, compute

    def score_outputs(
        self, scores: TaskScores, t: int, outputs: dict, rows: Dataset, dm: MergeDataModule
    ) -> None:
        scores.update(t, outputs["predictions"], torch.tensor(rows["labels"]))

    def merged_models(self, merged: dict[str, Tensor]) -> Iterator[tuple[str, PreTrainedModel]]:
        for t, task in enumerate(self.module.tasks):
            tensors = {**merged, **self.frozen.head(t)}
            yield task, build_model(self.frozen.base_model, tensors, self.frozen.configs[task])


class CausalLMKind(TaskKind):
    """Causal LMs answering prompts: the divergence is averaged over each expert's greedy
    answer tokens (EOS included; the prompt and the padding after the answer count for nothing)."""

    def new_scores(self, dm: MergeDataModule, sync_on_compute: bool = True) -> TaskScores:
        return TaskScores.for_answers([dm.metrics[t] for t in self.module.tasks], sync_on_compute)

    def build_teachers(self, dm: MergeDataModule) -> Teachers:
        """Each expert answers its own prompts greedily, once; its answers and its log-probs at
        them (vocabulary or top-k + rest) are the targets. Eval rows get answers only, to score."""
        h, device = self.module.hparams, self.module.device
        width, top_k = h.max_new_tokens, h.top_k
        eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
        cache = TeacherCache(h.teacher_cache)
        scores = self.new_scores(dm, sync_on_compute=False)
        size = len(dm.train_rows)
        answers = torch.full((size, width), pad, dtype=torch.long)
        lengths = torch.zeros(size, dtype=torch.long)
        logprobs: Tensor | None = None  # sized by the first task's targets (k may exceed the vocab)
        top_ids: Tensor | None = None
        show = show_progress(self.module.trainer)
        model = self.frozen.base_model
        for _, t, name, train, evals in self._per_task(dm):
            key = self._key(name, train, evals, f"answers:{width}:{top_k}:{eos}")
            outputs = cache.load(key)
            if outputs is None:
                tensors = self.frozen.expert(t)
                with self.frozen.low_rank_of_expert(t, device):
                    targets = self._spread(dm, train, partial(
                        answer_targets, model, tensors, max_new_tokens=width, eos_id=eos, pad_id=pad,
                        top_k=top_k, desc=f"expert {name}: answers", show_progress=show,
                    ))  # fmt: skip
                outputs = {f"train_{k}": v for k, v in targets.items()}
                if evals is not None:
                    with self.frozen.low_rank_of_expert(t, device):
                        generated = self._spread(dm, evals, partial(
                            expert_generations, model, tensors, max_new_tokens=width, eos_id=eos,
                            pad_id=pad, desc=f"expert {name}: eval", show_progress=show,
                        ))  # fmt: skip
                    outputs.update({f"eval_{k}": v for k, v in generated.items()})
                if self.module.trainer.is_global_zero:
                    cache.save(key, outputs)
            rows = torch.tensor(train["row_id"])
            answers[rows], lengths[rows] = outputs["train_answer_ids"], outputs["train_answer_len"]
            if logprobs is None:
                logprobs = torch.full((size, *outputs["train_logprobs"].shape[1:]), float("-inf"))
                if top_k is not None:
                    top_ids = torch.zeros((size, *outputs["train_top_ids"].shape[1:]), dtype=torch.long)
            logprobs[rows] = outputs["train_logprobs"]
            if top_ids is not None:
                top_ids[rows] = outputs["train_top_ids"]
            if evals is not None:
                text = dm.tokenizer.batch_decode(outputs["eval_answer_ids"], skip_special_tokens=True)
                scores.update(t, text, evals["reference"])
        # with top_k, the rest bucket is sharpened as one outcome (the cache keeps the originals)
        logprobs = sharpen(logprobs, h.teacher_temperature)
        return Teachers(
            logprobs.to(device),
            _named(self.module.tasks, scores),
            answer_ids=answers.to(device),
            answer_len=lengths.to(device),
            top_ids=None if top_ids is None else top_ids.to(device),
        )

    def row_divergences(self, merged: dict[str, Tensor], batch: Batch) -> RowDivergences:
        per_row = self.answer_divergences(merged, batch)
        return [(t, per_row[rows]) for t, rows in self.module.task_rows(batch)]

    def answer_divergences(self, merged: dict[str, Tensor], batch: Batch) -> Tensor:
        """Each row's objective averaged over its expert's answer tokens."""
        teachers, rows = self.module.teachers, batch["row_id"]
        lengths = teachers.answer_len[rows]
        # the batch's widest answer, read on the host: the device's copy would cost a sync per step
        width = int(teachers.host_answer_len[list(self.module.batch_index(batch).row_ids)].max())
        logits, mask = answer_logits(
            self.frozen.base_model,
            merged,
            batch["input_ids"],
            batch["attention_mask"],
            teachers.answer_ids[rows, :width],
            lengths,
        )
        logq = torch.log_softmax(logits.float(), dim=-1)
        if teachers.top_ids is not None:
            logq = coarsen(logq, teachers.top_ids[rows, :width])
        values = self.module.objective(teachers.logprobs[rows, :width], logq)
        return (values * mask).sum(1) / mask.sum(1).clamp_min(1)

    def score_batch(self, merged: dict[str, Tensor], batch: Batch, scores: TaskScores) -> None:
        tokenizer = self.module.trainer.datamodule.tokenizer
        with swapped_weights(self.frozen.base_model, merged) as model:
            answers, _ = generate_answers(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                self.module.hparams.max_new_tokens,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )
        text = tokenizer.batch_decode(answers, skip_special_tokens=True)
        for t, rows in self.module.task_rows(batch):
            picked = rows.tolist()  # generate has waited for the device already
            scores.update(t, [text[i] for i in picked], [batch["references"][i] for i in picked])

    def validation_outputs(
        self, t: int, name: str, rows: Dataset, dm: MergeDataModule
    ) -> tuple[str, Compute]:
        width = self.module.hparams.max_new_tokens
        eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
        key = self._key(name, rows, None, "validation", f"answers:{width}:{eos}")

        def compute() -> dict[str, Tensor]:
            with self.frozen.low_rank_of_expert(t, self.module.device):
                generated = expert_generations(
                    self.frozen.base_model, self.frozen.expert(t), dm.ordered_dataloader(rows), width, eos,
                    pad, f"expert {name}: validation", show_progress(self.module.trainer),
                )  # fmt: skip
            return {"answer_ids": generated["answer_ids"]}

        return key, compute

    def score_outputs(
        self, scores: TaskScores, t: int, outputs: dict, rows: Dataset, dm: MergeDataModule
    ) -> None:
        text = dm.tokenizer.batch_decode(outputs["answer_ids"], skip_special_tokens=True)
        scores.update(t, text, rows["reference"])

    def merged_models(self, merged: dict[str, Tensor]) -> Iterator[tuple[str, PreTrainedModel]]:
        config = self.frozen.configs[self.module.tasks[0]]
        yield "", build_model(self.frozen.base_model, merged, config, KIND_CLASS["causal_lm"])


def task_kind(module: DivMergeModule) -> TaskKind:
    """The kind of the loaded experts."""
    return CausalLMKind(module) if module.frozen.is_causal_lm else ClassificationKind(module)


def check_data_labels(checked: CheckedModels, dm: Any) -> None:
    """Class ids outside an expert's head refused, read (not tokenised) before the logger or
    SaveConfigCallback write their folders in setup."""
    if checked.kind == "sequence_classification" and isinstance(dm, MergeDataModule):
        for task, labels in dm.class_labels().items():
            if task in checked.configs:
                check_labels(task, labels, int(checked.configs[task].num_labels))


def check_prompts(experts_kind: str, data_is_causal_lm: bool) -> None:
    """Prompts are for causal LM experts, and causal LM experts need them."""
    if (experts_kind == "causal_lm") != data_is_causal_lm:
        raise ValueError(
            f"the experts are {experts_kind} models, but data.tasks "
            + (
                "have no prompt: give each task a prompt such as '{text}\\nAnswer:'"
                if experts_kind == "causal_lm"
                else "have prompts, which are for causal LM experts: remove them"
            )
        )


def check_labels(task: str, labels: list[int], num_classes: int) -> None:
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(
            f"task {task!r}: eval label(s) {bad[:5]} outside 0..{num_classes - 1}, the classes of "
            f"expert {task!r}'s head; check label_field and that labels are mapped as in fine-tuning"
        )


def _named(tasks: tuple[str, ...], scores: TaskScores) -> dict[str, float]:
    return {tasks[i]: s for i, s in scores.compute().items()}
