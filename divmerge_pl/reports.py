"""What a merge's outputs say about it: its name, its resolved settings, its coefficients.

Reports (``report.json``, the comparison table, the model card) name a run by the registry's
method when its settings are exactly one method's, and keep every setting resolved (init 1/N as
a number) so a reader can rerun it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .export import ROW_COEFFICIENTS
from .methods import learned_label, learned_settings
from .metrics import build_report

if TYPE_CHECKING:
    from .module import DivMergeModule


def method_name(module: DivMergeModule) -> str:
    if module.static_merge is not None:
        return module.static_merge.name
    return learned_label(
        dict(module.hparams), module.trainer.max_epochs if module._trainer is not None else None
    )


def method_settings(module: DivMergeModule) -> dict[str, Any]:
    """Every setting that defines this merge, with the run's epochs, batch and inputs."""
    if module.static_merge is not None:
        return {"kind": "static", "params": module.static_merge.params(), **(module.selection or {})}
    settings = learned_settings(dict(module.hparams), len(module.tasks))
    if module._trainer is not None:
        dm = module.trainer.datamodule
        settings.update(
            epochs=module.trainer.max_epochs,
            batch_size=dm.batch_size,
            inputs_per_task={t.name: t.num_samples for t in dm.tasks},
        )
    if module.restored is not None:
        settings["restored"] = module.restored
    return settings


def merge_report(module: DivMergeModule, merged: dict[str, float]) -> dict:
    """``report.json``: merged vs expert score per task, normalised, and the method's settings."""
    metrics = module.trainer.datamodule.metrics
    report = build_report(module.expert_scores, merged, metrics, method_name(module))
    report["settings"] = method_settings(module)
    if module.static_merge is not None:
        report["params"] = module.static_merge.params()
    return report


def coefficient_table(module: DivMergeModule) -> dict | None:
    """What ``coefficients.json`` holds: one row per task, one column per group (None for a
    training-free method, which has no coefficients of its own)."""
    if module.static_merge is not None:
        return None
    h = module.hparams
    rows = {"rows": f"values: each tensor's mean over its rows; every row's in {ROW_COEFFICIENTS}"}
    return {
        **(rows if module.layout.num_columns else {}),
        "objective": h.objective,
        "granularity": h.granularity,
        "task_vectors": h.task_vector_transform,
        "tasks": list(module.tasks),
        "groups": list(module.layout.groups),
        "clamp": h.clamp,
        "values": module.layout.group_means(module.merge_coefficients().detach()).cpu().tolist(),
    }
