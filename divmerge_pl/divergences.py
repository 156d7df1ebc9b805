"""Divergences between output distributions, as pure functions over log-probabilities.

Every function takes log-probabilities over the last dimension (classes or vocabulary) and
returns one value per leading position (no reduction), so callers decide how positions are
averaged (rows of a task, answer tokens of a sample). Zero probabilities (log-prob ``-inf``,
e.g. padded classes) are safe: their terms are exactly 0 and gradients stay finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# exp(LOG_FLOOR) underflows to 0 in fp32/bf16/fp16, so clamping changes no probability, but it
# turns -inf into a finite number: no inf - inf = nan in the values or in the gradients.
LOG_FLOOR = -1.0e4


def _finite(logp: Tensor) -> Tensor:
    return logp.clamp_min(LOG_FLOOR)


def kl_divergence(ref_logp: Tensor, logq: Tensor) -> Tensor:
    """Forward KL(P || Q) with P the reference (the expert): mode-covering, the paper's variant."""
    ref_logp, logq = _finite(ref_logp), _finite(logq)
    return (ref_logp.exp() * (ref_logp - logq)).sum(-1)


def js_divergence(logp: Tensor, logq: Tensor) -> Tensor:
    """Jensen-Shannon divergence, in nats: symmetric and bounded by log 2 (DivMerge's default)."""
    logp, logq = _finite(logp), _finite(logq)
    log_m = torch.logaddexp(logp, logq) - math.log(2.0)
    p, q = logp.exp(), logq.exp()
    return 0.5 * ((p * (logp - log_m)).sum(-1) + (q * (logq - log_m)).sum(-1))


def entropy(_ref_logp: Tensor | None, logq: Tensor) -> Tensor:
    """Shannon entropy of Q: AdaMerging's label-free objective (the reference is ignored)."""
    logq = _finite(logq)
    return -(logq.exp() * logq).sum(-1)


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the positions where ``mask`` is true (all positions when no mask)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def top_k_with_rest(logp: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep a distribution's ``k`` likeliest outcomes and one bucket for all the others.

    Returns ``(ids [..., k], coarse_logp [..., k + 1])``; the last entry is the rest's mass
    (``-inf`` when ``k`` covers the whole support). Comparing two distributions on this coarser
    partition can only lower JS and KL (data processing inequality), and changes nothing when
    ``k`` is the vocabulary size: the saving is memory, ``k + 1`` numbers per position, not V.
    """
    k = min(k, logp.shape[-1])
    top, ids = logp.topk(k, dim=-1)
    return ids, torch.cat([top, _rest(logp, ids)], dim=-1)


def coarsen(logq: Tensor, ids: Tensor) -> Tensor:
    """``logq`` on the partition of :func:`top_k_with_rest`: the outcomes ``ids``, then the rest."""
    return torch.cat([logq.gather(-1, ids), _rest(logq, ids)], dim=-1)


def _rest(logp: Tensor, ids: Tensor) -> Tensor:
    """log of the mass outside ``ids``, summed exactly (not ``1 - sum``, which cancels badly)."""
    outside = logp.scatter(-1, ids, float("-inf"))
    return torch.logsumexp(outside, dim=-1, keepdim=True)


def sharpen(logp: Tensor, temperature: float) -> Tensor:
    """``softmax(log p / T)`` in log space: T < 1 sharpens an unsure expert's targets towards
    its argmax (impossible outcomes stay impossible), T = 1 changes nothing."""
    if temperature == 1.0:
        return logp
    sharp = torch.log_softmax(_finite(logp) / temperature, dim=-1)
    return sharp.masked_fill(logp == float("-inf"), -math.inf)


def relative_weights(start: Tensor) -> Tensor:
    """Per-task weights ``mean(start) / start_t`` from each task's divergence at the initial
    coefficients: every task then counts by the share of its starting divergence still left,
    so a task whose expert is unsure (small divergences) is not given up for a confident one.
    All 1 when every task starts at the same divergence: the paper's plain sum."""
    start = start.clamp_min(torch.finfo(start.dtype).tiny)
    return start.mean() / start


def combine_tasks(task_means: Tensor, weights: Tensor | None = None) -> Tensor:
    """The objective over tasks: the sum of each task's mean divergence (the paper's), or its
    weighted sum."""
    return task_means.sum() if weights is None else (weights * task_means).sum()


def batch_objective(sums: Tensor, counts: Tensor, weights: Tensor | None = None) -> Tensor:
    """The objective of a batch from each task's summed divergence and row count: the tasks
    present in it (``counts > 0``), each by its mean, combined as ``combine_tasks``. An absent task
    adds an exact 0 (``torch.where``: a boolean index would wait for the device to count them)."""
    present = counts > 0
    means = torch.where(present, sums / counts.clamp_min(1), 0.0)
    return combine_tasks(means, None if weights is None else torch.where(present, weights, 0.0))


Objective = Callable[[Tensor | None, Tensor], Tensor]

OBJECTIVES: dict[str, Objective] = {
    "js": js_divergence,
    "kl": kl_divergence,
    "entropy": entropy,
}
"""Objective name (as in configs) -> function(expert_logp, merged_logp) -> per-position value."""


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(
            f"unknown objective {name!r}: choose one of {', '.join(sorted(OBJECTIVES))}"
        ) from None
