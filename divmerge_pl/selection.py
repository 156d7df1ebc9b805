"""Choosing a training-free method's settings on labelled validation rows, never the scored ones.

The literature's protocol (task arithmetic, TIES, DARE): try each point of a small grid, score
the merged model on a held-out labelled validation split against each expert on the same rows,
keep the best average normalised score. The scored eval rows play no part.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .methods import StaticMethod
from .static_merges import StaticMerge


class Scorable(Protocol):
    def set_static_merge(self, merge: StaticMerge) -> None: ...

    def evaluate(self, split: str = "eval") -> dict: ...


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest average normalised score; the first in grid order among equals; NaN never wins."""
    return max(trials, key=lambda t: -math.inf if math.isnan(t["normalized"]) else t["normalized"])


def choose_on_validation(model: Scorable, method: StaticMethod) -> dict[str, Any]:
    """Score every grid point of ``method`` on the validation rows; leave ``model`` merged with
    the best and return how it was chosen (for report.json)."""
    trials = []
    for params in method.candidates():
        model.set_static_merge(method.build(**params))
        normalized = model.evaluate("tuning")["average"]["normalized"]
        trials.append({"params": params, "normalized": normalized})
        shown = ", ".join(f"{k} {v:g}" for k, v in params.items())
        rank_zero_info(f"{method.name}: {shown} -> normalised score on validation rows {normalized:.4f}")
    best = best_trial(trials)
    model.set_static_merge(method.build(**best["params"]))
    return {
        "chosen_on": "labelled validation rows (val_files)",
        "grid": method.grid,
        "chosen": best["params"],
        "trials": trials,
    }


def choose_settings(model: Scorable, method: StaticMethod, has_validation: bool) -> dict[str, Any]:
    """How ``method``'s settings are chosen: nothing to choose, its published defaults (with a
    warning) when the tasks have no labelled validation rows, or its grid on those rows."""
    if not method.grid:
        return {"chosen_on": "nothing to choose", "chosen": method.params}
    if not has_validation:
        rank_zero_warn(
            f"{method.name}: the tasks have no val_files, so its settings are the published defaults "
            f"{method.params}; give each task a labelled validation split to choose them from "
            f"{method.grid}"
        )
        return {"chosen_on": "published defaults (no val_files)", "chosen": method.params}
    return choose_on_validation(model, method)
