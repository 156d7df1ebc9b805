"""Which checkpoint a run resumes from, and whether it may: read safely, checked before any
model loads against the settings that define the merge."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

# DivMergeModule arguments that define what the coefficients mean: a checkpoint made with other
# values holds coefficients of another merge (paths and weights are checked by fingerprints).
MERGE_SETTINGS = (
    "objective",
    "granularity",
    "block_pattern",
    "task_vector_transform",
    "density",
    "trim_scope",
    "drop_rate",
    "transform_seed",
    "init",
    "lr",
    "clamp",
    "task_vector_dtype",
    "task_weighting",
    "teacher_temperature",
    "max_new_tokens",
    "top_k",
)
# a training-free method defines the merge as well; only when one is set (a learned run's settings,
# and so every checkpoint made so far, stay as they were)
_WHEN_SET = ("static_method",)
# only the transform in use has parameters that matter
_TRANSFORM_PARAMS = {"ties": ("density", "trim_scope"), "dare": ("drop_rate", "transform_seed")}
_KEYWORDS = ("last", "best", "hpc", "registry")


class ResumeError(ValueError):
    """The checkpoint cannot be resumed from as asked (names the file and every reason)."""


def merge_settings(model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The merge-defining values of a module's arguments, as plain JSON values (tuples as lists),
    with ``tasks`` in their order: the coefficients' rows follow it."""
    settings = {"tasks": list(model_args.get("experts") or {})}
    transform = model_args.get("task_vector_transform", "none")
    for key in MERGE_SETTINGS:
        if key in sum(_TRANSFORM_PARAMS.values(), ()) and key not in _TRANSFORM_PARAMS.get(transform, ()):
            continue
        if key == "block_pattern" and model_args.get("granularity") != "block":
            continue
        if key in model_args:
            settings[key] = json.loads(json.dumps(model_args[key]))
    for key in _WHEN_SET:
        if model_args.get(key) is not None:
            settings[key] = json.loads(json.dumps(model_args[key]))
    return settings


def settings_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in the checkpoint, value now) for every merge setting that changed."""
    keys = sorted(set(saved) | set(now))
    return [(k, saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)]


def settings_error(path: str, differences: list[tuple[str, Any, Any]]) -> ResumeError:
    lines = "\n".join(f"  {key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences)
    same = " ".join(f"--model.init_args.{k}={json.dumps(old)}" for k, old, _ in differences if k != "tasks")
    return ResumeError(
        f"checkpoint {path!r} was made by a merge with other settings; resuming would continue "
        f"coefficients learned for another merge:\n{lines}\n"
        "Either start a new run (another --trainer.default_root_dir, and no --ckpt_path), or resume "
        "with the checkpoint's settings" + (f": {same}" if same else "")
    )


def latest_checkpoint(root: str | None) -> str | None:
    """The newest ``last.ckpt`` under ``root`` (None, and a fresh start, if there is none):
    Lightning's own "last" looks only in this run's new, empty version folder. Wherever the
    logger puts runs (``<name>/<version>/checkpoints``: CSV, TensorBoard, W&B or MLflow saving
    under ``root``), or ``root/checkpoints`` without a logger."""
    folder = Path(root or ".").expanduser()
    patterns = ("checkpoints/last.ckpt", "*/checkpoints/last.ckpt", "*/*/checkpoints/last.ckpt")
    found = sorted({p for pattern in patterns for p in folder.glob(pattern)}, key=lambda p: p.stat().st_mtime)
    if not found:
        rank_zero_info(f"--ckpt_path last: no last.ckpt under {root or '.'!r}; starting a new run")
        return None
    rank_zero_info(f"--ckpt_path last: resuming from {found[-1]}")
    return str(found[-1])


def read_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents, read with ``weights_only=True`` (a pickle's code never runs); a
    truncated, corrupted or foreign file fails here, named, not deep inside a restore."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for a damaged or unsafe file
        unsafe = "weights_only" in str(err) or "Unsupported global" in str(err)
        reason = (
            "it holds Python objects beyond tensors and plain values, which are never unpickled "
            "(code could run): is it a divmerge-pl checkpoint?"
            if unsafe
            else "it is truncated or corrupted: resume from another one (checkpoints/ keeps last.ckpt "
            "and the newest epoch) or start a new run without --ckpt_path"
        )
        raise ResumeError(f"checkpoint {path!r} cannot be read ({type(err).__name__}): {reason}") from err
    if not isinstance(state, dict) or "coefficients" not in state.get("state_dict", {}):
        raise ResumeError(f"checkpoint {path!r} is not a divmerge-pl checkpoint (it holds no coefficients)")
    return state


def saved_settings(state: Mapping[str, Any]) -> dict[str, Any]:
    """The merge settings a checkpoint was made with (older checkpoints: from its hparams)."""
    recorded = state.get("divmerge", {}).get("settings")
    return dict(recorded) if recorded is not None else merge_settings(state.get("hyper_parameters", {}))


def check_resume(path: str | None, model_args: Mapping[str, Any]) -> None:
    """Refuse, before any model loads, to resume ``path`` with other merge settings."""
    if path is None or path in _KEYWORDS or not os.path.isfile(path):
        return  # Lightning resolves the keywords and reports a missing file itself
    state = read_checkpoint(path)
    differences = settings_differences(saved_settings(state), merge_settings(model_args))
    if differences:
        raise settings_error(path, differences)


def checkpoint_record(
    fingerprints: Mapping[str, str], groups: list[str], model_args: Mapping[str, Any]
) -> dict[str, Any]:
    """What a checkpoint holds beside the coefficients: what they belong to (fingerprints of
    weights and inputs), their columns and the settings that define the merge."""
    settings = merge_settings(model_args)
    return {"fingerprints": dict(fingerprints), "groups": list(groups), "settings": settings}


def check_checkpoint(
    checkpoint: Mapping[str, Any],
    model_args: Mapping[str, Any],
    fingerprints: Mapping[str, str],
    paths: Mapping[str, Any],
) -> None:
    """Refuse a checkpoint of another merge while it loads: for ``Trainer.fit(ckpt_path=...)``
    in code (the CLI checked its settings before any model loaded)."""
    differences = settings_differences(saved_settings(checkpoint), merge_settings(model_args))
    if differences:
        raise settings_error("given to fit", differences)
    check_fingerprints(checkpoint["divmerge"]["fingerprints"], fingerprints, paths)


def check_fingerprints(saved: Mapping[str, str], now: Mapping[str, str], paths: Mapping[str, Any]) -> None:
    """Refuse to continue coefficients learned for other weights or other merge inputs."""
    for role, digest in saved.items():
        if now.get(role) != digest:
            what = (
                "the merge's inputs (data.tasks files or num_samples)"
                if role == "data"
                else (f"{role!r} ({str(paths.get(role, '?'))!r})")
            )
            raise ValueError(
                f"checkpoint was made with other weights or data: {what} changed since; resuming "
                "would continue coefficients learned for something else; start a new run instead"
            )
