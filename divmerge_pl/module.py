"""DivMergeModule: frozen experts, learnable merge coefficients, the divergence objective.

The only trainable state is Gamma [tasks x groups]. Experts are loaded in ``setup`` (after
``prepare_data``, so a datamodule may build them first) and are never written to checkpoints.
The frozen side lives in ``task_vectors.py``, what differs between classification and causal LM
experts in ``kinds.py``, the teachers' targets in ``teachers.py``, scoring in ``evaluation.py``,
checkpoint checks in ``resume.py``: this module is the hooks, Gamma, the optimizer and the loss.
A training-free method (``static_method``) replaces Gamma by its fixed result.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from .arguments import check_arguments
from .coefficients import DEFAULT_BLOCK_PATTERN, Granularity, build_layout, initial_coefficients
from .data import MODEL_INPUTS, BatchIndex, MergeDataModule, checked_datamodule
from .divergences import batch_objective, get_objective, relative_weights
from .evaluation import Evaluation, mean_divergences
from .experts import load_experts
from .finite import FiniteGuard, defers_check
from .kinds import TaskKind, check_data_labels, check_prompts, task_kind
from .lora import check_with_adapters
from .methods import StaticMethod
from .metrics import TaskScores
from .quiet import follow_trainer
from .reports import coefficient_table
from .resume import check_checkpoint, checkpoint_record
from .selection import choose_settings
from .sharding import sharding_for
from .static_merges import StaticMerge, transformed_vectors
from .task_vectors import FixedDelta, FrozenExperts, check_strategy
from .teachers import DEFAULT_CACHE, Teachers, token_fingerprint

__all__ = ["DivMergeModule", "FrozenExperts", "check_strategy"]


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
        task_vector_transform: Literal["none", "ties", "dare", "tsv"] = "none",
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
        static_method: StaticMethod | None = None,
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
            task_vector_transform: learn coefficients over ``ties`` (trimmed, sign-elected),
                ``dare`` (randomly dropped, rescaled) or ``tsv`` (each matrix's top 1/N singular
                vectors, made orthogonal across tasks) task vectors instead of the raw ones
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
            static_method: a training-free method of the registry (``methods.py``; what
                ``divmerge-pl merge --method average|task_arithmetic|ties|dare`` sets) instead of
                learned coefficients: the merge is its result, its settings chosen from its grid on
                the labelled validation rows when the tasks have some. None: learn (``fit``).
        """
        super().__init__()
        self.save_hyperparameters(ignore="static_method")
        # as plain data (its registry fields), as in config.yaml: hparams.yaml and recipes stay plain YAML
        self.save_hyperparameters({"static_method": None if static_method is None else asdict(static_method)})
        check_arguments(self.hparams)
        if task_weighting == "relative":  # checkpointed: a resumed run keeps the first run's weights
            self.register_buffer("start_divergence", torch.full((len(experts),), float("nan")))
        self.objective = get_objective(objective)
        self.static_method = static_method
        # the training-free merge at its current settings (choose_settings may replace them)
        self.static_merge: StaticMerge | None = None if static_method is None else static_method.build()
        self.selection: dict[str, Any] | None = None  # how static_merge's settings were chosen
        self.restored: dict[str, Any] | None = None  # see restore_coefficients
        self.frozen: FrozenExperts | None = None
        self.kind: TaskKind | None = None  # classification or causal LM, chosen once the experts load
        self.teachers: Teachers | None = None  # built at the start of fit / validate / test
        self.coefficients: nn.Parameter | None = None
        self.layout = None
        self.fixed_delta: FixedDelta | None = None  # static_merge's result, once the experts load
        self.val_scores: TaskScores | None = None
        self.evaluation: Evaluation | None = None  # scores, once the experts load
        self.on_demand_ok = False  # set by prepare_teachers, once checked on this model
        self.gathered: dict[str, Tensor] | None = None  # sharded mode: see gathered_merge
        self.expert_of: tuple[int, ...] = ()  # datamodule task id -> expert index, set by prepare_teachers
        self.finite = FiniteGuard(self.tasks, objective)  # replaced by configure_optimizers

    # ------------------------------------------------------------------ set-up
    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.hparams.experts)

    @property
    def is_causal_lm(self) -> bool:
        return self.frozen is not None and self.frozen.is_causal_lm

    @property
    def expert_scores(self) -> dict[str, float]:
        """Each expert's score on its own task's scored rows (known once the teachers are)."""
        return {} if self.teachers is None else self.teachers.expert_scores

    def merge_datamodule(self) -> MergeDataModule:
        """The Trainer's datamodule, checked to be a ``MergeDataModule`` with this merge's tasks."""
        return checked_datamodule(getattr(self.trainer, "datamodule", None), self.tasks)

    @override
    def prepare_data(self) -> None:
        follow_trainer(self._trainer)  # a Hub model's download bars too (None: called from Python)
        # before the datamodule reads and tokenises anything: paths, configs, weight formats and
        # tensor shapes (safetensors headers) fail in a second, not after the data is ready
        hp = self.hparams
        checked = check_with_adapters(hp.base, dict(hp.experts), hp.allow_pickle)
        check_data_labels(checked, getattr(self.trainer, "datamodule", None))  # class ids are read too

    @override
    def setup(self, stage: str) -> None:
        follow_trainer(self.trainer)  # weights are loaded and written with the Trainer's bars or none
        check_strategy(self.trainer.strategy)
        if stage == "fit" and self.static_method is not None:
            raise ValueError(
                f"model.static_method {self.static_method.name!r} is training-free: it has no "
                "coefficients to fit; run it with divmerge-pl merge (or validate / test)"
            )
        dm = self.merge_datamodule()  # task names checked before any model is loaded
        self.load_experts()
        check_prompts(self.frozen.kind, dm.is_causal_lm)

    def load_experts(self) -> None:
        """Load and check base and experts, and create Gamma (idempotent)."""
        if self.frozen is not None:
            return
        h = self.hparams
        dtype = getattr(torch, h.task_vector_dtype)
        sharding = sharding_for(self._trainer, h, self.static_method)
        keep = None if sharding is None else sharding.part
        loaded = load_experts(h.base, dict(h.experts), dtype, allow_pickle=h.allow_pickle, keep=keep)
        transform = None
        if self.static_merge is None:
            settings = (h.task_vector_transform, h.density, h.trim_scope, h.drop_rate, h.transform_seed)
            transform = lambda vectors: transformed_vectors(vectors, *settings)  # noqa: E731
        self.frozen = FrozenExperts(loaded, dtype, transform, sharding)
        self.kind = task_kind(self)
        self.val_scores = self.kind.new_scores(self.merge_datamodule())  # a val / test epoch's, synced
        self.evaluation = Evaluation(self)
        if self.static_merge is not None:
            self.set_static_merge(self.static_merge)
        self.layout = build_layout(
            self.frozen.merged_names(), h.granularity, h.block_pattern, self.frozen.rows()
        )
        self.coefficients = nn.Parameter(initial_coefficients(len(self.tasks), self.layout.width, h.init))
        rank_zero_info(
            f"DivMerge: {self.frozen.summary()}, {self.layout.num_groups} coefficient group(s) "
            f"per task ({h.granularity}"
            + (f": {self.layout.width} rows)" if self.layout.num_columns else ")")
        )

    def set_static_merge(self, merge: StaticMerge) -> None:
        """Fix the merge to ``merge``'s result (the experts loaded): how ``choose_settings`` tries
        each setting of the training-free method; scores of an earlier merge are forgotten."""
        self.static_merge = merge
        self.fixed_delta = self.frozen.fixed_merge(merge)
        self.evaluation.last_merged_scores = None

    @torch.no_grad()
    def restore_coefficients(self, values: Tensor, why: dict[str, Any]) -> None:
        """End with ``values``, the coefficients of an earlier step (``why``: which and how it was
        chosen, reported in ``report.json``); scores of the current ones are forgotten."""
        self.coefficients.copy_(values.to(self.coefficients.device, self.coefficients.dtype))
        self.restored = why
        self.evaluation.last_merged_scores = None

    # ------------------------------------------------------------------ teachers
    @override
    def on_fit_start(self) -> None:
        self.prepare_teachers()
        if self.hparams.task_weighting == "relative" and bool(self.start_divergence.isnan().any()):
            self.start_divergence.copy_(mean_divergences(self, self.merge_datamodule()))

    def task_weights(self) -> Tensor | None:
        """The objective's per-task weights (None: the paper's plain sum)."""
        if self.hparams.task_weighting != "relative":
            return None
        return relative_weights(self.start_divergence)

    @override
    def on_validation_start(self) -> None:
        self.prepare_teachers()
        self.choose_static_settings()

    @override
    def on_test_start(self) -> None:
        self.prepare_teachers()
        self.choose_static_settings()

    def prepare_teachers(self) -> None:
        """Compute (or load from cache) every expert's outputs on its own task's rows, once."""
        if self.teachers is not None:
            return
        dm = self.merge_datamodule()
        self.expert_of = tuple(self.tasks.index(name) for name in dm.task_names)
        self.on_demand_ok = self._on_demand_works(dm)
        self.teachers = self.kind.build_teachers(dm)

    def choose_static_settings(self) -> None:
        """A training-free method's settings, chosen once (on the labelled validation rows when
        the tasks have some), once the teachers are ready."""
        if self.static_method is not None and self.selection is None:
            has_validation = self.merge_datamodule().tuning_rows is not None
            self.selection = choose_settings(self, self.static_method, has_validation)

    # ------------------------------------------------------------------ the merge
    def merge_coefficients(self) -> Tensor:
        """The coefficients the merge uses: Gamma, clipped to ``clamp`` when one is set (the
        gradient is zero outside the range, as in AdaMerging's code)."""
        clamp = self.hparams.clamp
        return self.coefficients if clamp is None else self.coefficients.clamp(*clamp)

    def merged_tensors(self) -> dict[str, Tensor]:
        """Merged dense tensors at the current coefficients (differentiable in Gamma), or the
        fixed result of a training-free method."""
        if self.fixed_delta is not None:
            return self.fixed_delta.merged(self.frozen.base_tensors(self.fixed_delta.names))
        if self.gathered is not None:
            return self.gathered
        return self.frozen.merged(self.merge_coefficients(), self.layout)

    @contextmanager
    def gathered_merge(self) -> Iterator[None]:
        """Sharded mode: the merged model gathered once, on every process, for what rank 0 alone
        then reads inside the block (the export and its report); elsewhere a no-op."""
        if self.frozen.sharding is None or self.fixed_delta is not None:
            yield
            return
        with torch.no_grad():
            self.gathered = self.frozen.merged(self.merge_coefficients(), self.layout)
        try:
            yield
        finally:
            self.gathered = None

    def low_rank_coefficients(self) -> Tensor | None:
        """The LoRA factors' coefficients: Gamma, or a training-free method's fixed weights (None
        when its result holds the LoRA targets dense)."""
        if self.fixed_delta is not None:
            return self.fixed_delta.low_rank_gamma(self.layout.width)
        return self.merge_coefficients()

    def low_rank(self):
        """Forwards inside add the LoRA experts' merge (at the current coefficients)."""
        return self.frozen.low_rank_at(self.low_rank_coefficients(), self.layout)

    def merged_divergences(self, batch: dict[str, Tensor]) -> list[tuple[int, Tensor]]:
        """``(task, objective per row)`` of the merged model, merged on demand when it can be."""
        with self.low_rank():
            if self.on_demand_ok:
                make = self.frozen.merge_at(self.merge_coefficients(), self.layout)
                with self.frozen.on_demand(make, self.frozen.merge_names):
                    return self.kind.row_divergences({}, batch)
            return self.kind.row_divergences(self.merged_tensors(), batch)

    def _on_demand_works(self, dm: MergeDataModule) -> bool:
        """Whether merging module by module suits this model (checked once per fit)."""
        if not self.hparams.merge_on_demand or self.fixed_delta is not None:
            return False
        batch = next(iter(dm.ordered_dataloader(dm.train_rows)))
        inputs = {k: batch[k][:4].to(self.device) for k in MODEL_INPUTS if k in batch}
        with self.low_rank():
            make = self.frozen.merge_at(self.merge_coefficients(), self.layout)
            works = self.frozen.on_demand_works(make, inputs, self.frozen.merge_names)
        if not works and self.frozen.sharding is not None:
            raise ValueError(
                "trainer.strategy task_vector_sharding: this model reads some weight outside its own "
                "module's forward, so its weights cannot be gathered module by module; use ddp"
            )
        return works

    def batch_index(self, batch: dict[str, Any]) -> BatchIndex:
        """Where each task's rows are: the collate's ``index``, or, for a batch made by hand, built
        from its ``task_id`` and ``row_id`` (a host sync when those are on an accelerator)."""
        if "index" in batch:
            return batch["index"]
        task_ids = batch["task_id"]
        index = BatchIndex.of(task_ids.tolist(), batch["row_id"].tolist())
        index.rows = tuple(rows.to(task_ids.device) for rows in index.rows)
        return index

    def task_rows(self, batch: dict[str, Any]):
        """``(expert index, positions of its rows)`` for every task present in ``batch``, in expert
        order; read from the host-side ``BatchIndex``, so nothing waits on the device."""
        index = self.batch_index(batch)
        experts = [self.expert_of[t] for t in index.task_ids]
        yield from sorted(zip(experts, index.rows, strict=True), key=lambda pair: pair[0])

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.finite.check_every(self.global_step)
        name = self.hparams.objective
        task_sums: dict[int, Tensor] = {}
        counts = torch.zeros(len(self.tasks), device=self.device)
        for t, per_row in self.merged_divergences(batch):
            task_sums[t], counts[t] = per_row.sum(), per_row.numel()
            self.log(f"train/{name}/{self.tasks[t]}", per_row.mean(), batch_size=per_row.numel())
        zero = torch.zeros((), device=self.device)
        sums = torch.stack([task_sums.get(t, zero) for t in range(len(self.tasks))])
        world = self.trainer.world_size
        if world > 1:  # each task's mean over the global batch, whatever share of it this rank holds
            counts = self.all_gather(counts).sum(dim=0)
        # DDP averages gradients over ranks, hence x world: the sum of per-task means, as on one device
        total = batch_objective(sums, counts, self.task_weights()) * world
        self.finite.record(self.global_step, sums, total)  # never a NaN into the coefficients
        self.log("train/loss", total / world, prog_bar=True, batch_size=len(batch["task_id"]))
        # the epoch mean, for EarlyStopping(monitor="train/epoch_loss", check_on_train_epoch_end=True)
        self.log(
            "train/epoch_loss", total / world, on_step=False, on_epoch=True, batch_size=len(batch["task_id"])
        )
        return total

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        self.finite = FiniteGuard(self.tasks, self.hparams.objective, defers_check(self.device, scaler))
        return torch.optim.Adam([self.coefficients], lr=self.hparams.lr, **self.finite.optimizer_options())

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.finite.skip_if_bad(self.global_step, optimizer)

    @override
    def on_train_epoch_end(self) -> None:
        self.finite.check()

    @override
    def on_train_end(self) -> None:
        self.finite.check()

    # ------------------------------------------------------------------ evaluation
    @override
    def on_validation_epoch_start(self) -> None:
        self.evaluation.start_epoch()

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.evaluation.score_batch(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        self.evaluation.end_epoch()

    # a test epoch scores as a validation epoch: the same (@override-marked) hooks
    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def evaluate(self, split: Literal["eval", "tuning"] = "eval") -> dict:
        """The report at the current coefficients (this process only). ``eval``: the scored rows,
        reusing the last validation or test epoch's scores when it scored them at this very step.
        ``tuning``: the labelled validation rows (``val_files``), merged against each expert on
        those same rows, where training-free methods choose their settings."""
        return self.evaluation.report(split)

    # ------------------------------------------------------------------ outputs
    def coefficient_table(self) -> dict | None:
        """What ``coefficients.json`` holds (None for a training-free method)."""
        return coefficient_table(self)

    def row_coefficients(self) -> dict[str, Tensor] | None:
        """A channel layout's every coefficient, [tasks x rows] per merged tensor (None otherwise:
        ``coefficients.json`` holds them all)."""
        if self.static_merge is not None or not self.layout.num_columns:
            return None
        gamma = self.merge_coefficients().detach().cpu()
        return {name: gamma[:, columns] for name, columns in self.layout.group_of.items()}

    @torch.no_grad()
    def merged_models(self):
        """Yield (folder inside ``merged/``, plain ``transformers`` model): per task, the merged
        backbone + that task's head; for causal LMs the one merged model, in ``merged/`` itself."""
        merged = self.merged_tensors()
        merged.update(self.frozen.low_rank_dense(merged, self.low_rank_coefficients(), self.layout))
        yield from self.kind.merged_models(merged)

    # ------------------------------------------------------------------ checkpoints
    def _fingerprints(self) -> dict[str, str]:
        """Base, experts and the merge's inputs: what a checkpoint's coefficients belong to."""
        rows = self.merge_datamodule().train_rows
        return {**self.frozen.fingerprints, "data": token_fingerprint(rows["input_ids"])}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["divmerge"] = checkpoint_record(self._fingerprints(), self.layout.groups, self.hparams)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("divmerge") is not None and self.frozen is not None:
            check_checkpoint(checkpoint, self.hparams, self._fingerprints(), self.frozen.paths)
