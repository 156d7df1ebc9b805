"""Callbacks that plug DivMerge's outputs into any Lightning run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from transformers import AutoTokenizer

from .export import check_free, print_report, write_outputs
from .module import DivMergeModule


class MergedModelExport(L.Callback):
    """At the end of ``fit``: write ``merged/``, ``coefficients.json`` and ``report.json``
    into the run's log directory (or ``dirpath``) and print the report table."""

    def __init__(self, dirpath: str | None = None, overwrite: bool = False) -> None:
        """
        Args:
            dirpath: where to write; None means the trainer's ``log_dir``.
            overwrite: replace the outputs of an earlier run in the same folder.
        """
        self.dirpath = dirpath
        self.overwrite = overwrite

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir).expanduser()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            check_free(self._folder(trainer), self.overwrite)  # fail now, not after the run

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DivMergeModule):
            raise TypeError(f"MergedModelExport needs a DivMergeModule, got {type(pl_module)}")
        if trainer.interrupted:
            return
        self._export(trainer, pl_module)

    @rank_zero_only
    def _export(self, trainer: L.Trainer, module: DivMergeModule) -> None:
        folder = self._folder(trainer)
        report = module.evaluate()
        tokenizer = AutoTokenizer.from_pretrained(module.frozen.paths["base"])
        write_outputs(
            folder,
            module.merged_models(),
            module.coefficient_table(),
            report,
            tokenizer=tokenizer,
            overwrite=self.overwrite,
        )
        print_report(
            report,
            title=f"DivMerge ({module.hparams.objective}, {module.hparams.granularity}) -> {folder}",
        )
