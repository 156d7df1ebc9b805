"""Callbacks that plug DivMerge into any Lightning run. Each takes typed arguments, so
LightningCLI configures it (see the YAML fragments in the top-level callbacks/ folder)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console
from rich.table import Table
from transformers import AutoTokenizer, PreTrainedModel
from typing_extensions import override

from .adapter_export import adapter_cards, adapter_folders, adapters_to_write
from .coefficients import Granularity
from .data import MergeDataModule
from .export import (
    ExportDtype,
    ExportOptions,
    check_can_push,
    check_free,
    check_repo_ids,
    export_dtype,
    hub_repo_ids,
    print_report,
    push_folders,
    write_outputs,
)
from .hub import local_or_snapshot
from .model_card import MergeFacts, hub_id, model_card
from .module import DivMergeModule
from .plots import close_figure, coefficient_figure, divergence_figure, save_figure
from .run_outputs import log_figure, log_report, shared_run_folder
from .teachers import DEFAULT_CACHE


def _divmerge(pl_module: L.LightningModule, callback: L.Callback) -> DivMergeModule:
    if not isinstance(pl_module, DivMergeModule):
        raise TypeError(f"{type(callback).__name__} needs a DivMergeModule, got {type(pl_module).__name__}")
    return pl_module


class CoefficientMonitor(L.Callback):
    """Watch the optimisation: log each task's coefficient mean/min/max every step, and at the
    end print a table of them and write ``coefficients.png`` (tasks x groups heatmap) and
    ``divergence.png`` (each task's objective against the step) into the run's folder; the
    figures also go to every logger that takes images (TensorBoard, W&B, MLflow).

    A run with fewer steps than the Trainer's ``log_every_n_steps`` (50 unless set) would log
    no step at all: such a run logs every step instead."""

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        steps = trainer.estimated_stepping_batches
        if trainer.loggers and 0 < steps < trainer.log_every_n_steps:
            rank_zero_info(
                f"CoefficientMonitor: the run has {int(steps)} step(s), fewer than "
                f"log_every_n_steps={trainer.log_every_n_steps}: logging every step"
            )
            trainer.log_every_n_steps = 1

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

    @override
    def state_dict(self) -> dict[str, Any]:
        """The divergence curves so far: a resumed run draws the whole run's, not its own part."""
        return {"history": {task: list(points) for task, points in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["history"]
        self.history = defaultdict(list, {task: [tuple(p) for p in points] for task, points in saved.items()})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = shared_run_folder(trainer)  # on every rank: it broadcasts
        self._report(folder, _divmerge(pl_module, self), trainer.loggers, trainer.global_step)

    @rank_zero_only
    def _report(self, folder: Path, module: DivMergeModule, loggers: list[Logger], step: int) -> None:
        coefficients = module.coefficient_table()
        if coefficients is None:
            return
        if self.table:
            print_coefficients(coefficients)
        if not self.plots:
            return
        figures = {"coefficients": coefficient_figure(coefficients)}
        if self.history:
            figures["divergence"] = divergence_figure(self.history, module.hparams.objective)
        for name, figure in figures.items():
            png = save_figure(figure, folder / f"{name}.png")
            log_figure(loggers, name, figure, png, step)
            close_figure(figure)


class BestOnValidation(L.Callback):
    """End ``fit`` with the coefficients of its best validation epoch, not its last (as
    transformers' ``load_best_model_at_end``), before the export writes them. The choice is made
    on the labelled validation rows (``val_files``), which a validation epoch scores; without them
    it would see the rows the report scores, so the callback refuses to run."""

    def __init__(self, monitor: str = "val/normalized", mode: Literal["max", "min"] = "max") -> None:
        """
        Args:
            monitor: the logged metric the best epoch has (``val/normalized``: the merge's mean
                score relative to each expert's on the validation rows).
            mode: ``max`` (a score) or ``min`` (a loss).
        """
        if mode not in ("max", "min"):
            raise ValueError(f"BestOnValidation: mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.best: torch.Tensor | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = _divmerge(pl_module, self)
        if module.coefficients is None:
            raise ValueError("BestOnValidation: a training-free method has no coefficients to choose")
        if module.merge_datamodule().validation_split != "tuning":
            raise ValueError(
                "BestOnValidation chooses an epoch on labelled validation rows: give every task "
                "val_files (without them validation scores the rows the report scores)"
            )

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor not in trainer.callback_metrics:
            logged = sorted(trainer.callback_metrics)
            raise KeyError(f"BestOnValidation: {self.monitor!r} was not logged; logged: {logged}")
        score = float(trainer.callback_metrics[self.monitor])
        best = self.best_score
        if best is None or (score > best if self.mode == "max" else score < best):
            self.best_score, self.best_step = score, trainer.global_step
            self.best = _divmerge(pl_module, self).coefficients.detach().cpu().clone()

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is None:
            rank_zero_info("BestOnValidation: no validation epoch ran; the last coefficients are kept")
            return
        why = {"monitor": self.monitor, "mode": self.mode, "score": self.best_score, "step": self.best_step}
        _divmerge(pl_module, self).restore_coefficients(self.best, why)
        rank_zero_info(
            f"BestOnValidation: ending with the coefficients of step {self.best_step} "
            f"({self.monitor} {self.best_score:.4f}; the run ended at step {trainer.global_step})"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The best so far: a resumed run still ends with the best epoch of the whole run."""
        return {"best_score": self.best_score, "best_step": self.best_step, "best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_step = state_dict["best_score"], state_dict["best_step"]
        self.best = state_dict["best"]


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
    """At the end of ``fit``: write ``merged/`` (each folder with its model card), when the merge is
    a linear combination of LoRA adapters ``merged_adapter/`` (the same merge as one adapter),
    ``coefficients.json`` and ``report.json`` into the run's folder (or ``dirpath``), print the
    report table, log its scores (``report/<task>/{expert,merged,normalized}``) to the loggers,
    and publish the merged folders to the Hub if asked."""

    def __init__(
        self,
        dirpath: str | None = None,
        overwrite: bool = False,
        save_weights: bool = True,
        dtype: ExportDtype | None = None,
        max_shard_size: str | int | None = None,
        push_to_hub: str | None = None,
        hub_private: bool = True,
        save_adapter: bool = True,
    ) -> None:
        """
        Args:
            dirpath: where to write; None means the run's own folder (the first logger's
                versioned folder, where ``checkpoints/`` goes, or ``default_root_dir``).
            overwrite: replace the outputs of an earlier run in the same folder.
            save_weights: write ``merged/`` (one whole model per task). False keeps the report and
                coefficients only: for sweeps that score many merges, where k tasks' weights on
                disk for every run add up to tens of GB.
            dtype: the weights' dtype in ``merged/``; None: the experts' own (float32 if they differ).
            max_shard_size: split each model's weights into shards of at most this size (``"2GB"``,
                or bytes), with an index, as ``save_pretrained`` does.
            push_to_hub: a Hub repo id (``"you/merged"``), or a pattern with ``{task}``
                (``"you/merged-{task}"``) for one repository per task head; each merged folder is
                uploaded with its model card (your Hugging Face token, e.g. ``HF_TOKEN``).
            hub_private: create missing repositories as private.
            save_adapter: with ``save_weights``, also write ``merged_adapter/`` (per task for
                classification): the merge as one LoRA adapter over the base, when every expert is
                a LoRA adapter and nothing is merged densely (otherwise the log says why not).
        """
        self.options = ExportOptions(
            dirpath, overwrite, save_weights, dtype, max_shard_size, push_to_hub, hub_private, save_adapter
        )

    def folder(self, trainer: L.Trainer) -> Path:
        """Call on every rank (the run's folder is broadcast from rank 0)."""
        if self.options.dirpath is not None:
            return Path(self.options.dirpath).expanduser()
        return shared_run_folder(trainer)

    def repo_ids(self, module: DivMergeModule) -> dict[str, str]:
        """Folder name inside ``merged/`` -> its Hub repository (empty without push_to_hub)."""
        if self.options.push_to_hub is None:
            return {}
        repo_ids = hub_repo_ids(self.options.push_to_hub, module.tasks, one_model=module.is_causal_lm)
        check_repo_ids(repo_ids)
        check_can_push()
        return repo_ids

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self.folder(trainer)  # on every rank: it broadcasts
        if trainer.is_global_zero:
            check_free(folder, self.options.overwrite)  # fail now, not after the run
            self.repo_ids(_divmerge(pl_module, self))  # a bad repo id too

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = _divmerge(pl_module, self)
        if trainer.interrupted:
            return
        self.export(trainer, module)

    def export(self, trainer: L.Trainer, module: DivMergeModule) -> Path:
        """Write every output of ``module``'s current merge (rank 0); also used by ``divmerge-pl merge``."""
        folder = self.folder(trainer)  # on every rank: it broadcasts
        with module.gathered_merge():  # sharded mode: every rank takes part in gathering
            self._write(folder, module, run_recipe(trainer, module), trainer.loggers, trainer.global_step)
        return folder

    @rank_zero_only
    def _write(
        self, folder: Path, module: DivMergeModule, recipe: str, loggers: list[Logger], step: int
    ) -> None:
        frozen = module.frozen
        adapters = adapters_to_write(module, self.options.save_weights and self.options.save_adapter)
        report = {**module.evaluate(), **({"merged_adapter": adapter_folders(adapters)} if adapters else {})}
        tokenizer = AutoTokenizer.from_pretrained(frozen.paths["base"])
        hub_ids = (hub_id(str(frozen.paths[role])) for role in ["base", *module.tasks])
        facts = MergeFacts(
            base=str(module.hparams.base),
            experts={t: str(module.hparams.experts[t]) for t in module.tasks},
            report=report,
            recipe=recipe,
            model_class="AutoModelForCausalLM"
            if module.is_causal_lm
            else "AutoModelForSequenceClassification",
            dtype=export_dtype(self.options.dtype, frozen.configs, frozen.paths),
            is_causal_lm=module.is_causal_lm,
            hub_ids=tuple(i for i in hub_ids if i is not None),  # resolved into the Hub cache
            adapters=adapter_folders(adapters),
        )
        repo_ids = self.repo_ids(module)

        def card(task: str):
            location = repo_ids.get(task) or str(Path("merged") / task)
            return model_card(facts, task or None, location)

        written = write_outputs(
            folder,
            module.merged_models() if self.options.save_weights else None,
            module.coefficient_table(),
            report,
            tokenizer=tokenizer,
            overwrite=self.options.overwrite,
            dtype=facts.dtype,
            max_shard_size=self.options.max_shard_size,
            card=card,
            adapters=adapters,
            adapter_card=adapter_cards(facts, adapters, module.coefficient_table()),
            row_coefficients=module.row_coefficients(),
        )
        print_report(report, title=f"{report['method']} -> {folder}")
        log_report(loggers, report, step)
        if repo_ids:
            for task, url in push_folders(written, repo_ids, self.options.hub_private).items():
                rank_zero_info(f"merged/{task}: published to {repo_ids[task]} ({url})")


def run_recipe(trainer: L.Trainer, module: DivMergeModule) -> str:
    """The YAML that makes this run again: LightningCLI's resolved config when the run has one
    (what its config.yaml holds), else the module's settings alone."""
    for callback in trainer.callbacks:
        if isinstance(callback, SaveConfigCallback):
            return callback.parser.dump(callback.config, skip_none=False)
    cls = type(module)
    model = {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(module.hparams)}
    return (
        yaml.safe_dump({"model": model, "trainer": {"max_epochs": trainer.max_epochs}}, sort_keys=False)
        + "# data: not recorded (this run was not made by LightningCLI)\n"
    )


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
            default_root_dir=self.output_dir,  # without a logger the figures land here, not in the cwd
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
