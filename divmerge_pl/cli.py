"""``divmerge-pl``: a LightningCLI, so strategy, devices, precision, loggers and callbacks
come from the Trainer's own options and configs."""

from __future__ import annotations

import os
import warnings

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


def main(args: list[str] | None = None) -> None:
    # The model hub is never needed: every model is a local folder.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The frozen experts stay in eval mode on purpose (no dropout in teachers or merge).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    DivMergeCLI(
        DivMergeModule,
        MergeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
