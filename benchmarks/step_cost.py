"""Cost of one DivMerge step against a plain forward+backward of the same model on the same
batch, for N = 2, 4, 8 experts and task / layer granularity; and how many expert forwards
the teacher cache costs across epochs and runs.

    python benchmarks/step_cost.py [--tasks 2,4,8] [--steps 12] [--length 64] [--precision 32-true]

Prints a table and writes benchmarks/results/step_cost.json. Ratios are taken within one run.
On a GPU (taken when there is one) it also records each fit's peak GPU memory and the host syncs
of a DivMerge step (torch's CUDA sync debug mode: the whole step, Lightning's part included).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from common import StepTimer, add_common_args, expert_setups, gpu_peak, write_results
from transformers import AutoModelForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl import kinds as kinds_file  # where the teachers' pass calls compute_logprobs

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class PlainStep(L.LightningModule):
    """The floor: fine-tuning one model (every parameter) on the same batches."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.net = AutoModelForSequenceClassification.from_pretrained(folder)

    def training_step(self, batch, batch_idx):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        logits = self.net(**inputs).logits
        return torch.log_softmax(logits, -1).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-5)


class SyncCounter(L.Callback):
    """Host syncs of each training step on CUDA, counted as the warnings of torch's sync debug
    mode (some syncs, such as collectives', go uncounted); nothing elsewhere."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._catching = None

    def on_train_batch_start(self, *args) -> None:
        if torch.cuda.is_available():
            self._catching = warnings.catch_warnings(record=True)
            self._caught = self._catching.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, *args) -> None:
        if self._catching is not None:
            torch.cuda.set_sync_debug_mode("default")
            reported = [w for w in self._caught if "called a synchronizing CUDA operation" in str(w.message)]
            self.counts.append(len(reported))
            self._catching.__exit__(None, None, None)
            self._catching = None

    def per_step(self) -> int | None:
        """The fewest syncs of a step after the warm-ups (None without a GPU)."""
        return min(self.counts[2:] or self.counts) if self.counts else None


def trainer(steps: int, timer: StepTimer, precision: str = "32-true", *others: L.Callback) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer, *others],  # the timer waits by torch.cuda.synchronize: not a sync the mode reports
    )


def datamodule(setup: dict, batch_size: int, length: int) -> MergeDataModule:
    specs = [
        TaskSpec(name=t, train_files=f["train"], eval_files=None, num_samples=200)
        for t, f in setup["data"].items()
    ]
    return MergeDataModule(specs, tokenizer=setup["base"], batch_size=batch_size, max_length=length)


def count_teacher_rows() -> tuple[list[int], callable]:
    rows: list[int] = []
    real = kinds_file.compute_logprobs

    def counting(forward, batches, desc, show=True):  # as kinds.py calls it
        out = real(forward, batches, desc, show)
        rows.append(out.shape[0])
        return out

    kinds_file.compute_logprobs = counting
    return rows, lambda: setattr(kinds_file, "compute_logprobs", real)


# (granularity, merge_on_demand, other options): the default at both granularities, the whole
# merged copy it replaced (so the cost of rebuilding each module's weights for backward is measured
# in the same run), and the "Beyond the paper" variants (at layer granularity, channel's, and both
# over TSV's decorrelated vectors: the SVDs are done once, before the first step, and not timed here)
VARIANTS = [
    ("task", True, {}),
    ("layer", True, {}),
    ("layer", False, {}),
    ("layer", True, {"task_weighting": "relative"}),
    ("layer", True, {"teacher_temperature": 0.5}),
    ("channel", True, {}),
    ("layer", True, {"task_vector_transform": "tsv"}),
    ("channel", True, {"task_vector_transform": "tsv"}),
]


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=12)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--precision", default="32-true", help="the Trainer's, e.g. bf16-mixed")
    args = parser.parse_args()

    results = []
    for n, setup in expert_setups(args):
        batch = 4 * n
        timer = StepTimer()
        plain = PlainStep(next(iter(setup["experts"].values())))
        data = datamodule(setup, batch, args.length)
        with gpu_peak() as plain_peak:
            trainer(args.steps, timer, args.precision).fit(plain, datamodule=data)
        plain_s = timer.fastest()
        for granularity, on_demand, options in VARIANTS:
            timer, syncs = StepTimer(), SyncCounter()
            module = DivMergeModule(
                setup["base"], setup["experts"], granularity=granularity, teacher_cache=None,
                merge_on_demand=on_demand, **options,
            )  # fmt: skip
            data = datamodule(setup, batch, args.length)
            with gpu_peak() as peak:
                trainer(args.steps, timer, args.precision, syncs).fit(module, datamodule=data)
            step_s = timer.fastest()
            results.append(
                {
                    "tasks": n,
                    "granularity": granularity,
                    "merge_on_demand": on_demand,
                    "options": options,
                    "batch": batch,
                    "length": args.length,
                    "precision": args.precision,
                    "plain_peak_gpu_mib": plain_peak.get("mib"),
                    "divmerge_peak_gpu_mib": peak.get("mib"),
                    "plain_step_s": plain_s,
                    "divmerge_step_s": step_s,
                    "ratio": step_s / plain_s,
                    "host_syncs_per_step": syncs.per_step(),
                    "target": 1.3,
                }
            )
            print(
                f"N={n} {granularity:5s} on demand {on_demand!s:5s} {options or ''} plain {plain_s:.3f}s "
                f"divmerge {step_s:.3f}s ratio {step_s / plain_s:.2f}"
                + (f" peak GPU {plain_peak['mib']:.0f} / {peak['mib']:.0f} MiB" if peak else "")
                + (f" host syncs {syncs.per_step()}" if syncs.counts else "")
            )

    # teacher cache: expert forwards per input, over 2 epochs and a second run
    n, setup = next(expert_setups(argparse.Namespace(**{**vars(args), "tasks": "2"})))
    cache = Path(tempfile.mkdtemp(prefix="teachers-"))
    rows, restore = count_teacher_rows()
    counts = []
    for _ in range(2):
        before = sum(rows)
        module = DivMergeModule(setup["base"], setup["experts"], granularity="task", teacher_cache=str(cache))
        fit = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
        fit.fit(module, datamodule=datamodule(setup, 4 * n, args.length))
        counts.append(sum(rows) - before)
    restore()
    inputs = 200 * n
    teacher = {"inputs": inputs, "epochs_per_run": 2, "expert_forward_rows_run1": counts[0],
               "expert_forward_rows_run2": counts[1]}  # fmt: skip

    print()
    print(
        "| N | granularity | merged weights | variant | batch | plain fwd+bwd (s) | DivMerge step (s) "
        "| ratio | target |"
    )
    print("|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        variant = ", ".join(f"{k}: {v}" for k, v in r["options"].items()) or "the paper's"
        print(
            f"| {r['tasks']} | {r['granularity']} | {'per module' if r['merge_on_demand'] else 'whole copy'} "
            f"| {variant} "
            f"| {r['batch']} | {r['plain_step_s']:.3f} | "
            f"{r['divmerge_step_s']:.3f} | {r['ratio']:.2f} | <= {r['target']} |"
        )
    print(
        f"\nteacher cache: {inputs} inputs, 2 epochs: run 1 ran experts on {counts[0]} rows "
        f"({counts[0] / inputs:.2f} per input), run 2 on {counts[1]}"
    )
    out = write_results(
        "step_cost", {"steps": args.steps, "results": results, "teacher_cache": teacher}, args.results
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
