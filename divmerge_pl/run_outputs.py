"""Where a run's outputs go, and how its figures reach the Trainer's loggers.

``trainer.log_dir`` is the versioned folder only for the CSV and TensorBoard loggers; for any
other (WandbLogger, MLFlowLogger, ...) it is the logger's shared root, where a second run
would meet the first one's files. The run folder here follows ``ModelCheckpoint``'s own rule
instead, so ``checkpoints/`` and every other output of a run share one folder whatever the logger
(``RunFolderConfig`` puts LightningCLI's ``config.yaml`` there too).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from matplotlib.figure import Figure
from typing_extensions import override


def run_folder(trainer: L.Trainer) -> Path:
    """This process's view of the run's own folder (callers on several ranks broadcast it):
    the first logger's versioned folder, ``<save_dir or default_root_dir>/<name>/<version>``
    (where ``ModelCheckpoint`` puts ``checkpoints/``), or ``default_root_dir`` without loggers."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir).expanduser()
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(logger.log_dir).expanduser()
    if isinstance(logger, WandbLogger):
        logger.experiment  # noqa: B018 (starts the run: until then its version is None, not the run's id)
    save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(os.path.join(save_dir, str(logger.name or ""), version)).expanduser()


def shared_run_folder(trainer: L.Trainer) -> Path:
    """``run_folder`` as rank 0 sees it, on every rank (call it on all of them)."""
    return Path(trainer.strategy.broadcast(str(run_folder(trainer))))


def log_figure(loggers: list[Logger], name: str, figure: Figure, png: Path, step: int) -> list[str]:
    """Send ``figure`` (already saved as ``png``) to every logger that takes images, through its
    own API; returns the names of the loggers that took it. CSVLogger takes none: the PNG stays."""
    took = []
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            continue
        if isinstance(logger, WandbLogger):
            logger.log_image(key=name, images=[str(png)], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, figure, f"{name}.png")
        elif callable(getattr(logger.experiment, "add_figure", None)):  # TensorBoard's SummaryWriter
            logger.experiment.add_figure(name, figure, global_step=step, close=False)
        else:
            continue
        took.append(type(logger).__name__)
    return took


def report_metrics(report: dict) -> dict[str, float]:
    """``report.json``'s scores as scalars: ``report/<task>/{expert,merged,normalized}`` and
    ``report/average/...`` (a score that could not be computed is left out)."""
    metrics = {}
    for task, row in {**report["tasks"], "average": report["average"]}.items():
        for key in ("expert", "merged", "normalized"):
            value = row.get(key)
            if isinstance(value, (int, float)) and not math.isnan(value):
                metrics[f"report/{task}/{key}"] = float(value)
    return metrics


def log_report(loggers: list[Logger], report: dict, step: int) -> None:
    """The final report to every logger (saved at once: ``divmerge-pl merge`` exports after
    ``validate`` has closed its loggers' files)."""
    metrics = report_metrics(report)
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


class RunFolderConfig(SaveConfigCallback):
    """LightningCLI's ``config.yaml``, written into the run's own folder. Lightning's
    ``SaveConfigCallback`` writes it to ``trainer.log_dir``: for a W&B or MLflow logger the
    logger's shared root, where a second run finds the first one's file and stops. Plug it in
    with ``LightningCLI(save_config_callback=RunFolderConfig)``."""

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.save_to_log_dir:
            path = shared_run_folder(trainer) / self.config_filename  # on every rank: it broadcasts
            taken = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
            # resuming a run in its own folder (no logger) continues it: its config is replaced by
            # the resumed run's, whose merge settings were checked equal at parse time
            ckpt = self.config.get("ckpt_path") if hasattr(self.config, "get") else None
            resumed_here = ckpt is not None and path.parent in Path(ckpt).expanduser().parents
            if taken and not self.overwrite and not resumed_here:
                raise RuntimeError(
                    f"{str(path)!r} holds the config of an earlier run in this folder; give the run "
                    "another folder (trainer.default_root_dir, or the logger's version) or set "
                    "save_config_kwargs={'overwrite': True}"
                )
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.parser.save(
                    self.config,
                    str(path),
                    skip_none=False,
                    overwrite=self.overwrite or resumed_here,
                    multifile=self.multifile,
                )
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
