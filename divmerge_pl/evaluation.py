"""Scoring the merged model: the validation / test epochs, the report at the current coefficients,
and the labelled validation rows on which training-free methods choose their settings.

Kept apart from the module's hooks so the hooks stay one line each: they call ``Evaluation``,
which scores through the task kind (``kinds.py``) and reports through ``reports.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from datasets import Dataset
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

from .data import MergeDataModule
from .metrics import TaskScores, build_report
from .reports import merge_report, method_name

if TYPE_CHECKING:
    from .module import DivMergeModule


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` on ``device`` as the Trainer moves it (its ``BatchIndex`` rows too)."""
    return move_data_to_device(batch, device)


class Evaluation:
    """The merged model's scores: the running epoch's, the last finished one's (reused by the
    export when nothing changed since) and the experts' on the validation rows (computed once)."""

    def __init__(self, module: DivMergeModule) -> None:
        self.module = module  # its val_scores: the running epoch's (a submodule, so on its device)
        self.merged: dict[str, Tensor] | None = None  # the running epoch's merged tensors
        # the scored (eval) rows' scores of the last epoch that scored them: (step, scores)
        self.last_merged_scores: tuple[int, dict[str, float]] | None = None
        self._tuning_expert_scores: dict[str, float] | None = None

    def _named(self, scores: TaskScores) -> dict[str, float]:
        return {self.module.tasks[i]: s for i, s in scores.compute().items()}

    # ---------------------------------------------------------------- validation / test epochs
    @torch.no_grad()
    def start_epoch(self) -> None:
        self.merged = self.module.merged_tensors()  # built once per epoch, not per batch

    def score_batch(self, batch: dict[str, Tensor], scores: TaskScores | None = None) -> None:
        with self.module.low_rank():
            self.module.kind.score_batch(
                self.merged, batch, self.module.val_scores if scores is None else scores
            )

    def end_epoch(self) -> None:
        """Log each task's merged and expert score and the normalised average (``val/``: on the
        labelled validation rows if any, against the experts' scores on those rows; ``test/``: on
        the scored rows), and remember the scored rows' scores of this step."""
        module = self.module
        merged = self._named(module.val_scores)
        module.val_scores.reset()
        self.merged = None
        dm = module.merge_datamodule()
        on_tuning_rows = not module.trainer.testing and dm.validation_split == "tuning"
        report = self.tuning_report(merged) if on_tuning_rows else merge_report(module, merged)
        stage = "test" if module.trainer.testing else "val"
        for task, row in report["tasks"].items():
            module.log(f"{stage}/{task}/{row['metric']}", row["merged"])
            module.log(f"{stage}/{task}/expert_{row['metric']}", row["expert"])
            module.log(f"{stage}/{task}/normalized", row["normalized"])
        if report["tasks"]:
            module.log(f"{stage}/normalized", report["average"]["normalized"], prog_bar=True)
        if not module.trainer.sanity_checking and not on_tuning_rows:
            self.last_merged_scores = (module.trainer.global_step, merged)

    # ---------------------------------------------------------------- reports on demand
    @torch.no_grad()
    def report(self, split: Literal["eval", "tuning"] = "eval") -> dict:
        """See ``DivMergeModule.evaluate``."""
        module = self.module
        dm = module.merge_datamodule()
        if split == "tuning":
            if dm.tuning_rows is None:
                raise ValueError(
                    "no labelled validation rows: give every task val_files to choose settings on"
                )
            return self.tuning_report(self.merged_scores(dm.tuning_rows))
        step = module.trainer.global_step
        if self.last_merged_scores is not None and self.last_merged_scores[0] == step:
            merged = self.last_merged_scores[1]
        else:
            merged = {} if dm.eval_rows is None else self.merged_scores(dm.eval_rows)
        return merge_report(module, merged)

    def tuning_report(self, merged: dict[str, float]) -> dict:
        """``merged``, scores on the labelled validation rows, against each expert's on them."""
        dm = self.module.merge_datamodule()
        return build_report(self.tuning_expert_scores(), merged, dm.metrics, method_name(self.module))

    def merged_scores(self, rows: Dataset) -> dict[str, float]:
        """The merged model's score on ``rows`` (this process only)."""
        module, dm = self.module, self.module.merge_datamodule()
        scores = module.kind.new_scores(dm, sync_on_compute=False).to(module.device)
        self.start_epoch()
        for batch in dm.ordered_dataloader(rows, shortest_first=True):
            self.score_batch(to_device(batch, module.device), scores)
        self.merged = None
        return self._named(scores)

    @torch.no_grad()
    def tuning_expert_scores(self) -> dict[str, float]:
        """Each expert's score on its own task's validation rows (computed once, cached on disk)."""
        if self._tuning_expert_scores is None:
            self.module.prepare_teachers()
            self._tuning_expert_scores = self.module.kind.validation_scores(self.module.merge_datamodule())
        return self._tuning_expert_scores


@torch.no_grad()
def mean_divergences(module: DivMergeModule, dm: MergeDataModule) -> Tensor:
    """Each task's mean objective over all its merge inputs at the current coefficients."""
    sums = torch.zeros(len(module.tasks), device=module.device)
    counts = torch.zeros(len(module.tasks), device=module.device)
    for batch in dm.ordered_dataloader(dm.train_rows):
        for t, per_row in module.merged_divergences(to_device(batch, module.device)):
            sums[t] += per_row.sum().float()
            counts[t] += per_row.numel()
    return sums / counts.clamp_min(1)
