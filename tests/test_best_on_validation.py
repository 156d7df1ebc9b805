"""BestOnValidation: a fit ends with the coefficients of its best validation epoch, chosen on the
labelled validation rows, and a resumed run ends with the same ones as an unbroken run."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
import yaml

from divmerge_pl.cli import main

from .test_fit import run_dir, write_config
from .test_methods import with_val_files
from .test_resume import final_coefficients

BATCHES_PER_EPOCH = 6


class ScoreByEpoch(L.Callback):
    """Logs ``val/planted``, best after the second epoch (of three), and records the coefficients
    each validation epoch saw: which epoch is best is known before the run."""

    seen: dict[int, torch.Tensor] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/planted", -float((trainer.current_epoch - 1) ** 2))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            ScoreByEpoch.seen[trainer.global_step] = pl_module.merge_coefficients().detach().clone()


class InterruptInThirdEpoch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 2 * BATCHES_PER_EPOCH + 2:
            raise KeyboardInterrupt


def best_config(tiny, folder, *extra: str, monitor: str = "val/planted"):
    config = with_val_files(tiny, write_config(tiny, folder, epochs=3))
    data = yaml.safe_load(config.read_text())
    data["trainer"]["check_val_every_n_epoch"] = 1
    data["trainer"]["callbacks"] = [
        {"class_path": "divmerge_pl.BestOnValidation", "init_args": {"monitor": monitor}},
        *({"class_path": f"tests.test_best_on_validation.{name}"} for name in extra),
    ]
    config.write_text(yaml.safe_dump(data))
    return config


def test_fit_ends_with_the_coefficients_of_the_best_validation_epoch(tiny):
    ScoreByEpoch.seen = {}
    main(["fit", "--config", str(best_config(tiny, tiny.root / "run", "ScoreByEpoch"))])
    best, last = 2 * BATCHES_PER_EPOCH, 3 * BATCHES_PER_EPOCH
    assert sorted(ScoreByEpoch.seen) == [BATCHES_PER_EPOCH, best, last]
    ended = final_coefficients(tiny.root / "run")
    torch.testing.assert_close(ended, ScoreByEpoch.seen[best], atol=1e-6, rtol=0)
    assert not torch.allclose(ended, ScoreByEpoch.seen[last], atol=1e-4)  # not the last epoch's
    report = json.loads((run_dir(tiny.root / "run") / "report.json").read_text())
    restored = {"monitor": "val/planted", "mode": "max", "score": -0.0, "step": best}
    assert report["settings"]["restored"] == restored


def test_a_resumed_run_ends_with_the_best_epoch_of_the_whole_run(tiny):
    main(["fit", "--config", str(best_config(tiny, tiny.root / "whole", "ScoreByEpoch"))])
    broken = tiny.root / "broken"
    with pytest.raises(SystemExit):  # interrupted after the best epoch
        main(["fit", "--config", str(best_config(tiny, broken, "ScoreByEpoch", "InterruptInThirdEpoch"))])
    main(["fit", "--config", str(best_config(tiny, broken, "ScoreByEpoch")), "--ckpt_path", "last"])
    torch.testing.assert_close(
        final_coefficients(broken), final_coefficients(tiny.root / "whole"), atol=1e-6, rtol=0
    )


def test_without_labelled_validation_rows_it_refuses_before_training(tiny):
    config = write_config(tiny, tiny.root / "run", epochs=1)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["callbacks"] = [{"class_path": "divmerge_pl.BestOnValidation"}]
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="BestOnValidation chooses an epoch on labelled validation rows"):
        main(["fit", "--config", str(config)])
    assert not (run_dir(tiny.root / "run") / "checkpoints").exists()
