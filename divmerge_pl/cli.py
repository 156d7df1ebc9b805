"""``divmerge-pl``: a LightningCLI, so strategy, devices, precision, loggers and callbacks
come from the Trainer's own options and configs; plus ``merge`` and ``compare``, which run
training-free and learned methods through the same harness (see commands.py)."""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callbacks import MergedModelExport
from .data import MergeDataModule
from .module import DivMergeModule


class DivMergeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The inputs are tokenised by the tokenizer of the model being merged.
        parser.link_arguments("model.init_args.base", "data.init_args.tokenizer")
        # Always on: every fit ends with merged/, coefficients.json and report.json.
        parser.add_lightning_class_args(MergedModelExport, "export")
        # Checkpoints hold only the coefficients and Adam's state (kilobytes): keep the last one
        # and one at any exception (Ctrl-C, a non-finite loss), so `--ckpt_path last` resumes.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_on_exception": True})


def build_cli(args: list[str] | None = None, run: bool = True) -> DivMergeCLI:
    return DivMergeCLI(
        DivMergeModule,
        MergeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def main(args: list[str] | None = None) -> None:
    # The model hub is never needed: every model is a local folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The frozen experts stay in eval mode on purpose (no dropout in teachers or merge).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in ("merge", "compare"):
        from .commands import compare_main, merge_main

        (merge_main if argv[0] == "merge" else compare_main)(argv[1:])
        return
    build_cli(args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
