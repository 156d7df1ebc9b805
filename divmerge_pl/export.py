"""Writing a merge's results: ``merged/`` (with model cards), ``merged_adapter/``, ``coefficients.json``,
``report.json``; publishing ``merged/`` folders to the Hugging Face Hub.

Everything is written through ``atomic`` (a temporary sibling renamed into place), so an
interrupted export never leaves a folder that looks complete, and nothing existing is
overwritten unless the caller says so. The files and folders get the modes the umask gives any
new file (safetensors alone would leave the weights readable by their owner only).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from transformers import PretrainedConfig, PreTrainedModel

from .adapter_export import ADAPTER_FOLDER, MergedAdapter, write_adapters
from .atomic import atomic_file, atomic_folder, follow_umask
from .hub import hub_offline
from .merged import save_model
from .preflight import safetensors_in

ExportDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ExportOptions:
    """What ``MergedModelExport`` writes and where (its typed arguments, documented there), kept
    together and checked once, before any run."""

    dirpath: str | None = None
    overwrite: bool = False
    save_weights: bool = True
    dtype: ExportDtype | None = None
    max_shard_size: str | int | None = None
    push_to_hub: str | None = None
    hub_private: bool = True
    save_adapter: bool = True

    def __post_init__(self) -> None:
        if self.push_to_hub is not None and not self.save_weights:
            raise ValueError(
                "export.push_to_hub needs export.save_weights: true (there is nothing to upload)"
            )


EXPORT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

ROW_COEFFICIENTS = "coefficients.safetensors"  # a channel layout's every row (coefficients.json: means)
OUTPUT_NAMES = ("merged", ADAPTER_FOLDER, "coefficients.json", ROW_COEFFICIENTS, "report.json")


class OutputExistsError(FileExistsError):
    """An output of an earlier run is in the way (pass overwrite to replace it)."""


def check_free(folder: Path, overwrite: bool) -> None:
    """Fail before any work when results already stand in ``folder``."""
    taken = [name for name in OUTPUT_NAMES if (folder / name).exists()]
    if taken and not overwrite:
        raise OutputExistsError(
            f"{str(folder)!r} already holds {', '.join(taken)} from an earlier run; "
            "choose another output folder or set overwrite: true"
        )


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp, tmp.open("w") as handle:
        json.dump(data, handle, indent=2, allow_nan=True)
        handle.write("\n")


def stored_dtype(config: PretrainedConfig, folder: Path) -> str:
    """The dtype a model was saved in: its config's ``dtype`` (``torch_dtype`` before
    transformers 5), else its first floating tensor's, from the safetensors header."""
    recorded = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if recorded is not None:
        return str(recorded).removeprefix("torch.")
    for path in safetensors_in(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                kind = handle.get_slice(name).get_dtype()
                if kind in SAFETENSORS_DTYPES:
                    return SAFETENSORS_DTYPES[kind]
    return "float32"


def export_dtype(
    requested: str | None, configs: Mapping[str, PretrainedConfig], folders: Mapping[str, Path]
) -> str:
    """``requested``, or the experts' own dtype when they share one (float32 when they differ)."""
    if requested is not None:
        if requested not in EXPORT_DTYPES:
            raise ValueError(f"export.dtype {requested!r} is not one of {', '.join(EXPORT_DTYPES)}")
        return requested
    stored = {stored_dtype(configs[t], Path(folders[t])) for t in configs}
    shared = stored.pop() if len(stored) == 1 else "float32"
    return shared if shared in EXPORT_DTYPES else "float32"


def write_merged(
    folder: Path,
    models: Iterable[tuple[str, PreTrainedModel]],
    tokenizer=None,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    card: Callable[[str], ModelCard] | None = None,
) -> dict[str, Path]:
    """``folder/merged/<task>/``: one loadable Hugging Face folder per task head (``""``: the
    one model in ``merged/`` itself), in ``dtype``, with its model card ``card(task)``."""
    written: list[str] = []
    with atomic_folder(folder / "merged") as tmp:
        for task, model in models:
            save_model(model.to(getattr(torch, dtype)), tmp / task, tokenizer, max_shard_size)
            if card is not None:
                card(task).save(tmp / task / "README.md")
            written.append(task)
        follow_umask(tmp)
    return {task: folder / "merged" / task for task in written}


def hub_repo_ids(pattern: str, tasks: Sequence[str], one_model: bool = False) -> dict[str, str]:
    """Folder name inside ``merged/`` -> Hub repo id: ``pattern`` with ``{task}`` filled in.
    ``one_model`` (causal LMs): ``merged/`` itself, ``""``, with the task names joined by ``-``."""
    if one_model:
        return {"": pattern.replace("{task}", "-".join(tasks))}
    if len(tasks) > 1 and "{task}" not in pattern:
        raise ValueError(
            f"export.push_to_hub {pattern!r} names one repository for {len(tasks)} merged models "
            f"({', '.join(tasks)}); put {{task}} in it, e.g. 'your-name/merged-{{task}}'"
        )
    return {task: pattern.replace("{task}", task) for task in tasks}


def check_repo_ids(repo_ids: Mapping[str, str]) -> None:
    for task, repo_id in repo_ids.items():
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise ValueError(
                f"export.push_to_hub: {repo_id!r} (task {task!r}) is not a Hub repo id: {err}"
            ) from None


def check_can_push() -> None:
    """Fail before the run, not after it, when the upload could not happen."""
    if hub_offline():
        raise ValueError(
            "export.push_to_hub: the Hub is switched off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); "
            "unset it for this run, or upload the merged folders later with `hf upload`"
        )
    if get_token() is None:
        raise ValueError(
            "export.push_to_hub: no Hugging Face token; set HF_TOKEN or run `hf auth login` before the run"
        )


def push_folders(folders: Mapping[str, Path], repo_ids: Mapping[str, str], private: bool) -> dict[str, str]:
    """Publish each merged folder (weights, tokenizer, model card) to its Hub repository,
    created if needed; returns task -> the commit's URL."""
    api = HfApi()
    urls = {}
    for task, path in folders.items():
        repo_id = repo_ids[task]
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=path, commit_message="divmerge-pl: merged model and its card"
        )
        urls[task] = str(getattr(commit, "commit_url", commit))
    return urls


def write_outputs(
    folder: Path,
    models: Iterable[tuple[str, PreTrainedModel]] | None,
    coefficients: dict | None,
    report: dict,
    tokenizer=None,
    overwrite: bool = False,
    dtype: str = "float32",
    max_shard_size: str | int | None = None,
    card: Callable[[str], ModelCard] | None = None,
    adapters: Mapping[str, MergedAdapter] | None = None,
    adapter_card: Callable[[str], ModelCard] | None = None,
    row_coefficients: Mapping[str, Tensor] | None = None,
) -> dict[str, Path]:
    """``models`` None: no ``merged/`` (the coefficients and experts rebuild it); ``adapters``
    (``adapter_export``): ``merged_adapter/`` too; ``row_coefficients`` (a channel layout's
    [tasks x rows] per tensor): ``coefficients.safetensors``. Returns the merged folders written,
    by task (``""``: the one causal LM)."""
    folder.mkdir(parents=True, exist_ok=True)
    check_free(folder, overwrite)
    written: dict[str, Path] = {}
    if models is not None:
        written = write_merged(folder, models, tokenizer, dtype, max_shard_size, card)
    elif (folder / "merged").exists():  # overwriting: an earlier run's weights would pass for these
        shutil.rmtree(folder / "merged")
    if adapters:
        write_adapters(folder, adapters, dtype, adapter_card)
    elif (folder / ADAPTER_FOLDER).exists():  # likewise
        shutil.rmtree(folder / ADAPTER_FOLDER)
    if coefficients is not None:  # training-free methods have none of their own
        write_json(folder / "coefficients.json", coefficients)
    if row_coefficients:
        with atomic_file(folder / ROW_COEFFICIENTS) as tmp:
            save_file({name: t.contiguous() for name, t in row_coefficients.items()}, str(tmp))
    elif (folder / ROW_COEFFICIENTS).exists():  # overwriting: an earlier run's rows are not these
        (folder / ROW_COEFFICIENTS).unlink()
    write_json(folder / "report.json", report)
    return written


def _fmt(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def print_report(report: dict, title: str, console: Console | None = None) -> None:
    """The table a run ends with: expert, merged and normalised score per task, and means."""
    table = Table(title=title)
    table.add_column("task")
    for column in ("expert", "merged", "normalized"):
        table.add_column(
            f"{column} {report['metric']}" if column != "normalized" else column, justify="right"
        )
    for task, row in report["tasks"].items():
        table.add_row(task, _fmt(row["expert"]), _fmt(row["merged"]), _fmt(row["normalized"]))
    avg = report["average"]
    table.add_row("average", _fmt(avg["expert"]), _fmt(avg["merged"]), _fmt(avg["normalized"]), style="bold")
    (console or Console()).print(table)
