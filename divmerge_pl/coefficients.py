"""How merged tensors share coefficients: a layout maps every merged tensor to one group.

Granularity is a layout, not a fork in the code: the merge is always
``theta_g = theta0_g + sum_t Gamma[t, g] * tau_t_g``; only the grouping changes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["task", "layer", "block"]

DEFAULT_BLOCK_PATTERN = r"(?:^|\.)((?:layers?|h|blocks?)\.\d+)\."
"""Captures the transformer block in HF parameter names (``encoder.layer.3``,
``model.layers.3``, ``transformer.h.3``); tensors outside any block share the group ``other``."""

OTHER_GROUP = "other"


@dataclass(frozen=True)
class CoefficientLayout:
    """Groups of tensors that share one coefficient per task."""

    granularity: Granularity
    groups: tuple[str, ...]
    group_of: dict[str, int]  # merged tensor name -> column of Gamma

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def build_layout(
    tensor_names: list[str], granularity: Granularity, block_pattern: str = DEFAULT_BLOCK_PATTERN
) -> CoefficientLayout:
    """Group ``tensor_names`` (in order) for ``granularity``.

    ``layer`` follows AdaMerging: one group per parameter tensor. ``block`` names each group by
    the text ``block_pattern`` matches (its first capture group if it has one).
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
    raise ValueError(f"unknown granularity {granularity!r}: choose one of task, layer, block")


def initial_coefficients(num_tasks: int, num_groups: int, init: float | None) -> torch.Tensor:
    """Gamma's starting point: ``init`` everywhere, or 1/N (0.5 for two tasks) when None."""
    value = 1.0 / num_tasks if init is None else float(init)
    return torch.full((num_tasks, num_groups), value, dtype=torch.float32)
