"""Low-rank task vectors: a LoRA expert's ``s * B @ A`` kept as its factors, stacked over tasks,
and the merge's forward through them.

The merged forward of a target adds ``sum_t g_t s_t (x A_t^T) B_t^T`` to the base layer's
output, so nothing on the merge's path builds ``B @ A``: r * (d_in + d_out) numbers per task
instead of d_out * d_in. Only ``merged_weight`` (for export), ``low_rank_delta`` (for tests) and
``DenseTaskVectors`` (for merges that need each entry, TIES and DARE: one target at a time) form
dense matrices. Pure functions over tensors, plus the module that
holds the stacks as buffers and the hooks that add the term; reading adapters is ``lora.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .preflight import ExpertMismatchError


@dataclass(frozen=True)
class LoraFactors:
    """One target weight's LoRA: its task vector is ``scaling * up @ down``."""

    down: Tensor  # A: r x d_in
    up: Tensor  # B: d_out x r
    scaling: float
    fan_in_fan_out: bool = False  # the base weight is stored d_in x d_out (GPT-2's Conv1D)


# ---------------------------------------------------------------- stacked over tasks
@dataclass
class LowRankStack:
    """Every task's factors for one target weight, side by side along the rank: the merge is two
    thin matrix products whatever the number of tasks (total rank R = sum of the tasks' ranks)."""

    down: Tensor  # R x d_in: the tasks' A stacked
    up: Tensor  # d_out x R: the tasks' B side by side
    task_of_rank: Tensor  # R (long): which task each rank belongs to
    scale_of_rank: Tensor  # R: that task's scaling
    fan_in_fan_out: bool = False


def stack_factors(per_task: Sequence[Mapping[str, LoraFactors]]) -> dict[str, LowRankStack]:
    """Target name -> its stack over tasks; a task without factors for a target adds no rank
    (a full expert, or an adapter that does not target it)."""
    names = sorted({name for factors in per_task for name in factors})
    stacks = {}
    for name in names:
        parts = [(t, f[name]) for t, f in enumerate(per_task) if name in f]
        fan = {f.fan_in_fan_out for _, f in parts}
        if len(fan) > 1:
            raise ExpertMismatchError(f"LoRA target {name!r}: adapters disagree on fan_in_fan_out")
        stacks[name] = LowRankStack(
            down=torch.cat([f.down for _, f in parts]),
            up=torch.cat([f.up for _, f in parts], dim=1),
            task_of_rank=torch.cat([torch.full((f.down.shape[0],), t, dtype=torch.long) for t, f in parts]),
            scale_of_rank=torch.cat([torch.full((f.down.shape[0],), f.scaling) for _, f in parts]),
            fan_in_fan_out=fan.pop(),
        )
    return stacks


# ---------------------------------------------------------------- pure maths
def low_rank_delta(down: Tensor, up: Tensor, scaling: float) -> Tensor:
    """The dense task vector ``scaling * B @ A`` (d_out x d_in): for tests and entry-wise merges
    (TIES, DARE) only; the merge itself never forms it."""
    return scaling * (up @ down)


def task_deltas(stack: LowRankStack, num_tasks: int) -> Tensor:
    """Every task's dense ``s_t B_t A_t`` for one target, [num_tasks, *weight shape] in the base
    weight's layout, float32 (zeros for a task without factors)."""
    d_out, d_in = stack.up.shape[0], stack.down.shape[1]
    shape = (d_in, d_out) if stack.fan_in_fan_out else (d_out, d_in)
    out = torch.zeros((num_tasks, *shape), dtype=torch.float32, device=stack.down.device)
    for t in stack.task_of_rank.unique().tolist():
        ranks = stack.task_of_rank == t
        delta = low_rank_delta(
            stack.down[ranks].float(), stack.up[:, ranks].float(), stack.scale_of_rank[ranks][0]
        )
        out[t] = delta.T if stack.fan_in_fan_out else delta
    return out


class DenseTaskVectors(Mapping[str, Tensor]):
    """Every merged tensor's task vectors, stacked [num_tasks, *shape] as full experts' are: the
    ``dense`` stacks as they are, and each LoRA target's made dense when it is read (its dense
    stack, if a full expert has one, plus every adapter's ``s_t B_t A_t``), never stored. For
    merges that need each entry (TIES, DARE), which then hold one dense target at a time."""

    def __init__(
        self,
        dense: Mapping[str, Tensor],
        stacks: Mapping[str, LowRankStack],
        num_tasks: int,
        order: Sequence[str],
    ) -> None:
        self.dense, self.stacks, self.num_tasks = dense, stacks, num_tasks
        self.names = [name for name in order if name in dense or name in stacks]

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.stacks:
            return self.dense[name]
        stacked = task_deltas(self.stacks[name], self.num_tasks)
        if name in self.dense:
            stacked += self.dense[name]
        return stacked.to(self.stacks[name].down.dtype)  # stored as the factors are (task_vector_dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def folded_factors(
    stack: LowRankStack, gamma: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """One LoRA of rank R and scaling 1 equal to the stack's merge at ``gamma``: ``(A, B)`` with
    ``B @ A = sum_t gamma_t s_t B_t A_t`` (a linear merge of adapters is itself an adapter).

    ``gamma`` is [num_tasks] (one coefficient per task for this weight: B_t times ``gamma_t s_t``)
    or [num_tasks, rows] (the channel layout: one per row of the weight as stored). A row is an
    output of a ``Linear`` (d_out x d_in), so it scales B's rows; it is an input of GPT-2's
    ``Conv1D`` (stored d_in x d_out), so it scales A's columns. Either way the merge stays rank R.
    """
    # products in float32 (the factors may be stored in bf16), one rounding to ``dtype`` at the end
    down, up = stack.down.float(), stack.up.float() * stack.scale_of_rank.float()
    per_rank = gamma.float()[stack.task_of_rank]  # [R] or [R, rows]
    if per_rank.dim() == 1:
        up = up * per_rank
    elif stack.fan_in_fan_out:
        down = down * per_rank
    else:
        up = up * per_rank.T
    return down.to(dtype), up.to(dtype)


def low_rank_term(x: Tensor, stack: LowRankStack, gamma: Tensor) -> Tensor:
    """``sum_t gamma_t s_t (x A_t^T) B_t^T``: x [..., d_in] -> [..., d_out], through rank R
    (``gamma`` per task, or per task and row: see ``folded_factors``)."""
    down, up = folded_factors(stack, gamma, x.dtype)
    return (x @ down.T) @ up.T


def merged_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, stack: LowRankStack, gamma: Tensor
) -> Tensor:
    """``x W0^T + b0 + sum_t gamma_t s_t (x A_t^T) B_t^T`` without forming any ``B @ A``."""
    base = x @ weight if stack.fan_in_fan_out else torch.nn.functional.linear(x, weight)
    if bias is not None:
        base = base + bias
    return base + low_rank_term(x, stack, gamma)


def merged_weight(weight: Tensor, stack: LowRankStack, gamma: Tensor) -> Tensor:
    """``W0 + sum_t gamma_t s_t B_t A_t``, dense, in the base weight's layout: for export."""
    down, up = folded_factors(stack, gamma)
    delta = up @ down
    return weight + (delta.T if stack.fan_in_fan_out else delta).to(weight.dtype)


# ---------------------------------------------------------------- on a module
class LowRankExperts(nn.Module):
    """The stacks as buffers (moved with the model, never checkpointed), one per target."""

    def __init__(self, stacks: Mapping[str, LowRankStack], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.names = list(stacks)
        self.fan_in_fan_out = [s.fan_in_fan_out for s in stacks.values()]
        for i, stack in enumerate(stacks.values()):
            self.register_buffer(f"down_{i}", stack.down.to(dtype), persistent=False)
            self.register_buffer(f"up_{i}", stack.up.to(dtype), persistent=False)
            self.register_buffer(f"task_of_rank_{i}", stack.task_of_rank, persistent=False)
            self.register_buffer(f"scale_of_rank_{i}", stack.scale_of_rank, persistent=False)

    def stacks(self) -> dict[str, LowRankStack]:
        return {
            name: LowRankStack(
                *(getattr(self, f"{part}_{i}") for part in ("down", "up", "task_of_rank", "scale_of_rank")),
                fan_in_fan_out=self.fan_in_fan_out[i],
            )
            for i, name in enumerate(self.names)
        }


GammaOf = Callable[[str], Tensor]  # target weight name -> its [num_tasks] or [num_tasks, rows] coefficients


@contextmanager
def low_rank_added(model: nn.Module, stacks: Mapping[str, LowRankStack], gamma_of: GammaOf) -> Iterator[None]:
    """Forwards of ``model`` inside this block add each target's low-rank merge to its layer's
    output: ``layer(x) + sum_t gamma_of(name)_t s_t (x A_t^T) B_t^T``. The layer itself runs
    with whatever weight it holds (the base's, or a dense merge swapped in), so full and LoRA
    experts combine; gradients reach ``gamma_of``'s tensors."""
    hooks = []

    def hook_for(name: str, stack: LowRankStack):
        def add(_module, args, output):
            return output + low_rank_term(args[0], stack, gamma_of(name))

        return add

    try:
        for name, stack in stacks.items():
            module = model.get_submodule(name.rpartition(".")[0])
            hooks.append(module.register_forward_hook(hook_for(name, stack)))
        yield
    finally:
        for hook in hooks:
            hook.remove()
