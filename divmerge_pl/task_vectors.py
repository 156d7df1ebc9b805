"""The frozen side of a merge: the base model, every expert as a task vector, the heads.

Held as buffers of one module so they move with the LightningModule, and never written to a
checkpoint (a requeued job writes kilobytes, not the model). Everything here is fixed when it
is built: which vectors the learned merge combines (the experts' own, or their TIES/DARE
versions) is a construction argument, and a training-free method's result is a separate
``FixedDelta``. LoRA experts stay factors, except where a merge needs each entry of their
task vectors (TIES, DARE): those read them dense, one target at a time, and hold the result
dense. The merged weights themselves come from ``merged.py`` / ``on_demand.py`` /
``low_rank.py``, called through the methods below so the module never reaches into the buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .coefficients import CoefficientLayout
from .experts import LoadedExperts
from .low_rank import DenseTaskVectors, LowRankExperts, low_rank_added, merged_weight
from .merged import expert_tensor, expert_tensors, forward_logits, merge_tensor, merge_tensors
from .on_demand import MakeTensor, merged_on_demand, nan_like
from .sharding import Sharding
from .static_merges import StaticMerge, TaskVectors

DENSE_NOTE = (
    "the LoRA experts' task vectors are made dense, one target at a time ({what} needs each "
    "entry); the result holds {held} per LoRA target, as for full experts"
)


class FrozenExperts(nn.Module):
    """Base weights plus stacked task vectors (dense, or LoRA factors) and per-task heads."""

    def __init__(
        self,
        loaded: LoadedExperts,
        vector_dtype: torch.dtype = torch.float32,
        transform: Callable[[TaskVectors], dict[str, Tensor] | None] | None = None,
        sharding: Sharding | None = None,
    ) -> None:
        """``transform``: the vectors the learned merge combines instead of the experts' own task
        vectors (TIES/DARE-processed, AdaMerging++ style; None: the own), from every merged
        tensor's dense task vectors; teachers always use the experts' own. ``sharding``: the
        task vectors were loaded as this process's part (``load_experts(keep=...)``); the base
        is cut here, and every weight is gathered per module, just before it runs."""
        super().__init__()
        self.kind = loaded.kind
        self.tasks = loaded.tasks
        self.configs = loaded.configs
        self.paths = loaded.paths
        self.fingerprints = loaded.fingerprints
        self.base_model = loaded.base_model
        self.names = list(loaded.task_vectors)
        for i, stacked in enumerate(loaded.task_vectors.values()):
            self.register_buffer(f"tau_{i}", stacked.to(vector_dtype), persistent=False)
        self.low_rank = LowRankExperts(loaded.low_rank, vector_dtype)  # LoRA experts, as factors
        self.told_dense: set[str] = set()  # methods whose log said they make LoRA targets dense
        merge_vectors = None if transform is None else transform(self.dense_task_vectors())
        self.has_merge_vectors = merge_vectors is not None
        # the tensors the learned merge combines dense: LoRA targets too, when transformed
        self.merge_names = self.names if merge_vectors is None else list(merge_vectors)
        for i, name in enumerate(self.merge_names if merge_vectors is not None else []):
            self.register_buffer(f"merge_tau_{i}", merge_vectors[name], persistent=False)
        if merge_vectors is not None and self.low_rank.names:
            rank_zero_info(f"task_vector_transform: {DENSE_NOTE.format(what='it', held='N dense tensors')}")
        self.head_names = [list(h) for h in loaded.heads.values()]
        for t, head in enumerate(loaded.heads.values()):
            for j, tensor in enumerate(head.values()):
                self.register_buffer(f"head_{t}_{j}", tensor, persistent=False)
        self.sharding = sharding
        self.shapes: dict[str, torch.Size] = {}  # sharded mode: each sharded tensor's whole shape
        self.sharded_names: list[str] = []
        if sharding is not None:
            self._shard_base(sharding)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forget_own_missing_keys)

    def _shard_base(self, sharding: Sharding) -> None:
        """Keep this process's part of every base tensor but the heads (they stay whole: each is
        one task's), and free the whole: the base's parameter becomes a NaN placeholder."""
        heads = {name for names in self.head_names for name in names}
        params = dict(self.base_model.named_parameters())  # a tied tensor once
        self.sharded_names = [name for name in params if name not in heads]
        for i, name in enumerate(self.sharded_names):
            param = params[name]
            self.shapes[name] = param.shape
            self.register_buffer(f"base_{i}", sharding.local(param.detach()), persistent=False)
            # made on the device it will run on: moving a stride-0 tensor would make it whole
            param.data = nan_like(param, sharding.device)

    def held_bytes(self) -> int:
        """Bytes of every tensor this process holds for the frozen side (each storage once)."""
        seen: dict[int, int] = {}
        for tensor in [*self.parameters(), *self.buffers()]:
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def train(self, mode: bool = True) -> FrozenExperts:
        return super().train(False)  # teachers were computed without dropout: so is the merge

    @property
    def is_causal_lm(self) -> bool:
        """Causal LM experts: answers are generated and the whole model, LM head too, is merged."""
        return self.kind == "causal_lm"

    def base_tensors(self, names: Iterable[str] | None = None) -> dict[str, Tensor]:
        """The base's tensors of ``names`` (default: those with dense task vectors)."""
        names = self.names if names is None else names
        if self.sharding is not None:  # whole, gathered
            return {name: self._gather(self._base_part(name), name) for name in names}
        params = dict(self.base_model.named_parameters())
        return {name: params[name] for name in names}

    def _base_part(self, name: str) -> Tensor:
        return getattr(self, f"base_{self.sharded_names.index(name)}")

    def _gather(self, part: Tensor, name: str) -> Tensor:
        return self.sharding.gather(part, self.shapes[name])

    def merged_names(self) -> list[str]:
        """Every merged tensor, dense or low-rank (LoRA targets), in model order."""
        merged = set(self.names) | set(self.low_rank.names)
        if len(merged) == len(self.names):
            return list(self.names)
        return [name for name, _ in self.base_model.named_parameters() if name in merged]

    def rows(self) -> dict[str, int]:
        """Each merged tensor's number of rows (first dimension): the channel layout's columns."""
        params = dict(self.base_model.named_parameters())
        return {name: (self.shapes.get(name) or params[name].shape)[0] for name in self.merged_names()}

    def summary(self) -> str:
        """What is merged, for the log."""
        dense = sum(getattr(self, f"tau_{i}")[0].numel() for i in range(len(self.names)))
        total = sum(p.numel() for p in self.base_model.parameters())
        where = ""
        if self.sharding is not None:
            dense *= self.sharding.world  # about: the parts differ by a row
            where = f"; base and task vectors sharded across {self.sharding.world} processes"
        return (
            f"{len(self.tasks)} experts ({self.kind}); merging {len(self.merged_names())} tensors "
            f"({dense / 1e6:.2f}M dense of {total / 1e6:.2f}M parameters; tensors equal in base and "
            f"every expert stay the base's{where})"
        )

    def task_vectors(self) -> dict[str, Tensor]:
        """The experts' own task vectors (teachers and expert scores always use these)."""
        return {name: getattr(self, f"tau_{i}") for i, name in enumerate(self.names)}

    def merge_vectors(self) -> dict[str, Tensor]:
        """The vectors the learned merge combines."""
        if not self.has_merge_vectors:
            return self.task_vectors()
        return {name: getattr(self, f"merge_tau_{i}") for i, name in enumerate(self.merge_names)}

    def dense_task_vectors(self) -> DenseTaskVectors:
        """Every merged tensor's task vectors, LoRA targets' made dense when each is read."""
        return DenseTaskVectors(
            self.task_vectors(), self.low_rank.stacks(), len(self.tasks), self.merged_names()
        )

    def head(self, task_index: int) -> dict[str, Tensor]:
        return {
            name: getattr(self, f"head_{task_index}_{j}")
            for j, name in enumerate(self.head_names[task_index])
        }

    def num_classes(self, task_index: int) -> int:
        return int(self.configs[self.tasks[task_index]].num_labels)

    # ---------------------------------------------------------------- merged weights
    def merged(self, gamma: Tensor, layout: CoefficientLayout) -> dict[str, Tensor]:
        """Every dense merged tensor at ``gamma`` [tasks x groups], differentiable in it (sharded:
        every sharded tensor, gathered whole)."""
        if self.sharding is not None:
            make = self.merge_at(gamma, layout)
            return {name: make(name) for name in self.sharded_names}
        return merge_tensors(self.base_tensors(self.merge_names), self.merge_vectors(), gamma, layout)

    def merge_at(self, gamma: Tensor, layout: CoefficientLayout) -> MakeTensor:
        """One dense merged tensor at a time, for the merge on demand (of ``merge_names``; sharded:
        each process merges its part, gathered)."""
        vectors, group = self.merge_vectors(), layout.group_of
        if self.sharding is not None:
            sharding = self.sharding

            def merge(name: str, part: Tensor) -> Tensor:
                own = gamma[:, group[name]]  # a channel layout's rows are cut as the tensor's
                return merge_tensor(part, vectors[name], own if own.dim() == 1 else sharding.part(own, 1))

            return self._sharded(vectors, merge)
        base = self.base_tensors(self.merge_names)
        return lambda name: merge_tensor(base[name], vectors[name], gamma[:, group[name]])

    def expert_at(self, task_index: int) -> MakeTensor:
        """Expert ``task_index``'s own dense tensors, one at a time."""
        vectors = self.task_vectors()
        if self.sharding is not None:
            return self._sharded(vectors, lambda name, part: expert_tensor(part, vectors[name], task_index))
        base = self.base_tensors()
        return lambda name: expert_tensor(base[name], vectors[name], task_index)

    def _sharded(self, vectors: dict[str, Tensor], combine: Callable[[str, Tensor], Tensor]) -> MakeTensor:
        """Sharded mode's ``make``: ``combine`` on this process's part of a tensor of ``vectors``
        (the base's part alone for the others), gathered whole."""

        def make(name: str) -> Tensor:
            part = self._base_part(name)
            return self._gather(combine(name, part) if name in vectors else part, name)

        return make

    def expert(self, task_index: int) -> dict[str, Tensor]:
        if self.sharding is not None:
            make = self.expert_at(task_index)
            return {name: make(name) for name in self.sharded_names}
        return expert_tensors(self.base_tensors(), self.task_vectors(), task_index)

    def on_demand(self, make: MakeTensor, names: Iterable[str] | None = None) -> AbstractContextManager[None]:
        """Forwards inside run each module with ``make``'s tensors of ``names`` (default: those
        with dense task vectors; ``merge_names`` for ``merge_at``), built just before it.
        Sharded: every sharded tensor, whatever ``names``."""
        if self.sharding is not None:
            names = self.sharded_names
        return merged_on_demand(self.base_model, make, self.names if names is None else names)

    @torch.no_grad()
    def on_demand_works(self, make: MakeTensor, inputs: dict[str, Tensor], names: Iterable[str]) -> bool:
        """Whether merging module by module suits this model: a few rows' logits come out
        finite (a weight read outside its own module reads NaN)."""
        with self.on_demand(make, names):
            logits = forward_logits(self.base_model, self.head(0), inputs)
        if bool(torch.isfinite(logits).all()):
            return True
        rank_zero_warn(
            "model.merge_on_demand: this model reads some weight outside its own module's forward "
            "(its logits are not finite when merged weights exist only inside their modules), so "
            "each step builds the whole merged model instead (one more copy of the model in "
            "memory). Set model.merge_on_demand: false to skip this check."
        )
        return False

    def low_rank_at(self, gamma: Tensor | None, layout: CoefficientLayout) -> AbstractContextManager[None]:
        """Forwards inside add the LoRA experts' merge at ``gamma`` (nothing without LoRA experts,
        at None, or when the learned merge holds them dense, transformed)."""
        if gamma is None or self.has_merge_vectors:
            return nullcontext()
        group = layout.group_of
        return low_rank_added(self.base_model, self.low_rank.stacks(), lambda name: gamma[:, group[name]])

    def low_rank_of_expert(self, task_index: int, device: torch.device) -> AbstractContextManager[None]:
        """Forwards inside add expert ``task_index``'s own LoRA update."""
        own = torch.zeros(len(self.tasks), device=device)
        own[task_index] = 1.0
        return low_rank_added(self.base_model, self.low_rank.stacks(), lambda _name: own)

    def low_rank_dense(
        self, dense: dict[str, Tensor], gamma: Tensor | None, layout: CoefficientLayout
    ) -> dict[str, Tensor]:
        """LoRA targets' dense merged weights, ``W + sum_t Gamma_t s_t B_t A_t`` over the ``dense``
        merge ``W`` (or the base's): for export only, the merge itself never forms them. None
        (as in ``low_rank_at``): ``dense`` holds them already."""
        if gamma is None or self.has_merge_vectors:
            return {}
        params = dict(self.base_model.named_parameters())
        group = layout.group_of
        return {
            name: merged_weight(dense.get(name, params[name]), stack, gamma[:, group[name]])
            for name, stack in self.low_rank.stacks().items()
        }

    def fixed_merge(self, merge: StaticMerge) -> FixedDelta:
        """A training-free method's result. Over LoRA experts, a linear one (average, task
        arithmetic) keeps their factors, merged at its weights; one that needs each entry (TIES,
        DARE) reads them dense, one target at a time, and its result holds them dense."""
        if not self.low_rank.names:
            return FixedDelta(merge.merge(self.task_vectors()))
        weights = merge.task_weights(len(self.tasks))
        if weights is not None:
            device = next(self.low_rank.buffers()).device
            return FixedDelta(merge.merge(self.task_vectors()), weights.to(device))
        if merge.name not in self.told_dense:  # once, not at every point of a validation grid
            self.told_dense.add(merge.name)
            rank_zero_info(f"{merge.name}: {DENSE_NOTE.format(what=merge.name, held='one dense tensor')}")
        return FixedDelta(merge.merge(self.dense_task_vectors()))


class FixedDelta(nn.Module):
    """A training-free method's result, ``theta0 + delta``, and the per-task weights its LoRA
    factors are merged at (None when ``delta`` holds their targets): buffers, so they move
    with the model."""

    def __init__(self, delta: dict[str, Tensor], low_rank_weights: Tensor | None = None) -> None:
        super().__init__()
        self.names = list(delta)
        for i, tensor in enumerate(delta.values()):
            self.register_buffer(f"delta_{i}", tensor, persistent=False)
        self.register_buffer("low_rank_weights", low_rank_weights, persistent=False)

    def merged(self, base: dict[str, Tensor]) -> dict[str, Tensor]:
        deltas = (getattr(self, f"delta_{i}") for i in range(len(self.names)))
        return {name: base[name] + d.to(base[name].dtype) for name, d in zip(self.names, deltas, strict=True)}

    def low_rank_gamma(self, num_groups: int) -> Tensor | None:
        """The LoRA factors' coefficients [tasks x groups] (None: merged dense in ``delta``)."""
        weights = self.low_rank_weights
        return None if weights is None else weights[:, None].expand(-1, num_groups)


SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_strategy(strategy: Strategy) -> None:
    """Refuse the strategies that shard parameters before any model loads: the frozen side is not
    parameters, and the checkpoint holds Gamma alone (FSDP's state-dict hooks expect the frozen
    tensors in it and fail at the first checkpoint); ``TaskVectorSharding`` shards the frozen side."""
    if isinstance(strategy, SHARDED_STRATEGIES):
        raise ValueError(
            f"trainer.strategy {type(strategy).__name__} shards trainable parameters, but a merge "
            "trains only its coefficients: to hold 1/W of the base and task vectors per process, use "
            "task_vector_sharding (configs/sharded.yaml); or ddp (configs/ddp.yaml), or one device."
        )


def _drop_own_keys(module: nn.Module, state: dict, prefix: str, _meta: Any) -> None:
    for key in [k for k in state if k.startswith(prefix)]:
        del state[key]


def _forget_own_missing_keys(module: nn.Module, incompatible: Any) -> None:
    own = {f"base_model.{n}" for n in module.base_model.state_dict()}
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if not any(k.endswith(o) for o in own)
    ]
