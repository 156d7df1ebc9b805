"""``divmerge-pl``: one LightningCLI, so strategy, devices, precision, loggers and callbacks
come from the Trainer's own options and configs. Its subcommands are the Trainer's ``fit``,
``validate`` and ``test``, and ``merge`` and ``compare``, which run training-free and learned
methods through the same harness (commands.py); all take the same ``--config``."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from . import commands
from .methods import DEFAULT_METHODS
from .quiet import filter_notices
from .run_cli import CLI_SETTINGS, USAGE, RunCLI

# The Trainer's own subcommands we offer. ``predict`` is not: a merge has no prediction step
# (its outputs are merged/ and the report); predict with the exported merged/ model instead.
TRAINER_SUBCOMMANDS = ("fit", "validate", "test")


class DivMergeCLI(RunCLI):
    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        trainer = {k: v for k, v in LightningCLI.subcommands().items() if k in TRAINER_SUBCOMMANDS}
        return {**trainer, "merge": set(), "compare": set()}

    @override
    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        # Lightning takes each subcommand's options (and help line) from the Trainer method of
        # that name and has no public hook for others; merge and compare are methods of this
        # class, so their typed arguments become options the same way (--config, --trainer.*,
        # --model.*, --data.* come with every subcommand's parser).
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        parser_subcommands = parser.add_subcommands()
        for name in self.subcommands():
            owner = self.trainer_class if name in TRAINER_SUBCOMMANDS else type(self)
            description = (getattr(owner, name).__doc__ or "").strip().split("\n")[0]
            settings = {"description": description, **kwargs.get(name, {})}
            subparser = self._prepare_subcommand_parser(owner, name, **settings)
            self._subcommand_parsers[name] = subparser
            parser_subcommands.add_subcommand(name, subparser, help=description)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # merge and compare build each method's run from the command line's own words
        given = sys.argv[1:] if args is None else args
        self.command_line = list(given) if isinstance(given, (list, tuple)) else []
        super().parse_arguments(parser, args)

    @override
    def instantiate_classes(self) -> None:
        # merge and compare build a run per method (commands.py), each with the method's own
        # settings, so nothing is instantiated for them here.
        if self.subcommand in TRAINER_SUBCOMMANDS or self.subcommand is None:
            super().instantiate_classes()

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        # Lightning runs only Trainer methods (see _add_subcommands).
        if subcommand in TRAINER_SUBCOMMANDS:
            return super()._run_subcommand(subcommand)
        given = self.config[subcommand]
        options = self._subcommand_method_arguments[subcommand]
        check_own_options_on_command_line(subcommand, getattr(self, subcommand), given, self.command_line)
        self.result = getattr(self, subcommand)(**{k: given[k] for k in options})

    def run_options(self, subcommand: str) -> list[str]:
        """The command line after ``subcommand``, less its own options: ``fit``'s options
        (``--config``, ``--trainer.*``, ...), which each method's run is built from."""
        if self.command_line[:1] != [subcommand]:
            raise ValueError(
                f"divmerge-pl {subcommand}: give its options after the word {subcommand} on a command "
                f"line (a list of strings, not a dict), e.g. divmerge-pl {subcommand} --config merge.yaml"
            )
        rest = self.command_line[self.command_line.index(subcommand) + 1 :]
        names = self._subcommand_method_arguments[subcommand]
        own = {f"--{name}{plus}" for name in names for plus in ("", "+")}  # "+": append to a list
        kept: list[str] = []
        skip_value = False
        for arg in rest:
            if skip_value:
                skip_value = False
            elif arg in own:
                skip_value = True
            elif arg.split("=", 1)[0] not in own:
                kept.append(arg)
        return kept

    def merge(
        self,
        method: str,
        method_args: dict[str, Any] | str | None = None,
        select_scale: str | None = None,
    ) -> Any:
        """Merge with one method of the registry and write the outputs of fit (merged/, report.json, ...).

        Args:
            method: a name of the method registry (README: methods), e.g. ties, divmerge_layer.
            method_args: the method's settings to override, as YAML/JSON or a YAML file, e.g.
                '{density: 0.1}' or '{lr: 0.005}'; a training-free method's parameter given here is
                not chosen on validation.
            select_scale: gone (it chose the scale on the rows the report scores); giving it is an
                error that says what replaced it.
        """
        if select_scale is not None:
            raise ValueError(
                "--select_scale is gone: it chose the scale on the rows the report scores. Give each "
                "task val_files (a labelled validation split): task_arithmetic, ties and dare then choose "
                "their scale there, from the grid of the method registry (override with --method_args "
                "'{grid: ...}')"
            )
        return commands.merge(self.run_options("merge"), method, method_args)

    def compare(
        self,
        methods: list[str] | str = DEFAULT_METHODS,
        output_dir: str = "runs/compare",
        overwrite: bool = False,
        method_args: dict[str, Any] | str | None = None,
    ) -> Any:
        """Run several methods on the same experts and data and tabulate their reports.

        Args:
            methods: method names, a list or separated by commas.
            output_dir: where comparison.{json,md,png} and a run per method are written.
            overwrite: replace an earlier comparison in output_dir.
            method_args: per method, its settings to override, as YAML/JSON or a YAML file:
                '{adamerging_layer: {lr: 0.005}, ties: {density: 0.1}}'.
        """
        return commands.compare(self.run_options("compare"), methods, output_dir, overwrite, method_args)


def check_own_options_on_command_line(
    subcommand: str, method: Callable[..., Any], given: Namespace, command_line: list[str]
) -> None:
    """A run per method is built from fit's options, so a config file holding merge's or
    compare's own option (``method:``) would fail there with an unknown key; say so here."""
    on_line = {arg.split("=", 1)[0].rstrip("+") for arg in command_line if arg.startswith("--")}
    defaults = inspect.signature(method).parameters
    in_files = [
        name
        for name, parameter in defaults.items()
        if f"--{name}" not in on_line and given.get(name) != parameter.default
    ]
    if in_files:
        raise ValueError(
            f"divmerge-pl {subcommand}: {', '.join(in_files)} came from a config file; give "
            f"{', '.join('--' + n for n in in_files)} on the command line instead (config files hold "
            "fit's settings, which every method's run reads)"
        )


def build_cli(args: list[str] | None = None, run: bool = True) -> DivMergeCLI:
    return DivMergeCLI(
        **CLI_SETTINGS,
        args=args,
        run=run,
        # one usage line, so a config mistake's message is not buried under every Trainer option
        parser_kwargs={name: {"usage": USAGE.format(name=name)} for name in DivMergeCLI.subcommands()},
    )


def console() -> None:
    """The ``divmerge-pl`` command: a bad input ends in one line naming it, not a traceback
    (``DIVMERGE_TRACEBACK=1`` shows the traceback)."""
    try:
        main()
    except (ValueError, OSError, TypeError) as err:
        if os.environ.get("DIVMERGE_TRACEBACK"):
            raise
        sys.stderr.write(f"divmerge-pl: error: {err}\n(set DIVMERGE_TRACEBACK=1 for the traceback)\n")
        raise SystemExit(2) from None
    finally:  # a DDP run's group ends here, not in the interpreter's teardown (where gloo's threads
        # can abort a process that has finished its work: "terminate called without an active exception")
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(args: list[str] | None = None) -> Any:
    """Run ``divmerge-pl`` on ``args`` (the process's arguments when None); returns what merge
    (the run's folder) or compare (the comparison) returns, else the CLI."""
    # HF_HUB_OFFLINE is the user's to set: models may be Hub ids (hub.py)
    filter_notices()
    cli = build_cli(args)  # None: LightningCLI reads sys.argv itself
    return getattr(cli, "result", cli)


if __name__ == "__main__":
    console()
