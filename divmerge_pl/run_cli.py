"""One merge run's LightningCLI: the options, links and callbacks every run has (``fit``,
``validate``, ``test``, and each method of ``merge`` / ``compare``), and the parse-time resume
check. ``cli.py`` adds the subcommands on top; ``commands.py`` builds one run per method from it,
so neither imports the other's module back."""

from __future__ import annotations

import copy
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from .callbacks import CoefficientMonitor, MergedModelExport
from .data import MergeDataModule
from .module import DivMergeModule
from .resume import check_resume, latest_checkpoint
from .run_outputs import RunFolderConfig

USAGE = "divmerge-pl {name} --config CONFIG [options] (--help lists them)"


class RunCLI(LightningCLI):
    """DivMergeModule and MergeDataModule with the export, the coefficient monitor and kilobyte
    checkpoints always on."""

    @override
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
    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Lightning's own version parses exactly so, but warns whenever ``args`` is given while
        # the process has command-line arguments; ours always has (``divmerge-pl merge`` builds a
        # run per method from the command line it was given), so that warning is never news.
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)
        # Public API, before anything is instantiated: `--ckpt_path last` is resolved and the
        # checkpoint is read safely and checked against the merge's settings here, so resuming
        # another merge's run fails before any model loads, whatever Lightning then does with it.
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


CLI_SETTINGS: dict[str, Any] = {
    "model_class": DivMergeModule,
    "datamodule_class": MergeDataModule,
    "subclass_mode_model": True,
    "subclass_mode_data": True,
    "auto_configure_optimizers": False,
    # config.yaml in the run's own folder, whatever the logger (Lightning's goes to trainer.log_dir,
    # a W&B or MLflow logger's shared root, where the second run stops)
    "save_config_callback": RunFolderConfig,
}


def build_run(args: list[str]) -> RunCLI:
    """Model, data and Trainer of one run from ``fit``'s options (``--config``, ``--model.*``,
    ...), nothing run yet."""
    return RunCLI(**CLI_SETTINGS, args=args, run=False, parser_kwargs={"usage": USAGE.format(name="merge")})
