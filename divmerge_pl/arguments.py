"""The module's arguments checked when it is built, before anything loads or is read."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .coefficients import GRANULARITIES
from .divergences import get_objective


def check_arguments(options: Mapping[str, Any]) -> None:
    """Refuse a value no merge can use, naming the option and what it accepts."""
    objective, granularity, experts, lr = (options[k] for k in ("objective", "granularity", "experts", "lr"))
    density, drop_rate, clamp = options["density"], options["drop_rate"], options["clamp"]
    max_new_tokens, top_k = options["max_new_tokens"], options["top_k"]
    teacher_temperature = options["teacher_temperature"]
    get_objective(objective)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    if not experts:
        raise ValueError("model.experts is empty: give at least one {task_name: folder}")
    if lr <= 0:
        raise ValueError(f"model.lr must be positive, got {lr}")
    if not 0 < density <= 1:
        raise ValueError(f"model.density must be in (0, 1], got {density}")
    if not 0 <= drop_rate < 1:
        raise ValueError(f"model.drop_rate must be in [0, 1), got {drop_rate}")
    if clamp is not None and not (len(clamp) == 2 and clamp[0] < clamp[1]):
        raise ValueError(f"model.clamp must be [low, high] with low < high (or null), got {clamp}")
    if max_new_tokens < 1:
        raise ValueError(f"model.max_new_tokens must be at least 1, got {max_new_tokens}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"model.top_k must be a positive number of tokens (or null: all), got {top_k}")
    if teacher_temperature <= 0:
        raise ValueError(f"model.teacher_temperature must be positive, got {teacher_temperature}")
    if objective == "entropy" and teacher_temperature != 1.0:
        raise ValueError("model.teacher_temperature: the entropy objective has no teacher to sharpen")
