"""``divmerge-pl merge`` and ``divmerge-pl compare``: every method through the same harness.

Both take the same config as ``fit``. A training-free method is applied to the loaded task
vectors and scored by ``trainer.validate``; a learned one is a ``fit`` with the objective and
granularity its name gives. Either way the outputs are written by the same
``MergedModelExport``, so every method's report comes from the same code.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from .callbacks import MergedModelExport
from .data import MergeDataModule
from .export import write_json
from .plots import comparison_bars
from .static_merges import STATIC_MERGES, build_static_merge

_OBJECTIVES = {"divmerge": "js", "divmerge_kl": "kl", "adamerging": "entropy"}
_LEARNED = re.compile(r"^(divmerge_kl|divmerge|adamerging)(?:_(task|layer|block))?(?:_(ties|dare))?$")
DEFAULT_METHODS = "average,task_arithmetic,ties,dare,adamerging,divmerge_task,divmerge_layer"


def learned_overrides(method: str) -> list[str] | None:
    """``divmerge[_kl]|adamerging`` + ``_task|_layer|_block`` (default layer) + optional
    ``_ties|_dare`` (coefficients over processed vectors) -> the model options it sets."""
    match = _LEARNED.match(method)
    if match is None:
        return None
    family, granularity, transform = match.groups()
    return [
        f"--model.init_args.objective={_OBJECTIVES[family]}",
        f"--model.init_args.granularity={granularity or 'layer'}",
        f"--model.init_args.task_vector_transform={transform or 'none'}",
    ]


def check_method(method: str) -> None:
    if method not in STATIC_MERGES and learned_overrides(method) is None:
        raise ValueError(
            f"unknown method {method!r}: choose a training-free one ({', '.join(STATIC_MERGES)}) or a "
            "learned one named divmerge|divmerge_kl|adamerging [_task|_layer|_block] [_ties|_dare], "
            "e.g. divmerge_layer, adamerging, divmerge_task_ties"
        )


def _cli(args: list[str]):
    from .cli import build_cli  # the CLI imports this module

    return build_cli(args, run=False)


def _export_callback(trainer) -> MergedModelExport:
    return next(c for c in trainer.callbacks if isinstance(c, MergedModelExport))


def run_method(
    method: str,
    cli_args: list[str],
    params: dict[str, Any] | None = None,
    select_scale: list[float] | None = None,
    datamodule: MergeDataModule | None = None,
) -> Path:
    """Run one method on the config in ``cli_args``; returns the folder holding its outputs.
    ``datamodule``: one built from the same data config and shared between runs, so its rows
    are read and tokenised once."""
    check_method(method)
    overrides = learned_overrides(method)
    if overrides is not None:
        if params or select_scale:
            raise ValueError(f"--method_args / --select_scale apply to training-free methods, not {method!r}")
        cli = _cli([*cli_args, *overrides])
        cli.trainer.fit(cli.model, datamodule=datamodule or cli.datamodule)
        return _export_callback(cli.trainer).folder(cli.trainer)
    cli = _cli(cli_args)
    model, trainer = cli.model, cli.trainer
    export = _export_callback(trainer)
    model.use_static_merge(build_static_merge(method, **(params or {})))
    export.on_fit_start(trainer, model)  # an earlier run's outputs stop us before any work
    trainer.validate(model, datamodule=datamodule or cli.datamodule)
    if select_scale:
        _select_scale(model, method, params or {}, select_scale)
    return export.export(trainer, model)


def _select_scale(model, method: str, params: dict[str, Any], grid: list[float]) -> None:
    """Pick ``scale`` by the average normalised score on the labelled eval rows."""
    scores = {}
    for scale in grid:
        model.use_static_merge(build_static_merge(method, **{**params, "scale": scale}))
        scores[scale] = model.evaluate()["average"]["normalized"]
        rank_zero_info(f"{method}: scale {scale:g} -> average normalised score {scores[scale]:.4f}")
    best = max(scores, key=lambda s: -math.inf if math.isnan(scores[s]) else scores[s])
    model.use_static_merge(build_static_merge(method, **{**params, "scale": best}))
    rank_zero_warn(
        f"{method}: scale {best:g} chosen on the eval rows the report scores, so its score is "
        "optimistic; point eval_files at a separate validation split when choosing"
    )


def merge_main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="divmerge-pl merge",
        description="Merge with one method and write the outputs of `fit` (merged/, report.json, ...). "
        "Other options (--config, --trainer.*, --model.*, --data.*) are those of `fit`.",
    )
    parser.add_argument("--method", required=True, help=f"{', '.join(STATIC_MERGES)} or a learned method")
    parser.add_argument(
        "--method_args",
        type=json.loads,
        default=None,
        help="parameters of a training-free method as JSON, e.g. '{\"density\": 0.1}'",
    )
    parser.add_argument(
        "--select_scale",
        type=_floats,
        default=None,
        help="comma-separated scales to try (task_arithmetic, ties, dare); the best on "
        "the labelled eval rows is kept",
    )
    ours, rest = parser.parse_known_args(argv)
    return run_method(ours.method, rest, ours.method_args, ours.select_scale)


def compare_main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(
        prog="divmerge-pl compare",
        description="Run several methods on the same experts and data and tabulate their reports. "
        "Other options (--config, --trainer.*, ...) are those of `fit`.",
    )
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})"
    )
    parser.add_argument(
        "--output_dir", default="runs/compare", help="comparison.{json,md,png} and a run per method"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier comparison in output_dir"
    )
    ours, rest = parser.parse_known_args(argv)
    methods = [m.strip() for m in ours.methods.split(",") if m.strip()]
    for method in methods:
        check_method(method)  # all names checked before the first run
    out = Path(ours.output_dir).expanduser()
    taken = [n for n in ("comparison.json", "comparison.md", "comparison.png") if (out / n).exists()]
    if taken and not ours.overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}; pass --overwrite or another --output_dir"
        )
    results, runs, seconds = {}, {}, {}
    # every method reads the same rows: read and tokenise them once (the first run sets them up)
    data = _cli([*rest, f"--trainer.default_root_dir={out}"]).datamodule
    for method in methods:
        rank_zero_info(f"compare: running {method}")
        start = time.perf_counter()
        folder = run_method(method, [*rest, f"--trainer.default_root_dir={out / method}"], datamodule=data)
        seconds[method] = round(time.perf_counter() - start, 2)
        runs[method] = str(folder)
        results[method] = json.loads((folder / "report.json").read_text())
    comparison = {"methods": results, "runs": runs, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(comparison_table(results))
    comparison_bars(results, out / "comparison.png")
    print(comparison_table(results))
    return comparison


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown: per method, each task's normalised score (merged score in brackets) and the mean."""
    tasks = list(next(iter(results.values()))["tasks"])
    metric = next(iter(results.values()))["metric"]
    experts = next(iter(results.values()))["tasks"]
    lines = [
        f"Normalised score (merged / expert); the merged model's {metric} in brackets.",
        "",
        "| method | " + " | ".join(tasks) + " | average |",
        "|---|" + "---:|" * (len(tasks) + 1),
        "| *experts* | "
        + " | ".join(f"*{experts[t]['expert']:.4f}*" for t in tasks)
        + f" | *{next(iter(results.values()))['average']['expert']:.4f}* |",
    ]
    for method, report in results.items():
        cells = [
            f"{report['tasks'][t]['normalized']:.4f} ({report['tasks'][t]['merged']:.4f})" for t in tasks
        ]
        avg = report["average"]
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | **{avg['normalized']:.4f}** ({avg['merged']:.4f}) |"
        )
    return "\n".join(lines) + "\n"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]
