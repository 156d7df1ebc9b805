"""The frozen side of a merge: the base model, every expert as a task vector, the heads.

Held as buffers of one module so they move with the LightningModule, and never written to a
checkpoint (a requeued job writes kilobytes, not the model). Everything here is fixed when it
is built: which vectors the learned merge combines (the experts' own, or their TIES/DARE
versions) is a construction argument, and a training-free method's result is a separate
``FixedDelta``. The merged weights themselves come from ``merged.py`` / ``on_demand.py`` / ``lora.py``,
called through the methods below so the module never reaches into the buffers.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .coefficients import CoefficientLayout
from .experts import LoadedExperts
from .low_rank import LowRankExperts, low_rank_added, merged_weight
from .merged import expert_tensor, expert_tensors, forward_logits, merge_tensor, merge_tensors
from .on_demand import MakeTensor, merged_on_demand


class FrozenExperts(nn.Module):
    """Base weights plus stacked task vectors (dense, or LoRA factors) and per-task heads."""

    def __init__(
        self,
        loaded: LoadedExperts,
        vector_dtype: torch.dtype = torch.float32,
        merge_vectors: dict[str, Tensor] | None = None,
    ) -> None:
        """``merge_vectors``: what the learned merge combines instead of the experts' own task
        vectors (TIES/DARE-processed, AdaMerging++ style); teachers always use the experts' own."""
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
        self.has_merge_vectors = merge_vectors is not None
        for i, name in enumerate(self.names if merge_vectors is not None else []):
            self.register_buffer(f"merge_tau_{i}", merge_vectors[name], persistent=False)
        self.low_rank = LowRankExperts(loaded.low_rank, vector_dtype)  # LoRA experts, as factors
        self.head_names = [list(h) for h in loaded.heads.values()]
        for t, head in enumerate(loaded.heads.values()):
            for j, tensor in enumerate(head.values()):
                self.register_buffer(f"head_{t}_{j}", tensor, persistent=False)
        self.register_state_dict_post_hook(_drop_own_keys)
        self.register_load_state_dict_post_hook(_forget_own_missing_keys)

    def train(self, mode: bool = True) -> FrozenExperts:
        return super().train(False)  # teachers were computed without dropout: so is the merge

    @property
    def is_causal_lm(self) -> bool:
        """Causal LM experts: answers are generated and the whole model, LM head too, is merged."""
        return self.kind == "causal_lm"

    def base_tensors(self) -> dict[str, Tensor]:
        params = dict(self.base_model.named_parameters())
        return {name: params[name] for name in self.names}

    def merged_names(self) -> list[str]:
        """Every merged tensor, dense or low-rank (LoRA targets), in model order."""
        merged = set(self.names) | set(self.low_rank.names)
        if len(merged) == len(self.names):
            return list(self.names)
        return [name for name, _ in self.base_model.named_parameters() if name in merged]

    def summary(self) -> str:
        """What is merged, for the log."""
        dense = sum(getattr(self, f"tau_{i}")[0].numel() for i in range(len(self.names)))
        total = sum(p.numel() for p in self.base_model.parameters())
        return (
            f"{len(self.tasks)} experts ({self.kind}); merging {len(self.merged_names())} tensors "
            f"({dense / 1e6:.2f}M dense of {total / 1e6:.2f}M parameters; tensors equal in base and "
            "every expert stay the base's)"
        )

    def task_vectors(self) -> dict[str, Tensor]:
        """The experts' own task vectors (teachers and expert scores always use these)."""
        return {name: getattr(self, f"tau_{i}") for i, name in enumerate(self.names)}

    def merge_vectors(self) -> dict[str, Tensor]:
        """The vectors the learned merge combines."""
        if not self.has_merge_vectors:
            return self.task_vectors()
        return {name: getattr(self, f"merge_tau_{i}") for i, name in enumerate(self.names)}

    def head(self, task_index: int) -> dict[str, Tensor]:
        return {
            name: getattr(self, f"head_{task_index}_{j}")
            for j, name in enumerate(self.head_names[task_index])
        }

    def num_classes(self, task_index: int) -> int:
        return int(self.configs[self.tasks[task_index]].num_labels)

    # ---------------------------------------------------------------- merged weights
    def merged(self, gamma: Tensor, layout: CoefficientLayout) -> dict[str, Tensor]:
        """Every dense merged tensor at ``gamma`` [tasks x groups], differentiable in it."""
        return merge_tensors(self.base_tensors(), self.merge_vectors(), gamma, layout)

    def merge_at(self, gamma: Tensor, layout: CoefficientLayout) -> MakeTensor:
        """One dense merged tensor at a time, for the merge on demand."""
        base, vectors, group = self.base_tensors(), self.merge_vectors(), layout.group_of
        return lambda name: merge_tensor(base[name], vectors[name], gamma[:, group[name]])

    def expert_at(self, task_index: int) -> MakeTensor:
        """Expert ``task_index``'s own dense tensors, one at a time."""
        base, vectors = self.base_tensors(), self.task_vectors()
        return lambda name: expert_tensor(base[name], vectors[name], task_index)

    def expert(self, task_index: int) -> dict[str, Tensor]:
        return expert_tensors(self.base_tensors(), self.task_vectors(), task_index)

    def on_demand(self, make: MakeTensor) -> AbstractContextManager[None]:
        """Forwards inside run each module with ``make``'s tensors, built just before it."""
        return merged_on_demand(self.base_model, make, self.names)

    @torch.no_grad()
    def on_demand_works(self, make: MakeTensor, inputs: dict[str, Tensor]) -> bool:
        """Whether merging module by module suits this model: a few rows' logits come out
        finite (a weight read outside its own module reads NaN)."""
        with self.on_demand(make):
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

    def low_rank_at(self, gamma: Tensor, layout: CoefficientLayout) -> AbstractContextManager[None]:
        """Forwards inside add the LoRA experts' merge at ``gamma`` (nothing without LoRA experts)."""
        group = layout.group_of
        return low_rank_added(self.base_model, self.low_rank.stacks(), lambda name: gamma[:, group[name]])

    def low_rank_of_expert(self, task_index: int, device: torch.device) -> AbstractContextManager[None]:
        """Forwards inside add expert ``task_index``'s own LoRA update."""
        own = torch.zeros(len(self.tasks), device=device)
        own[task_index] = 1.0
        return low_rank_added(self.base_model, self.low_rank.stacks(), lambda _name: own)

    def low_rank_dense(
        self, dense: dict[str, Tensor], gamma: Tensor, layout: CoefficientLayout
    ) -> dict[str, Tensor]:
        """LoRA targets' dense merged weights, ``W + sum_t Gamma_t s_t B_t A_t`` over the ``dense``
        merge ``W`` (or the base's): for export only, the merge itself never forms them."""
        params = dict(self.base_model.named_parameters())
        group = layout.group_of
        return {
            name: merged_weight(dense.get(name, params[name]), stack, gamma[:, group[name]])
            for name, stack in self.low_rank.stacks().items()
        }


class FixedDelta(nn.Module):
    """A training-free method's result, ``theta0 + delta``: buffers, so they move with the model."""

    def __init__(self, delta: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = list(delta)
        for i, tensor in enumerate(delta.values()):
            self.register_buffer(f"delta_{i}", tensor, persistent=False)

    def merged(self, base: dict[str, Tensor]) -> dict[str, Tensor]:
        deltas = (getattr(self, f"delta_{i}") for i in range(len(self.names)))
        return {name: base[name] + d.to(base[name].dtype) for name, d in zip(self.names, deltas, strict=True)}


def check_dense_needs(loaded: LoadedExperts, transform: str, training_free: bool) -> None:
    """Refuse what needs dense task vectors when some experts are LoRA factors."""
    if loaded.low_rank and transform != "none":
        raise ValueError(
            f"model.task_vector_transform {transform!r} is not supported with "
            "LoRA experts yet (it would need their dense task vectors); use none"
        )
    if loaded.low_rank and training_free:
        raise ValueError(
            "training-free merges are not supported with LoRA experts yet (they combine dense "
            "task vectors); learn the coefficients with fit instead"
        )


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
    own = {f"base_model.{n}" for n in module.base_model.state_dict()}
    incompatible.missing_keys[:] = [
        k for k in incompatible.missing_keys if not any(k.endswith(o) for o in own)
    ]
