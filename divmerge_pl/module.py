"""DivMergeModule: frozen experts, learnable merge coefficients, the divergence objective.

The only trainable state is Gamma [tasks x groups]. Experts are loaded in ``setup`` (after
``prepare_data``, so a datamodule may build them first) and are never written to checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from datasets import Dataset
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from .answers import answer_logits, answer_targets, expert_generations, generate_answers
from .coefficients import DEFAULT_BLOCK_PATTERN, Granularity, build_layout, initial_coefficients
from .data import MODEL_INPUTS, MergeDataModule
from .divergences import coarsen, combine_tasks, get_objective, relative_weights, sharpen
from .experts import KIND_CLASS, LoadedExperts, load_experts
from .lora import LowRankExperts, check_with_adapters, low_rank_added, merged_weight
from .merged import (
    build_model,
    expert_tensor,
    expert_tensors,
    forward_logits,
    logits_per_task,
    merge_tensor,
    merge_tensors,
    swapped_weights,
)
from .methods import StaticMethod, learned_name
from .metrics import TaskScores, build_report
from .on_demand import MakeTensor, merged_on_demand
from .quiet import follow_trainer, show_progress
from .resume import merge_settings, saved_settings, settings_differences, settings_error
from .selection import choose_on_validation
from .static_merges import StaticMerge, dare_task_vectors, ties_task_vectors
from .teachers import DEFAULT_CACHE, TeacherCache, cache_key, compute_logprobs, token_fingerprint

log = logging.getLogger(__name__)


class FrozenExperts(nn.Module):
    """Base weights plus stacked task vectors and per-task heads: moved with the module,
    never trained, never checkpointed (a requeued job writes kilobytes, not the model)."""

    def __init__(self, loaded: LoadedExperts, vector_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = loaded.kind
        self.tasks = loaded.tasks
        self.configs = loaded.configs
        self.paths = loaded.paths
        self.fingerprints = loaded.fingerprints
        self.skeleton = loaded.skeleton
        self.names = list(loaded.task_vectors)
        for i, stacked in enumerate(loaded.task_vectors.values()):
            self.register_buffer(f"tau_{i}", stacked.to(vector_dtype), persistent=False)
        self.merge_source = "raw"  # which vectors the merge combines: raw, processed or static
        self.low_rank = LowRankExperts(loaded.low_rank, vector_dtype)  # LoRA experts, as factors
        self.head_names = [list(h) for h in loaded.heads.values()]
        for t, head in enumerate(loaded.heads.values()):
            for j, tensor in enumerate(head.values()):
                self.register_buffer(f"head_{t}_{j}", tensor, persistent=False)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forget_own_missing_keys)

    def train(self, mode: bool = True) -> FrozenExperts:
        return super().train(False)  # teachers were computed without dropout: so is the merge

    def base_tensors(self) -> dict[str, Tensor]:
        params = dict(self.skeleton.named_parameters())
        return {name: params[name] for name in self.names}

    def merged_names(self) -> list[str]:
        """Every merged tensor, dense or low-rank (LoRA targets), in model order."""
        merged = set(self.names) | set(self.low_rank.names)
        if len(merged) == len(self.names):
            return list(self.names)
        return [name for name, _ in self.skeleton.named_parameters() if name in merged]

    def task_vectors(self) -> dict[str, Tensor]:
        """The experts' own task vectors (teachers and expert scores always use these)."""
        return {name: getattr(self, f"tau_{i}") for i, name in enumerate(self.names)}

    def set_merge_vectors(self, vectors: dict[str, Tensor]) -> None:
        """Merge TIES/DARE-processed vectors instead of the raw ones (AdaMerging++ style)."""
        for i, name in enumerate(self.names):
            self.register_buffer(f"merge_tau_{i}", vectors[name], persistent=False)
        self.merge_source = "processed"

    def merge_vectors(self) -> dict[str, Tensor]:
        if self.merge_source != "processed":
            return self.task_vectors()
        return {name: getattr(self, f"merge_tau_{i}") for i, name in enumerate(self.names)}

    def set_static_delta(self, delta: dict[str, Tensor]) -> None:
        """Fix the merge to ``theta0 + delta`` (a training-free method's result)."""
        for i, name in enumerate(self.names):
            self.register_buffer(f"delta_{i}", delta[name], persistent=False)
        self.merge_source = "static"

    def static_delta(self) -> dict[str, Tensor] | None:
        if self.merge_source != "static":
            return None
        return {name: getattr(self, f"delta_{i}") for i, name in enumerate(self.names)}

    def head(self, task_index: int) -> dict[str, Tensor]:
        return {
            name: getattr(self, f"head_{task_index}_{j}")
            for j, name in enumerate(self.head_names[task_index])
        }

    def num_classes(self, task_index: int) -> int:
        return int(self.configs[self.tasks[task_index]].num_labels)


SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_strategy(strategy: Strategy) -> None:
    """Refuse sharded strategies before any model loads: every merge step reads the whole base
    and every task vector on each device, and the checkpoint holds Gamma alone (FSDP's state-dict
    hooks expect the frozen tensors in it and fail at the first checkpoint)."""
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise ValueError(
            f"trainer.strategy {type(strategy).__name__} shards the model, which DivMerge does not "
            "support: the base and task vectors are held whole by every process and only the merge "
            "coefficients train. Use ddp (configs/ddp.yaml), or a single device."
        )


def _drop_own_keys(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _forget_own_missing_keys(module: nn.Module, incompatible: Any) -> None:
    own = {f"skeleton.{n}" for n in module.skeleton.state_dict()}
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if not any(k.endswith(o) for o in own)
    ]


class DivMergeModule(L.LightningModule):
    """Learns merge coefficients so the merged model matches each expert on its own inputs."""

    def __init__(
        self,
        base: str,
        experts: dict[str, str],
        objective: Literal["js", "kl", "entropy"] = "js",
        granularity: Granularity = "layer",
        block_pattern: str = DEFAULT_BLOCK_PATTERN,
        lr: float = 1e-2,
        init: float | None = None,
        clamp: tuple[float, float] | None = None,
        teacher_cache: str | None = str(DEFAULT_CACHE),
        task_vector_transform: Literal["none", "ties", "dare"] = "none",
        density: float = 0.2,
        trim_scope: Literal["model", "tensor"] = "model",
        drop_rate: float = 0.9,
        transform_seed: int = 0,
        task_vector_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        max_new_tokens: int = 16,
        top_k: int | None = None,
        merge_on_demand: bool = True,
        allow_pickle: bool = False,
        task_weighting: Literal["sum", "relative"] = "sum",
        teacher_temperature: float = 1.0,
    ) -> None:
        """
        Args:
            base: folder of the pretrained model the experts were fine-tuned from.
            experts: task name -> folder of that task's fine-tuned expert.
            objective: ``js`` (Jensen-Shannon, the paper's), ``kl`` (forward KL, expert as
                reference) or ``entropy`` (AdaMerging: the merged model's entropy, no teacher).
            granularity: ``task`` (one coefficient per task), ``layer`` (one per task per
                parameter tensor) or ``block`` (one per task per ``block_pattern`` match).
            block_pattern: regex naming a tensor's block, for ``granularity: block``.
            lr: Adam's learning rate (paper: 1e-2).
            init: starting value of every coefficient; None means 1/N (0.5 for two tasks).
            clamp: ``[low, high]``: the merge uses the coefficients clipped to this range
                (AdaMerging's [0, 1]); None: unconstrained, as DivMerge's paper.
            teacher_cache: folder caching expert outputs across runs; None to disable.
            task_vector_transform: learn coefficients over ``ties`` (trimmed, sign-elected) or
                ``dare`` (randomly dropped, rescaled) task vectors instead of the raw ones
                (AdaMerging++). Teachers stay the real experts.
            density: fraction of each task vector kept by ``ties`` (TIES paper: 0.2).
            trim_scope: ``ties`` trims over each task's whole vector (``model``, the TIES paper's)
                or each tensor on its own (``tensor``, mergekit's).
            drop_rate: fraction of each task vector dropped by ``dare`` (DARE paper: 0.9).
            transform_seed: seed of ``dare``'s random drop.
            task_vector_dtype: how task vectors are stored; ``bfloat16`` halves their memory
                (the merge itself is computed in float32).
            max_new_tokens: causal LM experts: the longest greedy answer an expert (or, when
                scored, the merged model) generates to a prompt.
            top_k: causal LM experts: keep each answer position's ``top_k`` likeliest tokens
                of the expert and one bucket for the rest, in the cache and in the loss, instead
                of the whole vocabulary (memory ``k + 1`` per position, not V; the divergence on
                this coarser partition is a lower bound of the full one, equal at k = V).
            merge_on_demand: build each module's merged weights only while it runs, and again
                in backward, instead of a whole merged copy of the model held for the step
                (less memory, one more merge per step). Checked once against the plain merge:
                a model that reads a weight outside its own module falls back, with a warning.
            allow_pickle: also load weights saved as pickles (``pytorch_model.bin``); loading a
                pickle can run code, so only for folders you trust. Default: safetensors only.
            task_weighting: ``sum`` adds the tasks' mean divergences (the paper's); ``relative``
                weighs each task by the inverse of its divergence at the initial coefficients
                (measured once, before the first step), so an unsure expert's task is not given up.
            teacher_temperature: the experts' targets are ``softmax(log p / T)``; below 1 they are
                sharpened towards each expert's own answer (1: the experts' distributions).
        """
        super().__init__()
        get_objective(objective)
        if granularity not in ("task", "layer", "block"):
            raise ValueError(f"granularity {granularity!r}: choose one of task, layer, block")
        if not experts:
            raise ValueError("model.experts is empty: give at least one {task_name: folder}")
        if lr <= 0:
            raise ValueError(f"model.lr must be positive, got {lr}")
        if not 0 < density <= 1:
            raise ValueError(f"model.density must be in (0, 1], got {density}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"model.drop_rate must be in [0, 1), got {drop_rate}")
        if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
            raise ValueError(f"model.clamp must be [low, high] with low < high (or null), got {clamp}")
        if max_new_tokens < 1:
            raise ValueError(f"model.max_new_tokens must be at least 1, got {max_new_tokens}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"model.top_k must be a positive number of tokens (or null: all), got {top_k}")
        if teacher_temperature <= 0:
            raise ValueError(f"model.teacher_temperature must be positive, got {teacher_temperature}")
        if objective == "entropy" and teacher_temperature != 1.0:
            raise ValueError("model.teacher_temperature: the entropy objective has no teacher to sharpen")
        self.save_hyperparameters()
        if task_weighting == "relative":  # checkpointed: a resumed run keeps the first run's weights
            self.register_buffer("start_divergence", torch.full((len(experts),), float("nan")))
        self.objective = get_objective(objective)
        self.frozen: FrozenExperts | None = None
        self.coefficients: nn.Parameter | None = None
        self.layout = None
        self.static_merge: StaticMerge | None = None  # set by `divmerge-pl merge` before setup
        self.static_method: StaticMethod | None = None  # the registry's entry behind static_merge
        self.selection: dict[str, Any] | None = None  # how a training-free method's params were chosen
        self.val_scores: TaskScores | None = None
        self.expert_scores: dict[str, float] = {}
        self.last_merged_scores: tuple[int, dict[str, float]] | None = None
        self._teachers_ready = False
        self._eval_tensors: dict[str, Tensor] | None = None
        self._on_demand_ok = False  # set by prepare_teachers, once checked on this model
        self._tuning_expert_scores: dict[str, float] | None = None

    # ------------------------------------------------------------------ set-up
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.hparams.experts)

    @property
    def generative(self) -> bool:
        """Causal LM experts: answers are generated and the whole model, LM head too, is merged."""
        return self.frozen is not None and self.frozen.kind == "causal_lm"

    @override
    def prepare_data(self) -> None:
        follow_trainer(self._trainer)  # a Hub model's download bars too (None: called from Python)
        # before the datamodule reads and tokenises anything: paths, configs, weight formats and
        # tensor shapes (safetensors headers) fail in a second, not after the data is ready
        hp = self.hparams
        checked = check_with_adapters(hp.base, dict(hp.experts), hp.allow_pickle)
        # class ids are read (not tokenised) here too: a label outside an expert's head is refused
        # before the logger or SaveConfigCallback write their folders in setup
        dm = getattr(self.trainer, "datamodule", None)
        if checked.kind == "sequence_classification" and isinstance(dm, MergeDataModule):
            for task, labels in dm.class_labels().items():
                if task in checked.configs:
                    _check_labels(task, labels, int(checked.configs[task].num_labels))

    def setup(self, stage: str) -> None:
        follow_trainer(self.trainer)  # weights are loaded and written with the Trainer's bars or none
        check_strategy(self.trainer.strategy)
        dm = self._datamodule()  # task names checked before any model is loaded
        self.load_experts()
        if self.generative != dm.prompted:
            raise ValueError(
                f"the experts are {self.frozen.kind} models, but data.tasks "
                + (
                    "have no prompt: give each task a prompt such as '{text}\\nAnswer:'"
                    if self.generative
                    else "have prompts, which are for causal LM experts: remove them"
                )
            )

    def load_experts(self) -> None:
        """Load and check base and experts, and create Gamma (idempotent)."""
        if self.frozen is not None:
            return
        dtype = getattr(torch, self.hparams.task_vector_dtype)
        loaded = load_experts(
            self.hparams.base, dict(self.hparams.experts), dtype, allow_pickle=self.hparams.allow_pickle
        )
        self.frozen = FrozenExperts(loaded, dtype)
        if self.frozen.low_rank.names and self.hparams.task_vector_transform != "none":
            raise ValueError(
                f"model.task_vector_transform {self.hparams.task_vector_transform!r} is not supported with "
                "LoRA experts yet (it would need their dense task vectors); use none"
            )
        if self.static_merge is not None:
            self.set_static_merge(self.static_merge)
        elif self.hparams.task_vector_transform == "ties":
            vectors = ties_task_vectors(loaded.task_vectors, self.hparams.density, self.hparams.trim_scope)
            self.frozen.set_merge_vectors(vectors)
        elif self.hparams.task_vector_transform == "dare":
            vectors = dare_task_vectors(
                loaded.task_vectors, self.hparams.drop_rate, self.hparams.transform_seed
            )
            self.frozen.set_merge_vectors(vectors)
        self.layout = build_layout(
            self.frozen.merged_names(), self.hparams.granularity, self.hparams.block_pattern
        )
        self.coefficients = nn.Parameter(
            initial_coefficients(len(self.tasks), self.layout.num_groups, self.hparams.init)
        )
        self.val_scores = self._new_scores()
        merged = sum(v[0].numel() for v in loaded.task_vectors.values())
        total = sum(p.numel() for p in self.frozen.skeleton.parameters())
        rank_zero_info(
            f"DivMerge: {len(self.tasks)} experts ({loaded.kind}); merging "
            f"{len(self.frozen.merged_names())} tensors ({merged / 1e6:.2f}M dense of {total / 1e6:.2f}M "
            f"parameters; tensors equal in base and every expert stay the base's), "
            f"{self.layout.num_groups} coefficient group(s) per task ({self.hparams.granularity})"
        )

    def use_static_merge(self, merge: StaticMerge, method: StaticMethod | None = None) -> None:
        """Fix the merge to a training-free method's result. With the registry's ``method``, its
        settings are first chosen from its grid on the labelled validation rows, when the tasks
        have some (at the start of validation or test, once the teachers are ready)."""
        self.static_method, self.selection = method, None
        self.set_static_merge(merge)

    def set_static_merge(self, merge: StaticMerge) -> None:
        """Apply ``merge`` (now if the experts are loaded, else when they are); scores of an
        earlier merge are forgotten."""
        if self.frozen is not None and self.frozen.low_rank.names:
            raise ValueError(
                "training-free merges are not supported with LoRA experts yet (they combine dense task "
                "vectors); learn the coefficients with fit instead"
            )
        self.static_merge = merge
        self.last_merged_scores = None
        if self.frozen is not None:
            self.frozen.set_static_delta(merge.merge(self.frozen.task_vectors()))

    def _choose_static_settings(self) -> None:
        method = self.static_method
        if method is None or self.selection is not None:
            return
        if not method.grid:
            self.selection = {"chosen_on": "nothing to choose", "chosen": method.params}
        elif self._datamodule().tuning_rows is None:
            self.selection = {"chosen_on": "published defaults (no val_files)", "chosen": method.params}
            rank_zero_warn(
                f"{method.name}: the tasks have no val_files, so its settings are the published defaults "
                f"{method.params}; give each task a labelled validation split to choose them from "
                f"{method.grid}"
            )
        else:
            self.selection = choose_on_validation(self, method)

    def _new_scores(self, sync_on_compute: bool = True) -> TaskScores:
        metrics = self._datamodule().metrics
        names = [metrics[t] for t in self.tasks]
        if self.generative:
            return TaskScores.for_answers(names, sync_on_compute)
        return TaskScores.for_classes(
            [self.frozen.num_classes(t) for t in range(len(self.tasks))], names, sync_on_compute
        )

    @property
    def method(self) -> str:
        """What produced the merge, as reports name it: the registry's name when the settings
        are exactly one of its methods'."""
        if self.static_merge is not None:
            return self.static_merge.name
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        name = learned_name(dict(self.hparams), epochs)
        if name is not None:
            return name
        transform = self.hparams.task_vector_transform
        suffix = "" if transform == "none" else f" over {transform} vectors"
        return f"learned ({self.hparams.objective}, {self.hparams.granularity}){suffix}, own settings"

    def method_settings(self) -> dict[str, Any]:
        """Every setting that defines this merge, resolved (init 1/N as a number), for reports."""
        if self.static_merge is not None:
            return {"kind": "static", "params": self.static_merge.params(), **(self.selection or {})}
        h = self.hparams
        settings = {
            "kind": "learned",
            "objective": h.objective,
            "granularity": h.granularity,
            "task_vector_transform": h.task_vector_transform,
            "lr": h.lr,
            "init": 1.0 / len(self.tasks) if h.init is None else h.init,
            "init_rule": "1/N" if h.init is None else "fixed",
            "clamp": None if h.clamp is None else list(h.clamp),
            "task_vector_dtype": h.task_vector_dtype,
        }
        if h.granularity == "block":
            settings["block_pattern"] = h.block_pattern
        if h.task_vector_transform == "ties":
            settings.update(density=h.density, trim_scope=h.trim_scope)
        if h.task_vector_transform == "dare":
            settings.update(drop_rate=h.drop_rate, transform_seed=h.transform_seed)
        if self._trainer is not None:
            dm = self._datamodule()
            settings.update(
                epochs=self.trainer.max_epochs,
                batch_size=dm.batch_size,
                inputs_per_task={t.name: t.num_samples for t in dm.tasks},
            )
        return settings

    def _report(self, merged: dict[str, float]) -> dict:
        report = build_report(self.expert_scores, merged, self._datamodule().metrics, self.method)
        report["settings"] = self.method_settings()
        if self.static_merge is not None:
            report["params"] = self.static_merge.params()
        return report

    def _datamodule(self) -> MergeDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, MergeDataModule):
            raise TypeError(
                "DivMergeModule needs a MergeDataModule (its rows carry task and row ids); "
                f"got {type(dm).__name__}"
            )
        missing = [t for t in self.tasks if t not in dm.task_names]
        extra = [t for t in dm.task_names if t not in self.tasks]
        if missing or extra:
            raise ValueError(
                f"tasks and experts differ: experts without a task {missing}, "
                f"tasks without an expert {extra}; model.experts keys must equal data.tasks names"
            )
        return dm

    def on_fit_start(self) -> None:
        self.prepare_teachers()
        if self.hparams.task_weighting == "relative" and bool(self.start_divergence.isnan().any()):
            self.start_divergence.copy_(self._mean_divergences(self._datamodule()))

    @torch.no_grad()
    def _mean_divergences(self, dm: MergeDataModule) -> Tensor:
        """Each task's mean objective over all its merge inputs at the current coefficients."""
        sums = torch.zeros(len(self.tasks), device=self.device)
        counts = torch.zeros(len(self.tasks), device=self.device)
        for batch in dm.ordered_dataloader(dm.train_rows):
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            for t, per_row in self._training_divergences(batch):
                sums[t] += per_row.sum().float()
                counts[t] += per_row.numel()
        return sums / counts.clamp_min(1)

    def task_weights(self) -> Tensor | None:
        """The objective's per-task weights (None: the paper's plain sum)."""
        if self.hparams.task_weighting != "relative":
            return None
        return relative_weights(self.start_divergence)

    def on_validation_start(self) -> None:
        self.prepare_teachers()
        self._choose_static_settings()

    def on_test_start(self) -> None:
        self.prepare_teachers()
        self._choose_static_settings()

    def prepare_teachers(self) -> None:
        """Compute (or load from cache) every expert's outputs on its own task's rows, once."""
        if self._teachers_ready:
            return
        dm = self._datamodule()
        order = [self.tasks.index(name) for name in dm.task_names]
        self.register_buffer("task_map", torch.tensor(order, device=self.device), persistent=False)
        self._on_demand_ok = self._on_demand_works(dm)
        if self.generative:
            self._prepare_answer_teachers(dm, order)
        else:
            self._prepare_class_teachers(dm, order)
        self._teachers_ready = True

    def _teacher_key(self, name: str, train: Dataset, evals: Dataset | None, *settings: str) -> str:
        return cache_key(
            self.frozen.fingerprints[name],
            token_fingerprint(train["input_ids"]),
            token_fingerprint(evals["input_ids"]) if evals is not None else "-",
            # experts rebuilt from low-precision task vectors are not quite the float32 ones
            *([self.hparams.task_vector_dtype] if self.hparams.task_vector_dtype != "float32" else []),
            *settings,
        )

    def _prepare_class_teachers(self, dm: MergeDataModule, order: list[int]) -> None:
        max_classes = max(self.frozen.num_classes(t) for t in range(len(self.tasks)))
        teacher = torch.full((len(dm.train_rows), max_classes), float("-inf"))
        cache = TeacherCache(self.hparams.teacher_cache)
        scores = self._new_scores(sync_on_compute=False)
        for dm_id, name in enumerate(dm.task_names):
            t = order[dm_id]
            train = _rows_of(dm.train_rows, dm_id)
            evals = _rows_of(dm.eval_rows, dm_id) if dm.eval_rows is not None else None
            if evals is not None:
                _check_labels(name, evals["labels"], self.frozen.num_classes(t))
            key = self._teacher_key(name, train, evals)
            outputs = cache.load(key)
            if outputs is None:
                outputs = {"train": self._expert_logprobs(t, dm, train, f"expert {name}: inputs")}
                if evals is not None:
                    outputs["eval"] = self._expert_logprobs(t, dm, evals, f"expert {name}: eval")
                if self.trainer.is_global_zero:
                    cache.save(key, outputs)
            k = self.frozen.num_classes(t)
            teacher[torch.tensor(train["row_id"]), :k] = outputs["train"]
            if evals is not None and "eval" in outputs:
                scores.update(t, outputs["eval"].argmax(-1), torch.tensor(evals["labels"]))
        teacher = sharpen(teacher, self.hparams.teacher_temperature)
        self.register_buffer("teacher_logprobs", teacher.to(self.device), persistent=False)
        self.expert_scores = {self.tasks[i]: s for i, s in scores.compute().items()}

    def _prepare_answer_teachers(self, dm: MergeDataModule, order: list[int]) -> None:
        """Each expert answers its own prompts greedily, once; its answers and its log-probs at
        them (vocabulary or top-k + rest) are the targets. Eval rows get answers only, to score."""
        width, top_k = self.hparams.max_new_tokens, self.hparams.top_k
        eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
        cache = TeacherCache(self.hparams.teacher_cache)
        scores = self._new_scores(sync_on_compute=False)
        size = len(dm.train_rows)
        answers = torch.full((size, width), pad, dtype=torch.long)
        lengths = torch.zeros(size, dtype=torch.long)
        logprobs: Tensor | None = None  # sized by the first task's targets (k may exceed the vocab)
        top_ids: Tensor | None = None
        show = show_progress(self.trainer)
        for dm_id, name in enumerate(dm.task_names):
            t = order[dm_id]
            train = _rows_of(dm.train_rows, dm_id)
            evals = _rows_of(dm.eval_rows, dm_id) if dm.eval_rows is not None else None
            key = self._teacher_key(name, train, evals, f"answers:{width}:{top_k}:{eos}")
            outputs = cache.load(key)
            if outputs is None:
                tensors = expert_tensors(self.frozen.base_tensors(), self.frozen.task_vectors(), t)
                model = self.frozen.skeleton
                with self._low_rank(t):
                    targets = self._across_ranks(dm, train, partial(
                        answer_targets, model, tensors, max_new_tokens=width, eos_id=eos, pad_id=pad,
                        top_k=top_k, desc=f"expert {name}: answers", show_progress=show,
                    ))  # fmt: skip
                outputs = {f"train_{k}": v for k, v in targets.items()}
                if evals is not None:
                    with self._low_rank(t):
                        generated = self._across_ranks(dm, evals, partial(
                            expert_generations, model, tensors, max_new_tokens=width, eos_id=eos,
                            pad_id=pad, desc=f"expert {name}: eval", show_progress=show,
                        ))  # fmt: skip
                    outputs.update({f"eval_{k}": v for k, v in generated.items()})
                if self.trainer.is_global_zero:
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
        self.register_buffer("answer_ids", answers.to(self.device), persistent=False)
        self.register_buffer("answer_len", lengths.to(self.device), persistent=False)
        # with top_k, the rest bucket is sharpened as one outcome (the cache keeps the originals)
        logprobs = sharpen(logprobs, self.hparams.teacher_temperature)
        self.register_buffer("teacher_logprobs", logprobs.to(self.device), persistent=False)
        if top_ids is not None:
            self.register_buffer("teacher_top_ids", top_ids.to(self.device), persistent=False)
        self.expert_scores = {self.tasks[i]: s for i, s in scores.compute().items()}

    def _expert_logprobs(self, t: int, dm: MergeDataModule, rows: Dataset, desc: str) -> Tensor:
        make = self._expert_weights(t)
        eager = {} if self._on_demand_ok else {n: make(n) for n in self.frozen.names}
        head = self.frozen.head(t)

        def forward(batch: dict[str, Tensor]) -> Tensor:
            inputs = {k: batch[k].to(self.device) for k in MODEL_INPUTS if k in batch}
            with self._low_rank(t):
                if eager:
                    return forward_logits(self.frozen.skeleton, {**eager, **head}, inputs)
                with self._on_demand(make):
                    return forward_logits(self.frozen.skeleton, head, inputs)

        show = show_progress(self.trainer)

        def logprobs(batches: DataLoader) -> Tensor:
            return compute_logprobs(forward, batches, desc, show)

        return self._across_ranks(dm, rows, logprobs)

    def _across_ranks(self, dm: MergeDataModule, rows: Dataset, compute: Callable[[DataLoader], Any]) -> Any:
        """``compute`` over ``rows``' batches (a tensor or a dict of tensors, a row each), each of the W
        processes taking every W-th row and the shares gathered back in row order: teachers cost
        1/W of their single-process time, and every rank ends with all of them."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1 or len(rows) < world:
            return compute(dm.ordered_dataloader(rows))
        rank = self.trainer.global_rank
        share = compute(dm.ordered_dataloader(rows.select(range(rank, len(rows), world))))
        size = -(-len(rows) // world)

        def gather(part: Tensor) -> Tensor:
            padded = part.new_zeros((size, *part.shape[1:]))
            padded[: len(part)] = part
            return interleave_shares(self.all_gather(padded.to(self.device)).cpu(), len(rows))

        return {k: gather(v) for k, v in share.items()} if isinstance(share, dict) else gather(share)

    # ------------------------------------------------------------------ the merge
    def merge_coefficients(self) -> Tensor:
        """The coefficients the merge uses: Gamma, clipped to ``clamp`` when one is set (the
        gradient is zero outside the range, as in AdaMerging's code)."""
        clamp = self.hparams.clamp
        return self.coefficients if clamp is None else self.coefficients.clamp(*clamp)

    def _merge_at_coefficients(self) -> MakeTensor:
        """One merged tensor at the current coefficients (differentiable in Gamma)."""
        base, vectors = self.frozen.base_tensors(), self.frozen.merge_vectors()
        group, gamma = self.layout.group_of, self.merge_coefficients()
        return lambda name: merge_tensor(base[name], vectors[name], gamma[:, group[name]])

    def _expert_weights(self, t: int) -> MakeTensor:
        base, vectors = self.frozen.base_tensors(), self.frozen.task_vectors()
        return lambda name: expert_tensor(base[name], vectors[name], t)

    def _on_demand(self, make: MakeTensor):
        return merged_on_demand(self.frozen.skeleton, make, self.frozen.names)

    def _low_rank(self, task_index: int | None = None):
        """Forwards inside add the LoRA experts' low-rank merge to their target layers' outputs
        (``lora.low_rank_added``; nothing without LoRA experts): at the current coefficients, or
        expert ``task_index``'s own."""
        stacks = self.frozen.low_rank.stacks()
        if task_index is not None:
            own = torch.zeros(len(self.tasks), device=self.device)
            own[task_index] = 1.0
            return low_rank_added(self.frozen.skeleton, stacks, lambda _name: own)
        gamma, group = self.merge_coefficients(), self.layout.group_of
        return low_rank_added(self.frozen.skeleton, stacks, lambda name: gamma[:, group[name]])

    @torch.no_grad()
    def _on_demand_works(self, dm: MergeDataModule) -> bool:
        """Whether merging module by module suits this model: a few rows' logits come out
        finite (a weight read outside its own module reads NaN). Once per fit."""
        if not self.hparams.merge_on_demand or self.frozen.static_delta() is not None:
            return False
        batch = next(iter(dm.ordered_dataloader(dm.train_rows)))
        inputs = {k: batch[k][:4].to(self.device) for k in MODEL_INPUTS if k in batch}
        with self._on_demand(self._merge_at_coefficients()), self._low_rank():
            logits = forward_logits(self.frozen.skeleton, self.frozen.head(0), inputs)
        if bool(torch.isfinite(logits).all()):
            return True
        rank_zero_warn(
            "model.merge_on_demand: this model reads some weight outside its own module's forward "
            "(its logits are not finite when merged weights exist only inside their modules), so "
            "each step builds the whole merged model instead (one more copy of the model in "
            "memory). Set model.merge_on_demand: false to skip this check."
        )
        return False

    def merged_tensors(self) -> dict[str, Tensor]:
        """Merged backbone tensors at the current coefficients (differentiable in Gamma), or
        the fixed result of a training-free method."""
        base = self.frozen.base_tensors()
        delta = self.frozen.static_delta()
        if delta is not None:
            return {name: base[name] + delta[name].to(base[name].dtype) for name in delta}
        return merge_tensors(base, self.frozen.merge_vectors(), self.merge_coefficients(), self.layout)

    def _task_rows(self, batch: dict[str, Tensor]):
        task_ids = self.task_map[batch["task_id"]]
        for t in task_ids.unique().tolist():
            yield t, task_ids == t

    def _batch_logits(self, merged: dict[str, Tensor], batch: dict[str, Tensor]):
        """``(task, rows, logits)`` for every task in the batch, the backbone run once."""
        groups = list(self._task_rows(batch))
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        heads = [self.frozen.head(t) for t in range(len(self.tasks))]
        logits = logits_per_task(self.frozen.skeleton, merged, heads, inputs, groups)
        return [(t, rows, out) for (t, rows), out in zip(groups, logits, strict=True)]

    def _training_divergences(self, batch: dict[str, Tensor]):
        """``(task, objective per row)``, merged on demand when this model allows it."""
        with self._low_rank():
            if self._on_demand_ok:
                with self._on_demand(self._merge_at_coefficients()):
                    return self._row_divergences({}, batch)
            return self._row_divergences(self.merged_tensors(), batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        name = self.hparams.objective
        task_sums: dict[int, Tensor] = {}
        counts = torch.zeros(len(self.tasks), device=self.device)
        for t, per_row in self._training_divergences(batch):
            task_sums[t], counts[t] = per_row.sum(), per_row.numel()
            self.log(f"train/{name}/{self.tasks[t]}", per_row.mean(), batch_size=per_row.numel())
        zero = torch.zeros((), device=self.device)
        sums = torch.stack([task_sums.get(t, zero) for t in range(len(self.tasks))])
        world = self.trainer.world_size
        if world > 1:  # each task's mean over the global batch, whatever share of it this rank holds
            counts = self.all_gather(counts).sum(dim=0)
        present = counts > 0
        weights = self.task_weights()
        # DDP averages gradients over ranks, hence x world: the sum of per-task means, as on one device
        total = (
            combine_tasks(sums[present] / counts[present], None if weights is None else weights[present])
            * world
        )
        if not torch.isfinite(total):  # stop before Adam writes NaN into the coefficients
            bad = [self.tasks[t] for t in range(len(self.tasks)) if not torch.isfinite(sums[t])]
            raise FloatingPointError(
                f"step {self.global_step}: the {name} objective is not finite for task(s) {bad}; "
                "the coefficients are still those of the last good step (saved in the checkpoint on "
                "exception). Lower model.lr, or check the experts and inputs of those tasks"
            )
        self.log("train/loss", total / world, prog_bar=True, batch_size=len(batch["task_id"]))
        # the epoch mean, for EarlyStopping(monitor="train/epoch_loss", check_on_train_epoch_end=True)
        self.log(
            "train/epoch_loss", total / world, on_step=False, on_epoch=True, batch_size=len(batch["task_id"])
        )
        return total

    def _row_divergences(self, merged: dict[str, Tensor], batch: dict[str, Tensor]):
        """``(task, objective per row)`` for every task in the batch."""
        if self.generative:
            per_row = self._answer_divergences(merged, batch)
            return [(t, per_row[rows]) for t, rows in self._task_rows(batch)]
        out = []
        for t, rows, logits in self._batch_logits(merged, batch):
            logq = torch.log_softmax(logits.float(), dim=-1)
            out.append(
                (t, self.objective(self.teacher_logprobs[batch["row_id"][rows], : logq.shape[-1]], logq))
            )
        return out

    def _answer_divergences(self, merged: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """Each row's objective averaged over its expert's answer tokens (EOS included; the
        prompt and the padding after the answer count for nothing)."""
        rows = batch["row_id"]
        lengths = self.answer_len[rows]
        width = int(lengths.max())
        logits, mask = answer_logits(
            self.frozen.skeleton,
            merged,
            batch["input_ids"],
            batch["attention_mask"],
            self.answer_ids[rows, :width],
            lengths,
        )
        logq = torch.log_softmax(logits.float(), dim=-1)
        if self.hparams.top_k is not None:
            logq = coarsen(logq, self.teacher_top_ids[rows, :width])
        values = self.objective(self.teacher_logprobs[rows, :width], logq)
        return (values * mask).sum(1) / mask.sum(1).clamp_min(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([self.coefficients], lr=self.hparams.lr)

    # ------------------------------------------------------------------ evaluation
    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():
            self._eval_tensors = self.merged_tensors()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._score_batch(batch, self.val_scores)

    def _score_batch(self, batch: dict[str, Tensor], scores: TaskScores) -> None:
        with self._low_rank():
            self._score_merged_batch(batch, scores)

    def _score_merged_batch(self, batch: dict[str, Tensor], scores: TaskScores) -> None:
        if self.generative:
            tokenizer = self._datamodule().tokenizer
            with swapped_weights(self.frozen.skeleton, self._eval_tensors) as model:
                answers, _ = generate_answers(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    self.hparams.max_new_tokens,
                    tokenizer.eos_token_id,
                    tokenizer.pad_token_id,
                )
            text = tokenizer.batch_decode(answers, skip_special_tokens=True)
            for t, rows in self._task_rows(batch):
                picked = rows.nonzero().flatten().tolist()
                scores.update(t, [text[i] for i in picked], [batch["references"][i] for i in picked])
            return
        for t, rows, logits in self._batch_logits(self._eval_tensors, batch):
            scores.update(t, logits.argmax(-1), batch["labels"][rows])

    def on_validation_epoch_end(self) -> None:
        merged = {self.tasks[i]: s for i, s in self.val_scores.compute().items()}
        self.val_scores.reset()
        self._eval_tensors = None
        report = self._report(merged)
        stage = "test" if self.trainer.testing else "val"
        for task, row in report["tasks"].items():
            self.log(f"{stage}/{task}/{row['metric']}", row["merged"])
            self.log(f"{stage}/{task}/expert_{row['metric']}", row["expert"])
            self.log(f"{stage}/{task}/normalized", row["normalized"])
        if report["tasks"]:
            self.log(f"{stage}/normalized", report["average"]["normalized"], prog_bar=True)
        if not self.trainer.sanity_checking:
            self.last_merged_scores = (self.trainer.global_step, merged)

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    @torch.no_grad()
    def evaluate(self, split: Literal["eval", "tuning"] = "eval") -> dict:
        """The report at the current coefficients (this process only). ``eval``: the scored rows,
        reusing the last validation when it was run at this very step. ``tuning``: the labelled
        validation rows (``val_files``), merged against each expert on those same rows, where
        training-free methods choose their settings."""
        dm = self._datamodule()
        if split == "tuning":
            if dm.tuning_rows is None:
                raise ValueError(
                    "no labelled validation rows: give every task val_files to choose settings on"
                )
            return build_report(
                self.tuning_expert_scores(), self._merged_scores(dm.tuning_rows), dm.metrics, self.method
            )
        step = self.trainer.global_step
        if self.last_merged_scores is not None and self.last_merged_scores[0] == step:
            merged = self.last_merged_scores[1]
        else:
            merged = {} if dm.eval_rows is None else self._merged_scores(dm.eval_rows)
        return self._report(merged)

    def _merged_scores(self, rows: Dataset) -> dict[str, float]:
        scores = self._new_scores(sync_on_compute=False).to(self.device)
        self._eval_tensors = self.merged_tensors()
        for batch in self._datamodule().ordered_dataloader(rows, shortest_first=True):
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            self._score_batch(batch, scores)
        self._eval_tensors = None
        return {self.tasks[i]: s for i, s in scores.compute().items()}

    @torch.no_grad()
    def tuning_expert_scores(self) -> dict[str, float]:
        """Each expert's score on its own task's validation rows (computed once, cached on disk)."""
        if self._tuning_expert_scores is not None:
            return self._tuning_expert_scores
        self.prepare_teachers()
        dm = self._datamodule()
        cache = TeacherCache(self.hparams.teacher_cache)
        scores = self._new_scores(sync_on_compute=False)
        eos, pad = dm.tokenizer.eos_token_id, dm.tokenizer.pad_token_id
        for dm_id, name in enumerate(dm.task_names):
            t = self.tasks.index(name)
            rows = _rows_of(dm.tuning_rows, dm_id)
            width = self.hparams.max_new_tokens
            answers = [f"answers:{width}:{eos}"] if self.generative else []
            key = self._teacher_key(name, rows, None, "validation", *answers)
            outputs = cache.load(key)
            if outputs is None:
                if self.generative:
                    tensors = expert_tensors(self.frozen.base_tensors(), self.frozen.task_vectors(), t)
                    with self._low_rank(t):
                        generated = expert_generations(
                            self.frozen.skeleton, tensors, dm.ordered_dataloader(rows), width, eos, pad,
                            f"expert {name}: validation", show_progress(self.trainer),
                        )  # fmt: skip
                    outputs = {"answer_ids": generated["answer_ids"]}
                else:
                    _check_labels(name, rows["labels"], self.frozen.num_classes(t))
                    outputs = {
                        "predictions": self._expert_logprobs(
                            t, dm, rows, f"expert {name}: validation"
                        ).argmax(-1)
                    }
                if self.trainer.is_global_zero:
                    cache.save(key, outputs)
            if self.generative:
                text = dm.tokenizer.batch_decode(outputs["answer_ids"], skip_special_tokens=True)
                scores.update(t, text, rows["reference"])
            else:
                scores.update(t, outputs["predictions"], torch.tensor(rows["labels"]))
        self._tuning_expert_scores = {self.tasks[i]: s for i, s in scores.compute().items()}
        return self._tuning_expert_scores

    # ------------------------------------------------------------------ outputs
    def coefficient_table(self) -> dict | None:
        """What ``coefficients.json`` holds: one row per task, one column per group (None for a
        training-free method, which has no coefficients of its own)."""
        if self.static_merge is not None:
            return None
        return {
            "objective": self.hparams.objective,
            "granularity": self.hparams.granularity,
            "task_vectors": self.hparams.task_vector_transform,
            "tasks": list(self.tasks),
            "groups": list(self.layout.groups),
            "clamp": self.hparams.clamp,
            "values": self.merge_coefficients().detach().cpu().tolist(),
        }

    @torch.no_grad()
    def merged_models(self):
        """Yield (folder inside ``merged/``, plain ``transformers`` model): per task, the merged
        backbone + that task's head; for causal LMs the one merged model, in ``merged/`` itself."""
        merged = self.merged_tensors()
        merged.update(self._low_rank_merged_weights(merged))
        if self.generative:
            config = self.frozen.configs[self.tasks[0]]
            yield "", build_model(self.frozen.skeleton, merged, config, KIND_CLASS["causal_lm"])
            return
        for t, task in enumerate(self.tasks):
            tensors = {**merged, **self.frozen.head(t)}
            yield task, build_model(self.frozen.skeleton, tensors, self.frozen.configs[task])

    def _low_rank_merged_weights(self, dense: dict[str, Tensor]) -> dict[str, Tensor]:
        """LoRA targets' dense merged weights, ``W + sum_t Gamma_t s_t B_t A_t`` over the ``dense``
        merge ``W`` (or the base's): for export only, the merge itself never forms them."""
        stacks = self.frozen.low_rank.stacks()
        params = dict(self.frozen.skeleton.named_parameters())
        gamma, group = self.merge_coefficients(), self.layout.group_of
        return {
            name: merged_weight(dense.get(name, params[name]), stack, gamma[:, group[name]])
            for name, stack in stacks.items()
        }

    # ------------------------------------------------------------------ checkpoints
    def _fingerprints(self) -> dict[str, str]:
        """Base, experts and the merge's inputs: what a checkpoint's coefficients belong to."""
        rows = self._datamodule().train_rows
        return {**self.frozen.fingerprints, "data": token_fingerprint(rows["input_ids"])}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["divmerge"] = {
            "fingerprints": self._fingerprints(),
            "groups": list(self.layout.groups),
            "settings": merge_settings(self.hparams),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("divmerge")
        if saved is None or self.frozen is None:
            return
        # the CLI checked this before any model loaded; here for Trainer.fit(ckpt_path=...) in code
        differences = settings_differences(saved_settings(checkpoint), merge_settings(self.hparams))
        if differences:
            raise settings_error("given to fit", differences)
        now = self._fingerprints()
        for role, digest in saved["fingerprints"].items():
            if now.get(role) != digest:
                what = (
                    "the merge's inputs (data.tasks files or num_samples)"
                    if role == "data"
                    else (f"{role!r} ({str(self.frozen.paths.get(role, '?'))!r})")
                )
                raise ValueError(
                    f"checkpoint was made with other weights or data: {what} changed since; resuming "
                    "would continue coefficients learned for something else; start a new run instead"
                )


def _check_labels(task: str, labels: list[int], num_classes: int) -> None:
    bad = sorted({y for y in labels if not 0 <= y < num_classes})
    if bad:
        raise ValueError(
            f"task {task!r}: eval label(s) {bad[:5]} outside 0..{num_classes - 1}, the classes of "
            f"expert {task!r}'s head; check label_field and that labels are mapped as in fine-tuning"
        )


def _rows_of(rows: Dataset, task_id: int) -> Dataset:
    ids = rows["task_id"]
    return rows.select([i for i, t in enumerate(ids) if t == task_id])


def interleave_shares(gathered: Tensor, rows: int) -> Tensor:
    """``[W, ceil(n / W), ...]`` shares (rank r held rows r, r + W, ...) back into row order,
    without the padding of the last share."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:rows]
