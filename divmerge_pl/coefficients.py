"""How merged tensors share coefficients: a layout maps every merged tensor to one group.

Granularity is a layout, not a fork in the code: the merge is always
``theta_g = theta0_g + sum_t Gamma[t, g] * tau_t_g``; only the grouping changes. ``channel`` gives
each slice along a tensor's first dimension (a linear layer's output channel) its own column:
Gamma's columns for that tensor are then a slice, and ``Gamma[t, g]`` a vector over its rows.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["task", "layer", "block", "channel"]
GRANULARITIES = ("task", "layer", "block", "channel")

DEFAULT_BLOCK_PATTERN = r"(?:^|\.)((?:layers?|h|blocks?)\.\d+)\."
"""Captures the transformer block in HF parameter names (``encoder.layer.3``,
``model.layers.3``, ``transformer.h.3``); tensors outside any block share the group ``other``."""

OTHER_GROUP = "other"


@dataclass(frozen=True)
class CoefficientLayout:
    """Groups of tensors that share one coefficient per task (per row of it, for ``channel``)."""

    granularity: Granularity
    groups: tuple[str, ...]
    group_of: dict[str, int | slice]  # merged tensor name -> its column(s) of Gamma
    num_columns: int = 0  # Gamma's width; 0: one column per group

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def width(self) -> int:
        """Gamma's number of columns."""
        return self.num_columns or len(self.groups)

    def group_means(self, gamma: torch.Tensor) -> torch.Tensor:
        """``gamma`` [tasks x width] as one value per group: a channel layout's mean over each
        tensor's rows (what tables and figures show), any other layout as it is."""
        if not self.num_columns:
            return gamma
        return torch.stack([gamma[:, self.group_of[name]].mean(1) for name in self.groups], dim=1)


def build_layout(
    tensor_names: list[str],
    granularity: Granularity,
    block_pattern: str = DEFAULT_BLOCK_PATTERN,
    rows: dict[str, int] | None = None,
) -> CoefficientLayout:
    """Group ``tensor_names`` (in order) for ``granularity``.

    ``layer`` follows AdaMerging: one group per parameter tensor. ``block`` names each group by
    the text ``block_pattern`` matches (its first capture group if it has one). ``channel``: one
    group per tensor with one column per row (``rows[name]``: its first dimension's size).
    """
    if not tensor_names:
        raise ValueError("no tensor differs between the base and the experts: nothing to merge")
    if granularity == "task":
        return CoefficientLayout("task", ("all",), {name: 0 for name in tensor_names})
    if granularity == "layer":
        return CoefficientLayout(
            "layer", tuple(tensor_names), {name: i for i, name in enumerate(tensor_names)}
        )
    if granularity == "block":
        try:
            pattern = re.compile(block_pattern)
        except re.error as err:
            raise ValueError(f"block_pattern {block_pattern!r} is not a valid regex: {err}") from None
        groups: list[str] = []
        group_of: dict[str, int] = {}
        for name in tensor_names:
            match = pattern.search(name)
            key = OTHER_GROUP if match is None else (match.group(1) if pattern.groups else match.group(0))
            if key not in groups:
                groups.append(key)
            group_of[name] = groups.index(key)
        return CoefficientLayout("block", tuple(groups), group_of)
    if granularity == "channel":
        if rows is None or set(tensor_names) - set(rows):
            raise ValueError("granularity channel: every merged tensor's number of rows is needed")
        starts = itertools.accumulate((rows[name] for name in tensor_names), initial=0)
        bounds = dict(zip(tensor_names, itertools.pairwise(starts), strict=True))
        group_of = {name: slice(start, end) for name, (start, end) in bounds.items()}
        return CoefficientLayout("channel", tuple(tensor_names), group_of, sum(rows[n] for n in tensor_names))
    raise ValueError(f"unknown granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")


def initial_coefficients(num_tasks: int, num_columns: int, init: float | None) -> torch.Tensor:
    """Gamma's starting point: ``init`` everywhere, or 1/N (0.5 for two tasks) when None."""
    value = 1.0 / num_tasks if init is None else float(init)
    return torch.full((num_tasks, num_columns), value, dtype=torch.float32)
