"""Sharded mode: each of W processes holds 1/W of the base and of every task vector.

A module's merged weight is built from the shards just before it runs: each rank merges its
own rows (``theta0 + sum_t Gamma_t tau_t`` on 1/W of the tensor) and DTensor gathers them
(``Shard(0) -> Replicate``); in backward, DTensor reduces the whole weight's gradient back to
the shards (``Partial -> Shard(0)``, a reduce-scatter), and each rank's Gamma gradient is its
shard's part, which DDP averages over ranks like any replicated parameter. So Gamma stays one
replicated tensor with the gradient of the whole batch, and a checkpoint holds Gamma and Adam
only. Shards are cut as DTensor cuts them (``torch.chunk`` along dim 0).

The strategy is Lightning's DDP with one change: the frozen side (different on every rank) is
never broadcast from rank 0, as DDP does with a model's state when it wraps it.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Shard
from typing_extensions import override


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s rows of a dimension of ``size`` rows (``torch.chunk``'s
    split, which DTensor's ``Shard`` uses: ceil(size / W) rows each, the last ranks fewer or none)."""
    step = -(-size // world)
    start = min(rank * step, size)
    return start, min(start + step, size)


def local_part(tensor: Tensor, rank: int, world: int, dim: int = 0) -> Tensor:
    """This rank's rows of ``tensor`` along ``dim`` (a view); a 0-d tensor is held whole."""
    if tensor.dim() == 0:
        return tensor
    start, end = shard_bounds(tensor.shape[dim], rank, world)
    return tensor.narrow(dim, start, end - start)


def contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


class Sharding:
    """The process group's ranks as a 1-D device mesh: cutting tensors and gathering them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device  # where the merge runs (the shards are cut on the CPU, then moved)
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self.mesh: DeviceMesh = init_device_mesh(device.type, (self.world,))

    def part(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """This rank's part of a tensor every rank has whole (a view)."""
        return local_part(tensor, self.rank, self.world, dim)

    def local(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """This rank's part, as a copy (the whole can be freed)."""
        return self.part(tensor, dim).clone()

    def gather(self, part: Tensor, shape: torch.Size) -> Tensor:
        """The whole tensor of ``shape`` from every rank's ``part``. Differentiable: the gradient of
        the whole (each rank's own batch's) is summed over ranks and cut back to ``part``."""
        if len(shape) == 0:
            return part
        whole = DTensor.from_local(
            part, self.mesh, [Shard(0)], run_check=False, shape=shape, stride=contiguous_stride(shape)
        )
        return whole.full_tensor(grad_placements=[Partial()])


class TaskVectorSharding(DDPStrategy):
    """DDP for the coefficients, with the base and task vectors sharded across the processes
    (``trainer.strategy: task_vector_sharding``). Same coefficients as one process or as DDP;
    per process, 1/W of the frozen model instead of all of it."""

    strategy_name = "task_vector_sharding"

    def __init__(self, *args, broadcast_buffers: bool = False, **kwargs) -> None:
        super().__init__(*args, broadcast_buffers=broadcast_buffers, **kwargs)

    @override
    def _setup_model(self, model: nn.Module) -> nn.Module:
        # DDP copies rank 0's parameters and buffers to every rank when it wraps the model: the
        # shards differ by rank by design, and the frozen side never needs syncing at all
        model._ddp_params_and_buffers_to_ignore = frozen_state_names(model)
        return super()._setup_model(model)


def frozen_state_names(model: nn.Module) -> list[str]:
    """Every parameter and buffer of ``model`` that does not require a gradient."""
    named = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return [name for name, tensor in named if not tensor.requires_grad]


def sharding_for(trainer: Trainer | None, hparams: Any, static_method: Any) -> Sharding | None:
    """This process's share of the frozen side, under ``TaskVectorSharding`` (on one process, the
    whole of it, still gathered per module: what a one-GPU check can run); what sharded mode
    cannot do is refused first, before any model loads."""
    if trainer is None or not isinstance(trainer.strategy, TaskVectorSharding):
        return None
    check_can_shard(hparams, static_method)
    return Sharding(trainer.strategy.root_device)


def check_can_shard(hparams: Any, static_method: Any) -> None:
    """What sharded mode does not do, refused before any model loads."""
    if static_method is not None:
        raise ValueError(
            f"model.static_method {static_method.name!r} with trainer.strategy task_vector_sharding: "
            "training-free merges read whole task vectors; run them on one process or with ddp"
        )
    if hparams.task_vector_transform != "none":
        raise ValueError(
            f"model.task_vector_transform {hparams.task_vector_transform!r} with trainer.strategy "
            "task_vector_sharding: TIES / DARE read every task vector whole; use ddp, or 'none'"
        )
    if not hparams.merge_on_demand:
        raise ValueError(
            "model.merge_on_demand false with trainer.strategy task_vector_sharding: sharded mode "
            "gathers each module's weights just before it runs; set merge_on_demand: true"
        )


StrategyRegistry.register(
    TaskVectorSharding.strategy_name,
    TaskVectorSharding,
    description="DDP for the merge coefficients, base and task vectors sharded across processes",
)
