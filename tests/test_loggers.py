"""Figures to the loggers, outputs in the run's own folder, step rows in short runs, and a
heatmap whose axis names its groups."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, WandbLogger
from matplotlib.figure import Figure

from divmerge_pl import CoefficientMonitor, DivMergeModule, MergeDataModule, MergedModelExport, TaskSpec
from divmerge_pl.plots import close_figure, coefficient_figure, short_group_names
from divmerge_pl.run_outputs import RunFolderConfig, log_figure

from .conftest import build_setup
from .test_fit import write_config

TASKS = ["alpha", "beta"]


class SummaryWriterLike:
    """What TensorBoardLogger.experiment offers for figures (tensorboard is not installed here)."""

    def __init__(self) -> None:
        self.figures: list[dict] = []

    def add_figure(self, tag: str, figure: Figure, global_step: int | None = None, close: bool = True):
        ax = figure.axes[0]
        self.figures.append(
            {
                "tag": tag,
                "step": global_step,
                "close": close,
                "yticks": [t.get_text() for t in ax.get_yticklabels()],
                "xticks": [t.get_text() for t in ax.get_xticklabels()],
                "title": ax.get_title(),
            }
        )


class FigureLogger(Logger):
    """A logger of its own kind (not CSV or TensorBoard) whose experiment takes figures."""

    def __init__(self, save_dir: Path, version: str) -> None:
        super().__init__()
        self._save_dir, self._version = str(save_dir), version
        self.writer = SummaryWriterLike()
        self.metrics: list[tuple[int, dict]] = []

    @property
    def name(self) -> str:
        return "figures"

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def experiment(self) -> SummaryWriterLike:
        return self.writer

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return build_setup(tmp_path_factory.mktemp("loggers"), {"alpha": 2, "beta": 3})


def fit(tiny, root: Path, logger, **trainer_args) -> L.Trainer:
    module = DivMergeModule(
        base=str(tiny.base), experts={t: str(p) for t, p in tiny.experts.items()}, teacher_cache=None
    )
    data = MergeDataModule(
        [TaskSpec(**s) for s in tiny.task_specs(num_samples=16)],  # 32 rows, batch 8: 4 steps an epoch
        tokenizer=str(tiny.base),
        batch_size=8,
        max_length=16,
    )
    trainer = L.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[CoefficientMonitor(table=False), MergedModelExport()],
        **trainer_args,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def test_figures_reach_the_logger_and_outputs_its_run_folder(tiny_setup, tmp_path):
    logs = tmp_path / "logs"
    first = FigureLogger(logs, "run-a")
    trainer = fit(tiny_setup, tmp_path, first, max_steps=4)

    tags = {f["tag"]: f for f in first.writer.figures}
    assert set(tags) == {"coefficients", "divergence"}
    assert all(f["step"] == trainer.global_step == 4 and f["close"] is False for f in tags.values())
    heatmap = tags["coefficients"]
    assert heatmap["yticks"] == TASKS and heatmap["title"] == "DivMerge coefficients (js)"
    assert "L0.attention.self.query" in heatmap["xticks"] and "L1.output.LayerNorm.bias" in heatmap["xticks"]
    # a short run (4 steps < log_every_n_steps=50) still logs its steps
    steps = sorted({step for step, metrics in first.metrics if "coef/alpha/mean" in metrics})
    assert steps == [0, 1, 2, 3]
    report = json.loads((logs / "figures" / "run-a" / "report.json").read_text())
    (final,) = [(step, m) for step, m in first.metrics if "report/alpha/merged" in m]
    assert final[0] == 4 and final[1]["report/beta/normalized"] == report["tasks"]["beta"]["normalized"]
    assert final[1]["report/average/merged"] == report["average"]["merged"]

    run = logs / "figures" / "run-a"  # the logger's versioned folder, where checkpoints/ would go
    for name in ("coefficients.png", "divergence.png", "report.json", "coefficients.json"):
        assert (run / name).is_file(), name
    assert (run / "merged" / "alpha" / "README.md").is_file()
    assert not (logs / "report.json").exists() and not (tmp_path / "report.json").exists()
    # a second run with the same logger settings gets its own folder, not the first one's outputs
    fit(tiny_setup, tmp_path, FigureLogger(logs, "run-b"), max_steps=1)
    assert (logs / "figures" / "run-b" / "report.json").is_file()
    assert json.loads((run / "report.json").read_text())["tasks"].keys() == set(TASKS)


def test_a_short_run_with_the_csv_logger_records_its_step_rows(tiny_setup, tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    fit(tiny_setup, tmp_path, logger, max_epochs=2)  # 8 steps, log_every_n_steps=50
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    stepped = sorted(int(r["step"]) for r in rows if r.get("train/loss_step") or r.get("train/loss"))
    assert stepped == list(range(8))
    assert sorted(int(r["step"]) for r in rows if r["coef/beta/mean"]) == list(range(8))
    # CSV takes no figures: the PNGs stand in the logger's versioned folder with the other outputs
    assert (Path(logger.log_dir) / "coefficients.png").is_file()
    assert (Path(logger.log_dir) / "merged" / "beta" / "config.json").is_file()
    (final,) = [r for r in rows if r.get("report/alpha/expert")]
    report = json.loads((Path(logger.log_dir) / "report.json").read_text())
    assert float(final["report/alpha/expert"]) == pytest.approx(report["tasks"]["alpha"]["expert"])


class FakeWandb(WandbLogger):
    def __init__(self) -> None:  # wandb is not installed: no run is started
        Logger.__init__(self)
        self.images: list[tuple] = []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.images.append((key, images, step))


class MlflowClientLike:
    def __init__(self) -> None:
        self.figures: list[tuple] = []

    def log_figure(self, run_id, figure, artifact_file) -> None:
        self.figures.append((run_id, figure, artifact_file))


class FakeMlflow(MLFlowLogger):
    def __init__(self) -> None:  # mlflow is not installed
        Logger.__init__(self)
        self.client = MlflowClientLike()

    @property
    def experiment(self) -> MlflowClientLike:
        return self.client

    @property
    def run_id(self) -> str:
        return "run-7"


def test_each_logger_gets_the_figure_through_its_own_api(tmp_path):
    table = {
        "values": [[0.5, 0.7]],
        "tasks": ["a"],
        "groups": ["x.weight", "y.weight"],
        "granularity": "layer",
    }
    figure = coefficient_figure({**table, "objective": "js"})
    png = tmp_path / "coefficients.png"
    figure.savefig(png)
    wandb, mlflow, csv_logger = FakeWandb(), FakeMlflow(), CSVLogger(tmp_path)
    took = log_figure([wandb, mlflow, csv_logger], "coefficients", figure, png, step=12)
    close_figure(figure)
    assert took == ["FakeWandb", "FakeMlflow"]
    assert wandb.images == [("coefficients", [str(png)], 12)]
    assert mlflow.client.figures == [("run-7", figure, "coefficients.png")]


def test_heatmap_names_its_groups_readably_at_300_groups():
    groups = [f"model.layers.{i // 12}.mlp.proj_{i % 12}.weight" for i in range(300)]
    table = {"values": [[0.1] * 300, [0.2] * 300], "tasks": ["a", "b"], "groups": groups}
    figure = coefficient_figure({**table, "granularity": "layer", "objective": "js"})
    ax = figure.axes[0]
    positions = list(ax.get_xticks())
    labels = [t.get_text() for t in ax.get_xticklabels()]
    width = figure.get_size_inches()[0]
    close_figure(figure)
    assert short_group_names(groups)[:2] == ["L0.mlp.proj_0", "L0.mlp.proj_1"]
    assert labels[0] == "L0.mlp.proj_0" and labels[-1].startswith("L")
    assert 50 <= len(labels) <= 6 * width  # every n-th group, at most 6 a inch
    step = int(positions[1] - positions[0])
    assert step > 1 and positions == list(range(0, 300, step))
    assert labels == [short_group_names(groups)[int(p)] for p in positions]
    assert f"300 coefficient group(s) (layer, 1 in {step} named)" == ax.get_xlabel()
    # few groups: every one named
    few = coefficient_figure(
        {"values": [[0.1] * 24] * 2, "tasks": ["a", "b"], "groups": groups[:24], "granularity": "layer",
         "objective": "js"}
    )  # fmt: skip
    assert [t.get_text() for t in few.axes[0].get_xticklabels()] == short_group_names(groups[:24])
    close_figure(few)


def cli_with_logger(tiny, root: Path, version: str, save_config_callback) -> LightningCLI:
    config_path = write_config(tiny, root)
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["logger"] = {
        "class_path": "tests.test_loggers.FigureLogger",
        "init_args": {"save_dir": str(root / "logs"), "version": version},
    }
    config_path.write_text(yaml.safe_dump(config))
    return LightningCLI(
        DivMergeModule,
        MergeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=save_config_callback,
        run=False,
        args=["--config", str(config_path), f"--data.init_args.tokenizer={tiny.base}"],
    )


def save_config(cli: LightningCLI) -> None:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback)]
    callback.setup(cli.trainer, cli.model, "fit")


def test_run_folder_config_gives_each_run_its_own_config_yaml(tiny_setup, tmp_path):
    logs = tmp_path / "logs"
    save_config(cli_with_logger(tiny_setup, tmp_path, "run-a", RunFolderConfig))
    save_config(cli_with_logger(tiny_setup, tmp_path, "run-b", RunFolderConfig))
    for version in ("run-a", "run-b"):
        saved = yaml.safe_load((logs / "figures" / version / "config.yaml").read_text())
        assert saved["trainer"]["logger"]["init_args"]["version"] == version
    assert not (logs / "config.yaml").exists()
    with pytest.raises(RuntimeError, match=r"run-a/config.yaml' holds the config of an earlier run"):
        save_config(cli_with_logger(tiny_setup, tmp_path, "run-a", RunFolderConfig))
    # Lightning's own callback writes to trainer.log_dir, the logger's root: the second run stops
    save_config(cli_with_logger(tiny_setup, tmp_path / "plain", "run-a", SaveConfigCallback))
    with pytest.raises(RuntimeError, match="expected .*logs/config.yaml to NOT exist"):
        save_config(cli_with_logger(tiny_setup, tmp_path / "plain", "run-b", SaveConfigCallback))


def test_the_command_saves_its_config_into_the_run_folder(tiny):
    from divmerge_pl.cli import build_cli
    from divmerge_pl.run_outputs import RunFolderConfig

    config = write_config(tiny, tiny.root / "run", epochs=1)
    cli = build_cli(["--config", str(config)], run=False)
    assert cli.save_config_callback is RunFolderConfig
