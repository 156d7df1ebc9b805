"""``divmerge-pl merge`` and ``divmerge-pl compare``: every method through the same harness.

Both take the same config as ``fit`` and a method of the registry (methods.py) with its own
published settings. A training-free method is applied to the loaded task vectors (its scale
chosen on the labelled validation rows, if the tasks have ``val_files``) and scored by
``trainer.validate``; a learned one is a ``fit`` with the method's settings. Either way the
outputs are written by the same
``MergedModelExport``, so every method's report comes from the same code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import MergedModelExport
from .data import MergeDataModule
from .export import write_json
from .methods import DEFAULT_METHODS, LearnedMethod, get_method
from .plots import comparison_bars


def _cli(args: list[str]):
    from .cli import build_cli  # the CLI imports this module

    return build_cli(args, run=False)


def _export_callback(trainer) -> MergedModelExport:
    return next(c for c in trainer.callbacks if isinstance(c, MergedModelExport))


def shared_datamodule(cli_args: list[str], root: Path) -> MergeDataModule:
    """The data of ``cli_args``'s config, for every method of a comparison: its rows are read and
    tokenised once (the first run sets it up), not once per method."""
    return _cli([*cli_args, f"--trainer.default_root_dir={root}"]).datamodule


def learned_args(method: LearnedMethod) -> list[str]:
    """The method's settings as options of ``fit``: model options and its number of epochs."""

    def value(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v)

    options = [f"--model.init_args.{k}={value(v)}" for k, v in method.model_options().items()]
    return [*options, f"--trainer.max_epochs={method.epochs}"]


def after_configs(cli_args: list[str], options: list[str]) -> list[str]:
    """``options`` placed after the last ``--config``: the method's settings override the config
    file's, and the user's own command-line options override the method's."""
    ends = [i + 2 for i, a in enumerate(cli_args) if a == "--config"]
    ends += [i + 1 for i, a in enumerate(cli_args) if a.startswith("--config=")]
    at = max(ends, default=0)
    return [*cli_args[:at], *options, *cli_args[at:]]


def run_method(
    method: str,
    cli_args: list[str],
    overrides: dict[str, Any] | None = None,
    datamodule: MergeDataModule | None = None,
) -> Path:
    """Run one registry method (with ``overrides`` of its settings) on the config in
    ``cli_args``; returns the folder holding its outputs. ``datamodule``: one built from the same
    data config and shared between runs, so its rows are read and tokenised once."""
    chosen = get_method(method, overrides)
    if isinstance(chosen, LearnedMethod):
        cli = _cli(after_configs(cli_args, learned_args(chosen)))
        cli.trainer.fit(cli.model, datamodule=datamodule or cli.datamodule)
        return _export_callback(cli.trainer).folder(cli.trainer)
    cli = _cli(cli_args)
    model, trainer = cli.model, cli.trainer
    export = _export_callback(trainer)
    model.use_static_merge(chosen.build(), method=chosen)  # chooses its settings on val_files first
    export.on_fit_start(trainer, model)  # an earlier run's outputs stop us before any work
    trainer.validate(model, datamodule=datamodule or cli.datamodule)
    return export.export(trainer, model)


def method_args(text: str | None) -> dict[str, Any]:
    """``--method_args``: YAML or JSON text, or the path of a YAML file."""
    if text is None:
        return {}
    path = Path(text).expanduser()
    loaded = yaml.safe_load(path.read_text() if path.is_file() else text)
    if not isinstance(loaded, dict):
        raise ValueError(f"--method_args must be a mapping of settings (YAML or JSON), got {text!r}")
    return loaded


def merge_main(argv: list[str]) -> Path:
    parser = argparse.ArgumentParser(
        prog="divmerge-pl merge",
        description="Merge with one method of the registry (README: methods) and write the outputs "
        "of `fit` (merged/, report.json, ...). Other options (--config, --trainer.*, --model.*, "
        "--data.*) are those of `fit`.",
    )
    parser.add_argument(
        "--method", required=True, help="a name of the method registry, e.g. ties, divmerge_layer"
    )
    parser.add_argument(
        "--method_args",
        default=None,
        help="the method's settings to override, as YAML/JSON or a YAML file, e.g. '{density: 0.1}' "
        "or '{lr: 0.005}'; a training-free method's parameter given here is not chosen on validation",
    )
    parser.add_argument("--select_scale", default=None, help=argparse.SUPPRESS)
    ours, rest = parser.parse_known_args(argv)
    if ours.select_scale is not None:
        raise ValueError(
            "--select_scale is gone: it chose the scale on the rows the report scores. Give each task "
            "val_files (a labelled validation split): task_arithmetic, ties and dare then choose their "
            "scale there, from the grid of the method registry (override with --method_args '{grid: ...}')"
        )
    return run_method(ours.method, rest, method_args(ours.method_args))


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
    parser.add_argument(
        "--method_args",
        default=None,
        help="per method, its settings to override, as YAML/JSON or a YAML file: "
        "'{adamerging_layer: {lr: 0.005}, ties: {density: 0.1}}'",
    )
    ours, rest = parser.parse_known_args(argv)
    methods = [m.strip() for m in ours.methods.split(",") if m.strip()]
    settings = method_args(ours.method_args)
    unknown = sorted(set(settings) - set(methods))
    if unknown:
        raise ValueError(f"--method_args names {unknown}, which are not among --methods {methods}")
    for method in methods:
        get_method(method, settings.get(method))  # every name and setting checked before the first run
    out = Path(ours.output_dir).expanduser()
    taken = [n for n in ("comparison.json", "comparison.md", "comparison.png") if (out / n).exists()]
    if taken and not ours.overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}; pass --overwrite or another --output_dir"
        )
    results, runs, seconds = {}, {}, {}
    data = shared_datamodule(rest, out)
    for method in methods:
        rank_zero_info(f"compare: running {method}")
        start = time.perf_counter()
        folder = run_method(
            method,
            [*rest, f"--trainer.default_root_dir={out / method}"],
            settings.get(method),
            datamodule=data,
        )
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
