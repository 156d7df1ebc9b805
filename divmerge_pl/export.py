"""Writing a merge's results: ``merged/``, ``coefficients.json``, ``report.json``.

Everything is written into a temporary sibling and renamed into place, so an interrupted
export never leaves a folder that looks complete, and nothing existing is overwritten unless
the caller says so.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import PreTrainedModel

from .merged import save_model

OUTPUT_NAMES = ("merged", "coefficients.json", "report.json")


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


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        if final.is_dir():
            shutil.rmtree(final)
        else:
            final.unlink()
    os.replace(tmp, final)


def write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, allow_nan=True)
        handle.write("\n")
    _replace(Path(tmp), path)


def write_merged(folder: Path, models: Iterable[tuple[str, PreTrainedModel]], tokenizer=None) -> None:
    """``folder/merged/<task>/``: one loadable Hugging Face folder per task head."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".merged."))
    try:
        for task, model in models:
            save_model(model, tmp / task, tokenizer)
        _replace(tmp, folder / "merged")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_outputs(
    folder: Path,
    models: Iterable[tuple[str, PreTrainedModel]] | None,
    coefficients: dict | None,
    report: dict,
    tokenizer=None,
    overwrite: bool = False,
) -> None:
    """``models`` None: no ``merged/`` (the coefficients and experts rebuild it)."""
    folder.mkdir(parents=True, exist_ok=True)
    check_free(folder, overwrite)
    if models is not None:
        write_merged(folder, models, tokenizer)
    elif (folder / "merged").exists():  # overwriting: an earlier run's weights would pass for these
        shutil.rmtree(folder / "merged")
    if coefficients is not None:  # training-free methods have none of their own
        write_json(folder / "coefficients.json", coefficients)
    write_json(folder / "report.json", report)


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
