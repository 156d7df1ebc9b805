"""``divmerge-pl merge`` and ``divmerge-pl compare``: every method through the same harness.

Both take the same config as ``fit`` and a method of the registry (methods.py) with its own
published settings. A training-free method is the module's ``static_method`` argument, applied
to the loaded task vectors (its scale chosen on the labelled validation rows, if the tasks have
``val_files``) and scored by ``trainer.test``; a learned one is a ``fit`` with the method's
settings. Either way the outputs are written by the same ``MergedModelExport``, so every
method's report comes from the same code.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import MergedModelExport
from .data import MergeDataModule
from .export import write_json
from .methods import DEFAULT_METHODS, LearnedMethod, StaticMethod, get_method
from .plots import comparison_bars
from .run_cli import build_run


def _export_callback(trainer) -> MergedModelExport:
    return next(c for c in trainer.callbacks if isinstance(c, MergedModelExport))


def shared_datamodule(cli_args: list[str], root: Path) -> MergeDataModule:
    """The data of ``cli_args``'s config, for every method of a comparison: its rows are read and
    tokenised once (the first run sets it up), not once per method."""
    return build_run([*cli_args, f"--trainer.default_root_dir={root}"]).datamodule


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def learned_args(method: LearnedMethod) -> list[str]:
    """The method's settings as options of ``fit``: model options and its number of epochs (and
    no training-free method, should the config name one: a saved config of a ``merge`` run)."""
    options = [f"--model.init_args.{k}={_value(v)}" for k, v in method.model_options().items()]
    return [*options, "--model.init_args.static_method=null", f"--trainer.max_epochs={method.epochs}"]


def static_args(method: StaticMethod) -> list[str]:
    """The method as the module's ``static_method`` argument: what config.yaml records."""
    return [f"--model.init_args.static_method={json.dumps(asdict(method))}"]


def after_configs(cli_args: list[str], options: list[str]) -> list[str]:
    """``options`` placed after the last ``--config``: the method's settings override the config
    file's, and the user's own command-line options override the method's."""
    ends = [i + 2 for i, a in enumerate(cli_args) if a in ("--config", "-c")]
    ends += [i + 1 for i, a in enumerate(cli_args) if a.startswith(("--config=", "-c="))]
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
        cli = build_run(after_configs(cli_args, learned_args(chosen)))
        cli.trainer.fit(cli.model, datamodule=datamodule or cli.datamodule)
        return _export_callback(cli.trainer).folder(cli.trainer)
    cli = build_run(after_configs(cli_args, static_args(chosen)))
    model, trainer = cli.model, cli.trainer  # its settings are chosen on val_files as the test starts
    export = _export_callback(trainer)
    export.on_fit_start(trainer, model)  # an earlier run's outputs stop us before any work
    trainer.test(model, datamodule=datamodule or cli.datamodule)  # the scored rows: the report's
    return export.export(trainer, model)


def method_args(text: dict[str, Any] | str | None) -> dict[str, Any]:
    """``--method_args``: a mapping (the command line's YAML or JSON, already parsed), YAML or
    JSON text, or the path of a YAML file."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return text
    path = Path(text).expanduser()
    loaded = yaml.safe_load(path.read_text() if path.is_file() else text)
    if not isinstance(loaded, dict):
        raise ValueError(f"--method_args must be a mapping of settings (YAML or JSON), got {text!r}")
    return loaded


def merge(cli_args: list[str], method: str, settings: dict[str, Any] | str | None = None) -> Path:
    """``divmerge-pl merge``: one method on the run of ``cli_args`` (``fit``'s options)."""
    return run_method(method, cli_args, method_args(settings))


def compare(
    cli_args: list[str],
    methods: list[str] | str = DEFAULT_METHODS,
    output_dir: str | Path = "runs/compare",
    overwrite: bool = False,
    settings: dict[str, Any] | str | None = None,
) -> dict:
    """``divmerge-pl compare``: every method of ``methods`` on the same experts and data (rows
    read and tokenised once), a run per method under ``output_dir`` and their reports tabulated."""
    names = method_names(methods)
    per_method = method_args(settings)
    unknown = sorted(set(per_method) - set(names))
    if unknown:
        raise ValueError(f"--method_args names {unknown}, which are not among --methods {names}")
    for name in names:
        get_method(name, per_method.get(name))  # every name and setting checked before the first run
    out = Path(output_dir).expanduser()
    taken = [n for n in ("comparison.json", "comparison.md", "comparison.png") if (out / n).exists()]
    if taken and not overwrite:
        raise FileExistsError(
            f"{str(out)!r} already holds {', '.join(taken)}; pass --overwrite true or another --output_dir"
        )
    results, runs, seconds = {}, {}, {}
    data = shared_datamodule(cli_args, out)
    for name in names:
        rank_zero_info(f"compare: running {name}")
        start = time.perf_counter()
        folder = run_method(
            name,
            [*cli_args, f"--trainer.default_root_dir={out / name}"],
            per_method.get(name),
            datamodule=data,
        )
        seconds[name] = round(time.perf_counter() - start, 2)
        runs[name] = str(folder)
        results[name] = json.loads((folder / "report.json").read_text())
    comparison = {"methods": results, "runs": runs, "seconds": seconds}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(comparison_table(results))
    comparison_bars(results, out / "comparison.png")
    print(comparison_table(results))
    return comparison


def method_names(methods: list[str] | str) -> list[str]:
    """``--methods``: a list, or names separated by commas."""
    given = methods.split(",") if isinstance(methods, str) else methods
    return [m.strip() for m in given if m.strip()]


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
