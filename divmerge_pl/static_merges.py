"""Training-free merges, as pure functions over stacked task vectors.

Task vectors are ``{tensor name: [num_tasks, *shape]}`` (``tau_t = expert_t - base``); a merge
returns the delta per tensor, the merged weights being ``theta0 + delta``. The per-task
processing steps (TIES trimming and sign election, DARE dropping) are exposed separately so
that a learned merge can optimise its coefficients over processed vectors (AdaMerging++).

TIES trims as its paper and official code do by default (``scope="model"``): each task keeps
the ``density`` fraction of largest-magnitude entries of its *whole* task vector (one threshold
per task, from the ``k``-th value of all its merged tensors together; entries equal to it are
kept, as there). ``scope="tensor"`` trims each tensor on its own (mergekit's convention).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

TaskVectors = dict[str, Tensor]
TrimScope = Literal["model", "tensor"]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def trim_top_k(stacked: Tensor, density: float) -> Tensor:
    """Keep each task's ``density`` fraction of largest-magnitude entries (TIES step 1)."""
    _check_density(density)
    flat = stacked.reshape(stacked.shape[0], -1)
    keep = max(1, int(round(density * flat.shape[1])))
    if keep >= flat.shape[1]:
        return stacked.clone()
    # topk picks a fixed number per task, so ties at the threshold cannot keep extra entries
    index = flat.abs().topk(keep, dim=1, sorted=False).indices
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
    return (flat * mask).reshape(stacked.shape)


def model_trim_thresholds(vectors: TaskVectors, density: float) -> Tensor:
    """Per task, the magnitude an entry needs to survive trimming over the whole task vector:
    the ``int(d * density)``-th largest of its ``d`` entries (TIES paper, ``topk_values_mask``;
    its cut, ``kthvalue(d - int(d * density))``, keeps one entry more, immaterial at model
    size). One task's entries are concatenated at a time: one extra task vector, not all."""
    _check_density(density)
    num_tasks = next(iter(vectors.values())).shape[0]
    thresholds = torch.empty(num_tasks, dtype=torch.float64)
    for t in range(num_tasks):
        flat = torch.cat([v[t].reshape(-1).abs().float() for v in vectors.values()])
        keep = max(1, int(flat.numel() * density))
        thresholds[t] = float(flat.kthvalue(flat.numel() - keep + 1).values)
    return thresholds


def trim_at(stacked: Tensor, thresholds: Tensor) -> Tensor:
    """Zero each task's entries whose magnitude is below its threshold."""
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return stacked * (stacked.abs() >= thresholds.to(stacked.device, stacked.dtype).view(shape))


def trimmed(vectors: TaskVectors, density: float, scope: TrimScope) -> TaskVectors:
    """TIES step 1 over every tensor, with one threshold per task (``model``) or per tensor."""
    _check_scope(scope)
    if scope == "tensor":
        return _per_tensor(vectors, lambda _n, s: trim_top_k(s, density))
    thresholds = model_trim_thresholds(vectors, density)
    return _per_tensor(vectors, lambda _n, s: trim_at(s, thresholds))


def elect_sign(stacked: Tensor) -> Tensor:
    """Per entry, the sign of the summed task vectors ("total mass" election, TIES step 2); +1 at 0."""
    total = stacked.sum(dim=0)
    return torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))


def agree_with_sign(stacked: Tensor, sign: Tensor) -> Tensor:
    """Zero the entries whose sign disagrees with the elected one (and the zeros stay zeros)."""
    return stacked * ((torch.sign(stacked) == sign) & (stacked != 0))


def disjoint_mean(stacked: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks that agree with the elected sign, 0 where none do (TIES step 3)."""
    agreeing = agree_with_sign(stacked, sign)
    count = (agreeing != 0).sum(dim=0).clamp(min=1)
    return agreeing.sum(dim=0) / count


def dare_drop(stacked: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Drop each entry with probability ``drop_rate``, rescale the rest by 1/(1-p): unbiased."""
    _check_drop_rate(drop_rate)
    if drop_rate == 0:
        return stacked.clone()
    keep = torch.rand(stacked.shape, generator=generator) >= drop_rate
    return stacked * keep.to(stacked.device) / (1.0 - drop_rate)


def _per_tensor(vectors: TaskVectors, fn) -> TaskVectors:
    out = {}
    for name, stacked in vectors.items():
        result = fn(name, stacked.to(_compute_dtype(stacked)))
        out[name] = result.to(stacked.dtype)
    return out


def _generator(seed: int, name: str) -> torch.Generator:
    # seeded per tensor by its name: the result does not depend on dict order
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def ties_task_vectors(vectors: TaskVectors, density: float = 0.2, scope: TrimScope = "model") -> TaskVectors:
    """Per-task TIES vectors: trimmed, then entries against the elected sign zeroed (stacked)."""
    return _per_tensor(trimmed(vectors, density, scope), lambda _n, s: agree_with_sign(s, elect_sign(s)))


def dare_task_vectors(vectors: TaskVectors, drop_rate: float = 0.9, seed: int = 0) -> TaskVectors:
    """Per-task DARE vectors: random drop and rescale, seeded per tensor (stacked)."""
    return _per_tensor(vectors, lambda name, s: dare_drop(s, drop_rate, _generator(seed, name)))


def average(vectors: TaskVectors) -> TaskVectors:
    """Uniform weight averaging of the experts (Wortsman et al. 2022, model soups)."""
    return _per_tensor(vectors, lambda _n, s: s.mean(dim=0))


def task_arithmetic(vectors: TaskVectors, scale: float = 0.3) -> TaskVectors:
    """``scale * sum_t tau_t`` (Ilharco et al. 2023, "Editing models with task arithmetic")."""
    return _per_tensor(vectors, lambda _n, s: scale * s.sum(dim=0))


def ties(
    vectors: TaskVectors, density: float = 0.2, scale: float = 1.0, scope: TrimScope = "model"
) -> TaskVectors:
    """Trim, elect sign, disjoint mean, scale (Yadav et al. 2023, TIES-Merging; k=20%, lambda=1)."""
    return _per_tensor(
        trimmed(vectors, density, scope), lambda _n, s: scale * disjoint_mean(s, elect_sign(s))
    )


def dare(
    vectors: TaskVectors,
    drop_rate: float = 0.9,
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    scale: float = 0.3,
    density: float = 1.0,
    seed: int = 0,
    scope: TrimScope = "model",
) -> TaskVectors:
    """DARE: drop p=0.9 and rescale each task vector, then task arithmetic or TIES
    (Yu et al. 2024, "Language models are Super Mario")."""
    _check_then(then)
    dropped = dare_task_vectors(vectors, drop_rate, seed)
    if then == "task_arithmetic":
        return task_arithmetic(dropped, scale)
    return ties(dropped, density, scale, scope)


def _check_density(density: float) -> None:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1] (fraction of each task vector kept), got {density}")


def _check_scope(scope: str) -> None:
    if scope not in ("model", "tensor"):
        raise ValueError(f"ties scope {scope!r}: choose model (the TIES paper's) or tensor (mergekit's)")


def _check_drop_rate(drop_rate: float) -> None:
    if not 0 <= drop_rate < 1:
        raise ValueError(f"drop_rate must be in [0, 1) (fraction of entries dropped), got {drop_rate}")


def _check_then(then: str) -> None:
    if then not in ("task_arithmetic", "ties"):
        raise ValueError(f"dare: then={then!r}; choose task_arithmetic or ties")


# a parameter means the same in every method that takes it, so it is checked the same way
_PARAM_CHECKS = {
    "density": _check_density,
    "scope": _check_scope,
    "drop_rate": _check_drop_rate,
    "then": _check_then,
}


@dataclass(frozen=True)
class StaticMerge:
    """A training-free method with its parameters; ``merge`` gives the delta per tensor."""

    name: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # bad values fail when the method is built, before any model loads
            if f.name in _PARAM_CHECKS:
                _PARAM_CHECKS[f.name](getattr(self, f.name))

    def merge(self, vectors: TaskVectors) -> TaskVectors:
        raise NotImplementedError

    def params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Average(StaticMerge):
    name: ClassVar[str] = "average"

    def merge(self, vectors: TaskVectors) -> TaskVectors:
        return average(vectors)


@dataclass(frozen=True)
class TaskArithmetic(StaticMerge):
    name: ClassVar[str] = "task_arithmetic"
    scale: float = 0.3

    def merge(self, vectors: TaskVectors) -> TaskVectors:
        return task_arithmetic(vectors, self.scale)


@dataclass(frozen=True)
class Ties(StaticMerge):
    name: ClassVar[str] = "ties"
    density: float = 0.2
    scale: float = 1.0
    scope: TrimScope = "model"

    def merge(self, vectors: TaskVectors) -> TaskVectors:
        return ties(vectors, self.density, self.scale, self.scope)


@dataclass(frozen=True)
class Dare(StaticMerge):
    name: ClassVar[str] = "dare"
    drop_rate: float = 0.9
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scale: float = 0.3
    density: float = 1.0
    seed: int = 0
    scope: TrimScope = "model"

    def merge(self, vectors: TaskVectors) -> TaskVectors:
        return dare(vectors, self.drop_rate, self.then, self.scale, self.density, self.seed, self.scope)


STATIC_MERGES: dict[str, type[StaticMerge]] = {m.name: m for m in (Average, TaskArithmetic, Ties, Dare)}


def build_static_merge(name: str, **params) -> StaticMerge:
    """The method ``name`` with ``params``; errors name the method or parameter at fault."""
    if name not in STATIC_MERGES:
        raise ValueError(f"unknown training-free method {name!r}: choose one of {', '.join(STATIC_MERGES)}")
    cls = STATIC_MERGES[name]
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {unknown}; it takes {sorted(allowed) or 'none'}")
    return cls(**params)


def transformed_vectors(
    vectors: TaskVectors, transform: str, density: float, scope: TrimScope, drop_rate: float, seed: int
) -> TaskVectors | None:
    """The vectors a learned merge combines under ``task_vector_transform`` (None: the raw ones)."""
    if transform == "ties":
        return ties_task_vectors(vectors, density, scope)
    if transform == "dare":
        return dare_task_vectors(vectors, drop_rate, seed)
    return None
