"""``divmerge-pl``: a LightningCLI, so strategy, devices, precision, loggers and callbacks
come from the Trainer's own options and configs; plus ``merge`` and ``compare``, which run
training-free and learned methods through the same harness (see commands.py)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .callbacks import CoefficientMonitor, MergedModelExport
from .data import MergeDataModule
from .module import DivMergeModule


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

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint while parsing (for its hyperparameters): check it first
        # so a damaged file is named instead of surfacing as a bare zip-reader error.
        if self.config.get("subcommand"):
            config = self.config[self.config.subcommand]
            if config.get("ckpt_path") == "last":
                # Lightning's "last" looks in this run's own (new, empty) version folder; resuming
                # means the newest last.ckpt of an earlier run under the same default_root_dir
                config["ckpt_path"] = latest_checkpoint(config["trainer"].get("default_root_dir"))
            check_checkpoint(config.get("ckpt_path"))
        super()._parse_ckpt_path()


def latest_checkpoint(root: str | None) -> str | None:
    """The newest ``last.ckpt`` under ``root`` (None, and a fresh start, if there is none)."""
    found = sorted(
        Path(root or ".").expanduser().glob("lightning_logs/version_*/checkpoints/last.ckpt"),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        rank_zero_info(f"--ckpt_path last: no last.ckpt under {root or '.'!r}; starting a new run")
        return None
    rank_zero_info(f"--ckpt_path last: resuming from {found[-1]}")
    return str(found[-1])


def check_checkpoint(path: str | None) -> None:
    """A truncated or corrupted checkpoint fails here, named, not deep inside a restore."""
    if path is None or path in ("last", "best", "hpc", "registry") or not os.path.isfile(path):
        return  # Lightning resolves the keywords and reports a missing file itself
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several kinds for a damaged file
        raise ValueError(
            f"checkpoint {path!r} cannot be read ({type(err).__name__}: {err}); it is truncated or "
            "corrupted: resume from another one (checkpoints/ keeps last.ckpt and the newest epoch) "
            "or start a new run without --ckpt_path"
        ) from err
    if "state_dict" not in state or "coefficients" not in state["state_dict"]:
        raise ValueError(f"checkpoint {path!r} is not a divmerge-pl checkpoint (it holds no coefficients)")


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
