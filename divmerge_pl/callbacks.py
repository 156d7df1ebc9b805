"""Callbacks that plug DivMerge into any Lightning run. Each takes typed arguments, so
LightningCLI configures it (see the YAML fragments in the top-level callbacks/ folder)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, PreTrainedModel

from .coefficients import Granularity
from .data import MergeDataModule
from .export import check_free, print_report, write_outputs
from .hub import local_or_snapshot
from .module import DivMergeModule
from .plots import coefficient_heatmap, divergence_curves
from .teachers import DEFAULT_CACHE


def _divmerge(pl_module: L.LightningModule, callback: L.Callback) -> DivMergeModule:
    if not isinstance(pl_module, DivMergeModule):
        raise TypeError(f"{type(callback).__name__} needs a DivMergeModule, got {type(pl_module).__name__}")
    return pl_module


class CoefficientMonitor(L.Callback):
    """Watch the optimisation: log each task's coefficient mean/min/max every step, and at the
    end print a table of them and write ``coefficients.png`` (tasks x groups heatmap) and
    ``divergence.png`` (each task's objective against the step) into the run's log directory."""

    def __init__(self, log_stats: bool = True, table: bool = True, plots: bool = True) -> None:
        """
        Args:
            log_stats: log ``coef/<task>/{mean,min,max}`` to the Trainer's loggers every step.
            table: print the per-task coefficient table at the end of ``fit``.
            plots: write the heatmap and the divergence curves at the end of ``fit``.
        """
        self.log_stats = log_stats
        self.table = table
        self.plots = plots
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        module = _divmerge(pl_module, self)
        gamma = module.merge_coefficients().detach()
        if self.log_stats:
            for t, task in enumerate(module.tasks):
                module.log(f"coef/{task}/mean", gamma[t].mean())
                if gamma.shape[1] > 1:
                    module.log(f"coef/{task}/min", gamma[t].min())
                    module.log(f"coef/{task}/max", gamma[t].max())
        prefix = f"train/{module.hparams.objective}/"
        for key, value in trainer.callback_metrics.items():
            if key.startswith(prefix) and not key.endswith("_epoch"):
                task = key.removeprefix(prefix).removesuffix("_step")
                self.history[task].append((trainer.global_step, float(value)))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)  # on every rank: it broadcasts
        self._report(folder, _divmerge(pl_module, self))

    @rank_zero_only
    def _report(self, folder: Path, module: DivMergeModule) -> None:
        coefficients = module.coefficient_table()
        if coefficients is None:
            return
        if self.table:
            print_coefficients(coefficients)
        if self.plots:
            coefficient_heatmap(coefficients, folder / "coefficients.png")
            if self.history:
                divergence_curves(self.history, module.hparams.objective, folder / "divergence.png")


def print_coefficients(coefficients: dict, console: Console | None = None) -> None:
    table = Table(
        title=f"coefficients ({coefficients['granularity']}, {len(coefficients['groups'])} group(s))"
    )
    for column in ("task", "mean", "min", "max"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, row in zip(coefficients["tasks"], coefficients["values"], strict=True):
        table.add_row(task, f"{sum(row) / len(row):.4f}", f"{min(row):.4f}", f"{max(row):.4f}")
    (console or Console()).print(table)


class MergedModelExport(L.Callback):
    """At the end of ``fit``: write ``merged/``, ``coefficients.json`` and ``report.json`` into
    the run's log directory (or ``dirpath``) and print the report table."""

    def __init__(
        self, dirpath: str | None = None, overwrite: bool = False, save_weights: bool = True
    ) -> None:
        """
        Args:
            dirpath: where to write; None means the trainer's ``log_dir``.
            overwrite: replace the outputs of an earlier run in the same folder.
            save_weights: write ``merged/`` (one whole model per task). False keeps the report and
                coefficients only: for sweeps that score many merges, where k tasks' weights on
                disk for every run add up to tens of GB.
        """
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.save_weights = save_weights

    def folder(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or trainer.log_dir or trainer.default_root_dir).expanduser()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self.folder(trainer)  # on every rank: trainer.log_dir broadcasts
        if trainer.is_global_zero:
            check_free(folder, self.overwrite)  # fail now, not after the run

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = _divmerge(pl_module, self)
        if trainer.interrupted:
            return
        self.export(trainer, module)

    def export(self, trainer: L.Trainer, module: DivMergeModule) -> Path:
        """Write every output of ``module``'s current merge (rank 0); also used by ``divmerge-pl merge``."""
        folder = self.folder(trainer)  # on every rank: trainer.log_dir broadcasts
        self._write(folder, module)
        return folder

    @rank_zero_only
    def _write(self, folder: Path, module: DivMergeModule) -> None:
        report = module.evaluate()
        tokenizer = AutoTokenizer.from_pretrained(module.frozen.paths["base"])
        write_outputs(
            folder,
            module.merged_models() if self.save_weights else None,
            module.coefficient_table(),
            report,
            tokenizer=tokenizer,
            overwrite=self.overwrite,
        )
        print_report(report, title=f"{report['method']} -> {folder}")


class MergeOnFitEnd(L.Callback):
    """For your own LightningModule that fine-tunes a ``transformers`` model: when your ``fit``
    ends, save the fine-tuned model as the expert of ``task`` and merge it by DivMerge with the
    other ``experts`` on ``data``'s unlabelled inputs; the merged model lands in ``output_dir``.

    Your module needs to know nothing of divmerge-pl: the model is found as its only
    ``PreTrainedModel`` submodule (or the attribute ``model_attribute``).
    """

    def __init__(
        self,
        task: str,
        expert_dir: str,
        base: str,
        experts: dict[str, str],
        data: MergeDataModule,
        output_dir: str,
        model_attribute: str | None = None,
        objective: Literal["js", "kl", "entropy"] = "js",
        granularity: Granularity = "layer",
        lr: float = 1e-2,
        max_epochs: int = 4,
        teacher_cache: str | None = str(DEFAULT_CACHE),
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            task: the task your module fine-tunes (a task name in ``data``).
            expert_dir: where your fine-tuned model is saved (``save_pretrained``).
            base: the pretrained model your module started from.
            experts: the other experts, task name -> folder.
            data: the merge's inputs (one task per expert, yours included).
            output_dir: where merged/, coefficients.json and report.json are written.
            model_attribute: the attribute of your module holding the model, if not found alone.
            objective, granularity, lr, max_epochs, teacher_cache: as in DivMergeModule / Trainer.
            overwrite: replace an existing ``expert_dir`` and earlier outputs in ``output_dir``.
        """
        if task in experts:
            raise ValueError(f"MergeOnFitEnd: task {task!r} is yours; leave it out of experts")
        self.task = task
        self.expert_dir = Path(expert_dir).expanduser()
        self.base = base
        self.experts = dict(experts)
        self.data = data
        self.output_dir = Path(output_dir).expanduser()
        self.model_attribute = model_attribute
        self.merge_args = {"objective": objective, "granularity": granularity, "lr": lr}
        self.max_epochs = max_epochs
        self.teacher_cache = teacher_cache
        self.overwrite = overwrite

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._model(pl_module)  # a module without a transformers model fails now, not after training
        if self.expert_dir.exists() and any(self.expert_dir.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"MergeOnFitEnd: {str(self.expert_dir)!r} is not empty; set overwrite: true"
            )

    def _model(self, pl_module: L.LightningModule) -> PreTrainedModel:
        if self.model_attribute is not None:
            model = getattr(pl_module, self.model_attribute, None)
            if not isinstance(model, PreTrainedModel):
                raise TypeError(
                    f"MergeOnFitEnd: {type(pl_module).__name__}.{self.model_attribute} "
                    "is not a transformers PreTrainedModel"
                )
            return model
        found = [m for m in pl_module.modules() if isinstance(m, PreTrainedModel)]
        outermost = [m for m in found if not any(m is not o and m in list(o.modules()) for o in found)]
        if len(outermost) != 1:
            raise TypeError(
                f"MergeOnFitEnd: {type(pl_module).__name__} holds {len(outermost)} transformers models; "
                "name the one to merge with model_attribute"
            )
        return outermost[0]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        if trainer.is_global_zero:
            self.merge(self._model(pl_module), trainer)
        trainer.strategy.barrier("divmerge-merge-on-fit-end")

    def merge(self, model: PreTrainedModel, trainer: L.Trainer | None = None) -> Path:
        """Save ``model`` (with the base's tokenizer) as the expert, then run DivMerge on one
        device, with the progress bar, logging and precision of ``trainer`` (the user's own
        run, when called from it); returns ``output_dir``."""
        model.save_pretrained(self.expert_dir)
        base = local_or_snapshot(self.base, "MergeOnFitEnd base")  # a folder, or a Hub id's snapshot
        try:
            AutoTokenizer.from_pretrained(base).save_pretrained(self.expert_dir)
        except (OSError, ValueError):  # a base folder without a tokenizer: the expert has none either
            pass
        module = DivMergeModule(
            base=self.base,
            experts={**self.experts, self.task: str(self.expert_dir)},
            teacher_cache=self.teacher_cache,
            **self.merge_args,
        )
        if self.data.tokenizer_path is None:
            self.data.tokenizer_path = self.base
        show_progress = trainer is None or trainer.progress_bar_callback is not None
        logs = trainer is None or bool(trainer.loggers)
        self.merger = L.Trainer(
            max_epochs=self.max_epochs,
            devices=1,
            precision=trainer.precision if trainer is not None else "32-true",
            logger=CSVLogger(self.output_dir, name="divmerge") if logs else False,
            callbacks=[
                MergedModelExport(dirpath=str(self.output_dir), overwrite=self.overwrite),
                CoefficientMonitor(),
                # the user's run may still hold a rich live display: no nesting
                *([TQDMProgressBar()] if show_progress else []),
            ],
            enable_progress_bar=show_progress,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        self.merger.fit(module, datamodule=self.data)
        return self.output_dir
