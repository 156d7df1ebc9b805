"""``divmerge-pl``: a LightningCLI, so strategy, devices, precision, loggers and callbacks
come from the Trainer's own options and configs; plus ``merge`` and ``compare``, which run
training-free and learned methods through the same harness (see commands.py)."""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from .callbacks import CoefficientMonitor, MergedModelExport
from .data import MergeDataModule
from .module import DivMergeModule
from .resume import check_resume, latest_checkpoint


class DivMergeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The inputs are tokenised by the tokenizer of the model being merged.
        parser.link_arguments("model.init_args.base", "data.init_args.tokenizer")
        # Always on: every fit ends with merged/, coefficients.json and report.json.
        parser.add_lightning_class_args(MergedModelExport, "export")
        parser.add_lightning_class_args(CoefficientMonitor, "monitor")
        # Checkpoints hold only the coefficients and Adam's state (kilobytes): keep the last one
        # and one at any exception (Ctrl-C, a non-finite loss), so `--ckpt_path last` resumes.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_on_exception": True})

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # Public API, before anything is instantiated: `--ckpt_path last` is resolved and the
        # checkpoint is read safely and checked against the merge's settings here, so resuming
        # another merge's run fails before any model loads, whatever Lightning then does with it.
        super().parse_arguments(parser, args)
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        if config.get("ckpt_path") == "last":
            config["ckpt_path"] = latest_checkpoint(config["trainer"].get("default_root_dir"))
        check_resume(config.get("ckpt_path"), model_arguments(config.get("model")))
        # Lightning then applies the checkpoint's hyper-parameters over the config (from 2.5.5);
        # the merge-defining ones were just checked equal, and for the rest (allow_pickle,
        # teacher_cache, paths...) the command the user typed wins: see before_instantiate_classes
        self._typed_model = copy.deepcopy(config.get("model"))

    @override
    def before_instantiate_classes(self) -> None:
        typed = getattr(self, "_typed_model", None)
        if typed is not None and self.config.get("subcommand"):
            self.config[self.config.subcommand]["model"] = typed


def model_arguments(model: Any) -> dict[str, Any]:
    """The module's arguments from the parsed config (a class_path/init_args namespace)."""
    if model is None:
        return {}
    init = model.get("init_args", model) if hasattr(model, "get") else model
    return dict(init.as_dict() if hasattr(init, "as_dict") else init)


def build_cli(args: list[str] | None = None, run: bool = True) -> DivMergeCLI:
    return DivMergeCLI(
        DivMergeModule,
        MergeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        # one usage line, so a config mistake's message is not buried under every Trainer option
        parser_kwargs={
            name: {"usage": f"divmerge-pl {name} --config CONFIG [options] (--help lists them)"}
            for name in ("fit", "validate", "test", "predict")
        },
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


def main(args: list[str] | None = None) -> None:
    # The frozen experts stay in eval mode on purpose (no dropout in teachers or merge).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("merge", "compare"):
        from .commands import compare_main, merge_main

        (merge_main if argv[0] == "merge" else compare_main)(argv[1:])
        return
    build_cli(args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    console()
