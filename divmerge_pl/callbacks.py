"""Callbacks that plug DivMerge's outputs into any Lightning run."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from transformers import AutoTokenizer

from .export import check_free, print_report, write_outputs
from .module import DivMergeModule
from .plots import coefficient_heatmap, divergence_curves


class MergedModelExport(L.Callback):
    """At the end of ``fit``: write ``merged/``, ``coefficients.json``, ``report.json`` and the
    figures ``coefficients.png`` and ``divergence.png`` into the run's log directory (or
    ``dirpath``) and print the report table."""

    def __init__(self, dirpath: str | None = None, overwrite: bool = False, plots: bool = True) -> None:
        """
        Args:
            dirpath: where to write; None means the trainer's ``log_dir``.
            overwrite: replace the outputs of an earlier run in the same folder.
            plots: also write the coefficient heatmap and the per-task divergence curves.
        """
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.plots = plots
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir).expanduser()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            check_free(self.folder(trainer), self.overwrite)  # fail now, not after the run

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(pl_module, DivMergeModule):
            return
        prefix = f"train/{pl_module.hparams.objective}/"
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and not key.endswith("_epoch"):
                self.history[key.removeprefix(prefix).removesuffix("_step")].append(
                    (trainer.global_step, float(value))
                )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, DivMergeModule):
            raise TypeError(f"MergedModelExport needs a DivMergeModule, got {type(pl_module)}")
        if trainer.interrupted:
            return
        self.export(trainer, pl_module)

    @rank_zero_only
    def export(self, trainer: L.Trainer, module: DivMergeModule) -> Path:
        """Write every output of ``module``'s current merge; also used by ``divmerge-pl merge``."""
        folder = self.folder(trainer)
        report = module.evaluate()
        coefficients = module.coefficient_table()
        tokenizer = AutoTokenizer.from_pretrained(module.frozen.paths["base"])
        write_outputs(
            folder,
            module.merged_models(),
            coefficients,
            report,
            tokenizer=tokenizer,
            overwrite=self.overwrite,
        )
        if self.plots and coefficients is not None:
            coefficient_heatmap(coefficients, folder / "coefficients.png")
        if self.plots and self.history:
            divergence_curves(self.history, module.hparams.objective, folder / "divergence.png")
        print_report(report, title=f"{report['method']} -> {folder}")
        return folder
