"""Training-free merges, as pure functions over stacked task vectors.

Task vectors are ``{tensor name: [num_tasks, *shape]}`` (``tau_t = expert_t - base``); a merge
returns the delta per tensor, the merged weights being ``theta0 + delta``. The per-task
processing steps (TIES trimming and sign election, DARE dropping) are exposed separately so
that a learned merge can optimise its coefficients over processed vectors (AdaMerging++).

TIES trims as its paper and official code do by default (``scope="model"``): each task keeps
the ``density`` fraction of largest-magnitude entries of its *whole* task vector (one threshold
per task, from the ``k``-th value of all its merged tensors together; entries equal to it are
kept, as there). ``scope="tensor"`` trims each tensor on its own (mergekit's convention).

``vectors`` may be any mapping, read one tensor at a time and more than once: a lazy one (LoRA
experts' task vectors made dense on access, ``low_rank.DenseTaskVectors``; DARE's dropped ones)
then holds one dense tensor at a time, and a merge's output one dense tensor per name.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor

TaskVectors = Mapping[str, Tensor]  # name -> [num_tasks, *shape]
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
    size), as float32. Found exactly without holding a task's entries together: a non-negative
    float32's bit pattern orders as an integer, so two passes over the tensors, each reading
    one at a time, count the magnitudes' high 15 bits, then the low 16 bits inside the bucket
    that holds the wanted entry (a radix select)."""
    _check_density(density)
    high = _bit_counts(vectors, lambda bits: bits >> 16, _HIGH_BINS)
    keep = max(1, int(int(high[0].sum()) * density))
    bucket, rank = _kth_largest_bin(high, torch.full((high.shape[0],), keep))

    def low_bits_in_bucket(bits: Tensor) -> Tensor:  # entries outside the bucket: an extra bin
        inside = (bits >> 16) == bucket.to(bits.device)[:, None]
        return torch.where(inside, bits & 0xFFFF, _LOW_BINS)

    low = _bit_counts(vectors, low_bits_in_bucket, _LOW_BINS + 1)[:, :_LOW_BINS]
    low_bits, _ = _kth_largest_bin(low, rank)
    bits = (bucket << 16) | low_bits
    return bits.to(torch.int32).view(torch.float32).to(torch.float64)


_HIGH_BINS, _LOW_BINS = 1 << 15, 1 << 16  # a float32 magnitude: sign bit 0, 15 high bits, 16 low


def _bit_counts(vectors: TaskVectors, bins_of: Callable[[Tensor], Tensor], num_bins: int) -> Tensor:
    """Per task, how many entries' magnitude bits ``bins_of`` puts in each of ``num_bins`` bins,
    summed over every tensor (read one at a time): [num_tasks, num_bins]."""
    counts = None
    for stacked in vectors.values():
        bits = stacked.reshape(stacked.shape[0], -1).abs().float().view(torch.int32) & 0x7FFFFFFF
        bins = bins_of(bits).long() + num_bins * torch.arange(bits.shape[0], device=bits.device)[:, None]
        found = torch.bincount(bins.reshape(-1), minlength=num_bins * bits.shape[0]).cpu()
        counts = found if counts is None else counts + found
    return counts.view(-1, num_bins)


def _kth_largest_bin(counts: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of ``counts`` [rows, bins], the bin holding its ``k``-th largest entry, and that
    entry's rank from the top inside the bin."""
    at_or_above = counts.flip(1).cumsum(1).flip(1)  # entries in this bin or a higher one
    found = (at_or_above >= k[:, None]).sum(1) - 1
    above = at_or_above.gather(1, found[:, None])[:, 0] - counts.gather(1, found[:, None])[:, 0]
    return found, k - above


def trim_at(stacked: Tensor, thresholds: Tensor) -> Tensor:
    """Zero each task's entries whose magnitude is below its threshold."""
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return stacked * (stacked.abs() >= thresholds.to(stacked.device, stacked.dtype).view(shape))


def trimmer(vectors: TaskVectors, density: float, scope: TrimScope) -> Callable[[Tensor], Tensor]:
    """TIES step 1 for one stacked tensor, with one threshold per task (``model``: found once,
    over every tensor of ``vectors``) or per tensor."""
    _check_scope(scope)
    if scope == "tensor":
        return lambda stacked: trim_top_k(stacked, density)
    thresholds = model_trim_thresholds(vectors, density)
    return lambda stacked: trim_at(stacked, thresholds)


def trimmed(vectors: TaskVectors, density: float, scope: TrimScope) -> dict[str, Tensor]:
    """TIES step 1 over every tensor, with one threshold per task (``model``) or per tensor."""
    trim = trimmer(vectors, density, scope)
    return _per_tensor(vectors, lambda _n, s: trim(s))


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


def _per_tensor(vectors: TaskVectors, fn: Callable[[str, Tensor], Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, stacked in vectors.items():
        result = fn(name, stacked.to(_compute_dtype(stacked)))
        out[name] = result.to(stacked.dtype)
    return out


class MappedVectors(Mapping[str, Tensor]):
    """``fn(name, vectors[name])`` computed on each access, never stored: a step that feeds
    another (DARE's drop before TIES or task arithmetic) holds one tensor at a time."""

    def __init__(self, vectors: TaskVectors, fn: Callable[[str, Tensor], Tensor]) -> None:
        self.vectors, self.fn = vectors, fn

    def __getitem__(self, name: str) -> Tensor:
        stacked = self.vectors[name]
        return self.fn(name, stacked.to(_compute_dtype(stacked))).to(stacked.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)


def _generator(seed: int, name: str) -> torch.Generator:
    # seeded per tensor by its name: the result does not depend on dict order
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def ties_task_vectors(
    vectors: TaskVectors, density: float = 0.2, scope: TrimScope = "model"
) -> dict[str, Tensor]:
    """Per-task TIES vectors: trimmed, then entries against the elected sign zeroed (stacked)."""
    trim = trimmer(vectors, density, scope)

    def processed(stacked: Tensor) -> Tensor:
        kept = trim(stacked)
        return agree_with_sign(kept, elect_sign(kept))

    return _per_tensor(vectors, lambda _n, s: processed(s))


def dropped(vectors: TaskVectors, drop_rate: float, seed: int) -> MappedVectors:
    """DARE's random drop and rescale, seeded per tensor, computed when each tensor is read."""
    return MappedVectors(vectors, lambda name, s: dare_drop(s, drop_rate, _generator(seed, name)))


def dare_task_vectors(vectors: TaskVectors, drop_rate: float = 0.9, seed: int = 0) -> dict[str, Tensor]:
    """Per-task DARE vectors: random drop and rescale, seeded per tensor (stacked)."""
    return dict(dropped(vectors, drop_rate, seed).items())


def decorrelate_matrix(stacked: Tensor, fraction: float | None = None) -> Tensor:
    """TSV's per-task parts of one matrix [tasks, m, n] (Gargiulo et al. 2025, "Task Singular
    Vectors"): each task keeps its top ``fraction`` (1/tasks by default) of singular triplets, and
    the tasks' singular vectors, side by side, are replaced by the nearest orthogonal ones
    (polar factor), so the parts no longer interfere; their sum is TSV-Merge's delta."""
    tasks, rows, cols = stacked.shape
    keep = max(1, int(min(rows, cols) * (fraction if fraction is not None else 1.0 / tasks)))
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    u, s, vh = u[..., :keep], s[..., :keep], vh[..., :keep, :]
    left = u.permute(1, 0, 2).reshape(rows, tasks * keep)  # [m, tasks * keep]
    right = vh.reshape(tasks * keep, cols)  # [tasks * keep, n]
    left = _polar(left)
    right = _polar(right.T).T
    left = left.reshape(rows, tasks, keep).permute(1, 0, 2)
    right = right.reshape(tasks, keep, cols)
    return (left * s[:, None, :]) @ right


def _polar(matrix: Tensor) -> Tensor:
    """The orthonormal-columned matrix nearest ``matrix`` (``P Q^T`` of its thin SVD)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_task_vectors(vectors: TaskVectors, fraction: float | None = None) -> dict[str, Tensor]:
    """Per-task TSV vectors: every matrix decorrelated (``decorrelate_matrix``); vectors and
    biases, which have no singular vectors, as they are (stacked)."""
    return _per_tensor(vectors, lambda _n, s: decorrelate_matrix(s, fraction) if s.dim() == 3 else s)


def tsv_merge(vectors: TaskVectors, scale: float = 1.0) -> dict[str, Tensor]:
    """TSV-Merge (Gargiulo et al. 2025): ``scale`` x the sum of the tasks' decorrelated parts of
    every matrix, and x the mean of the tensors that have no singular vectors (as its code)."""

    def merged(stacked: Tensor) -> Tensor:
        return scale * (decorrelate_matrix(stacked).sum(dim=0) if stacked.dim() == 3 else stacked.mean(dim=0))

    return _per_tensor(vectors, lambda _n, s: merged(s))


def average(vectors: TaskVectors) -> dict[str, Tensor]:
    """Uniform weight averaging of the experts (Wortsman et al. 2022, model soups)."""
    return _per_tensor(vectors, lambda _n, s: s.mean(dim=0))


def task_arithmetic(vectors: TaskVectors, scale: float = 0.3) -> dict[str, Tensor]:
    """``scale * sum_t tau_t`` (Ilharco et al. 2023, "Editing models with task arithmetic")."""
    return _per_tensor(vectors, lambda _n, s: scale * s.sum(dim=0))


def ties(
    vectors: TaskVectors, density: float = 0.2, scale: float = 1.0, scope: TrimScope = "model"
) -> dict[str, Tensor]:
    """Trim, elect sign, disjoint mean, scale (Yadav et al. 2023, TIES-Merging; k=20%, lambda=1)."""
    trim = trimmer(vectors, density, scope)

    def merged(stacked: Tensor) -> Tensor:
        kept = trim(stacked)
        return scale * disjoint_mean(kept, elect_sign(kept))

    return _per_tensor(vectors, lambda _n, s: merged(s))


def dare(
    vectors: TaskVectors,
    drop_rate: float = 0.9,
    then: Literal["task_arithmetic", "ties"] = "task_arithmetic",
    scale: float = 0.3,
    density: float = 1.0,
    seed: int = 0,
    scope: TrimScope = "model",
) -> dict[str, Tensor]:
    """DARE: drop p=0.9 and rescale each task vector, then task arithmetic or TIES
    (Yu et al. 2024, "Language models are Super Mario")."""
    _check_then(then)
    kept = dropped(vectors, drop_rate, seed)
    if then == "task_arithmetic":
        return task_arithmetic(kept, scale)
    return ties(kept, density, scale, scope)


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

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
        raise NotImplementedError

    def task_weights(self, num_tasks: int) -> Tensor | None:
        """The ``c`` of a merge that is ``sum_t c_t tau_t`` (then exact on any linear form of the
        task vectors, LoRA factors included); None for one that needs each entry (TIES, DARE)."""
        return None

    def params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Average(StaticMerge):
    name: ClassVar[str] = "average"

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
        return average(vectors)

    def task_weights(self, num_tasks: int) -> Tensor:
        return torch.full((num_tasks,), 1.0 / num_tasks)


@dataclass(frozen=True)
class TaskArithmetic(StaticMerge):
    name: ClassVar[str] = "task_arithmetic"
    scale: float = 0.3

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
        return task_arithmetic(vectors, self.scale)

    def task_weights(self, num_tasks: int) -> Tensor:
        return torch.full((num_tasks,), float(self.scale))


@dataclass(frozen=True)
class Ties(StaticMerge):
    name: ClassVar[str] = "ties"
    density: float = 0.2
    scale: float = 1.0
    scope: TrimScope = "model"

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
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

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
        return dare(vectors, self.drop_rate, self.then, self.scale, self.density, self.seed, self.scope)


@dataclass(frozen=True)
class Tsv(StaticMerge):
    name: ClassVar[str] = "tsv"
    scale: float = 1.0

    def merge(self, vectors: TaskVectors) -> dict[str, Tensor]:
        return tsv_merge(vectors, self.scale)


STATIC_MERGES: dict[str, type[StaticMerge]] = {m.name: m for m in (Average, TaskArithmetic, Ties, Dare, Tsv)}


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
) -> dict[str, Tensor] | None:
    """The vectors a learned merge combines under ``task_vector_transform`` (None: the raw ones)."""
    if transform == "ties":
        return ties_task_vectors(vectors, density, scope)
    if transform == "dare":
        return dare_task_vectors(vectors, drop_rate, seed)
    if transform == "tsv":
        return tsv_task_vectors(vectors)
    return None
