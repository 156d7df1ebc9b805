"""Interrupted runs: Ctrl-C leaves a checkpoint, and resuming from it ends exactly where an
uninterrupted run ends; a non-finite objective stops the run with the step and task named."""

from __future__ import annotations

import json
from dataclasses import asdict

import lightning as L
import pytest
import torch
import yaml

from divmerge_pl.cli import main
from divmerge_pl.methods import get_method
from divmerge_pl.resume import ResumeError, check_resume, merge_settings

from .test_fit import run_dir, write_config


class InterruptAt(L.Callback):
    """Raises what Ctrl-C raises, after ``step`` optimisation steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class InterruptInStep(L.Callback):
    """Raises what Ctrl-C raises inside the step after ``step``, before its optimizer step: the
    batch was handed out but the coefficients never moved on it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class PoisonAt(L.Callback):
    """Makes task ``beta``'s teacher targets NaN before step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            pl_module.teachers.logprobs[:] = float("nan")


def with_callback(config_path, class_path: str, step: int):
    config = yaml.safe_load(config_path.read_text())
    config["trainer"]["callbacks"] = [{"class_path": class_path, "init_args": {"step": step}}]
    config_path.write_text(yaml.safe_dump(config))
    return config_path


def final_coefficients(folder) -> torch.Tensor:
    runs = sorted((folder / "lightning_logs").iterdir())
    return torch.tensor(json.loads((runs[-1] / "coefficients.json").read_text())["values"])


@pytest.mark.parametrize(
    ("stop_at", "interrupt"),
    [(6, "InterruptAt"), (8, "InterruptAt"), (8, "InterruptInStep")],
    ids=["epoch-end", "mid-epoch", "inside-a-step"],
)  # 6 batches per epoch
def test_resume_after_ctrl_c_ends_where_an_uninterrupted_run_ends(tiny, stop_at, interrupt):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "whole", epochs=3))])

    broken = tiny.root / "broken"
    config = with_callback(write_config(tiny, broken, epochs=3), f"tests.test_resume.{interrupt}", stop_at)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    checkpoint = run_dir(broken) / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == stop_at
    assert not (run_dir(broken) / "report.json").exists()  # an interrupted run exports nothing

    config = write_config(tiny, broken, epochs=3)  # the same run, without the interruption
    main(["fit", "--config", str(config), "--ckpt_path", "last"])  # the newest last.ckpt of that folder
    torch.testing.assert_close(
        final_coefficients(broken), final_coefficients(tiny.root / "whole"), atol=1e-6, rtol=0
    )


def test_a_resumed_run_draws_the_whole_runs_divergence_curves(tiny, monkeypatch):
    from divmerge_pl import callbacks

    drawn = []

    def recording(history, objective):
        drawn.append({task: list(points) for task, points in history.items()})
        return divergence_figure(history, objective)

    divergence_figure = callbacks.divergence_figure
    monkeypatch.setattr(callbacks, "divergence_figure", recording)
    main(["fit", "--config", str(write_config(tiny, tiny.root / "whole", epochs=3))])
    broken = tiny.root / "broken"
    config = with_callback(write_config(tiny, broken, epochs=3), "tests.test_resume.InterruptInStep", 8)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    main(["fit", "--config", str(write_config(tiny, broken, epochs=3)), "--ckpt_path", "last"])
    whole, resumed = drawn
    assert set(resumed) == set(whole) == {"alpha", "beta"}
    for task, points in whole.items():
        assert [step for step, _ in resumed[task]] == [step for step, _ in points] == list(range(1, 19))
        torch.testing.assert_close(torch.tensor(resumed[task]), torch.tensor(points), atol=1e-6, rtol=0)


def test_non_finite_objective_stops_with_step_and_task_and_keeps_good_coefficients(tiny):
    folder = tiny.root / "nan"
    config = with_callback(write_config(tiny, folder, epochs=2), "tests.test_resume.PoisonAt", 4)
    with pytest.raises(
        FloatingPointError, match=r"step 4: the js objective is not finite for task\(s\) \[.(alpha|beta)."
    ):
        main(["fit", "--config", str(config)])
    saved = torch.load(run_dir(folder) / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    assert torch.isfinite(saved["state_dict"]["coefficients"]).all()


def test_ckpt_path_last_without_an_earlier_run_starts_fresh(tiny):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "new", epochs=1)), "--ckpt_path", "last"])
    assert (run_dir(tiny.root / "new") / "report.json").is_file()


@pytest.mark.parametrize(
    "logger",
    [
        ["--trainer.logger=false"],
        ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir={root}",
         "--trainer.logger.name=mine", "--trainer.logger.version=first"],
    ],
    ids=["no-logger", "named-logger"],
)  # fmt: skip
def test_ckpt_path_last_finds_the_run_under_any_logger(tiny, logger):
    root = tiny.root / "runs"
    options = [o.format(root=root) for o in logger]
    main(["fit", "--config", str(write_config(tiny, root, epochs=1)), *options])
    (first,) = root.rglob("last.ckpt")
    from divmerge_pl.resume import latest_checkpoint

    assert latest_checkpoint(str(root)) == str(first)
    if "--trainer.logger=false" not in options:
        options[-1] = "--trainer.logger.version=second"  # a new version resumes the first's state
    else:  # one folder for both runs: the finished run's outputs are replaced only when asked
        options.append("--export.overwrite=true")
    main(["fit", "--config", str(write_config(tiny, root, epochs=2)), *options, "--ckpt_path", "last"])
    checkpoints = sorted(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(checkpoints[-1], weights_only=True)["epoch"] == 1  # resumed at epoch 1, not 0


def test_a_training_free_method_is_a_merge_setting_only_when_set(tmp_path):
    learned = {"experts": {"alpha": "a", "beta": "b"}, "objective": "js", "granularity": "layer", "lr": 0.01}
    # a learned run's settings, and so those of every checkpoint made so far, are as they were
    assert merge_settings({**learned, "static_method": None}) == merge_settings(learned)
    path = tmp_path / "learned.ckpt"
    state = {"coefficients": torch.zeros(2, 1)}
    torch.save({"state_dict": state, "divmerge": {"settings": merge_settings(learned)}}, path)
    check_resume(str(path), {**learned, "static_method": None})
    static = {**learned, "static_method": asdict(get_method("ties"))}
    with pytest.raises(ResumeError, match="static_method: None in the checkpoint, {'name': 'ties'"):
        check_resume(str(path), static)
