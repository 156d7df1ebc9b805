"""The training step's bookkeeping: each task's rows known on the host (from the collate), no read
of device values in the step, and the deferred (GPU) guard against a non-finite objective, all
run on the CPU."""

from __future__ import annotations

import traceback

import lightning as L
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from divmerge_pl import module as module_file
from divmerge_pl.divergences import js_divergence
from divmerge_pl.finite import CHECK_EVERY, FiniteGuard

from .conftest import per_task_logits
from .test_fit import fit_module

# experts in another order than the datamodule's tasks (alpha, beta): expert 0 is beta (3 classes)
EXPERTS = {"beta": 3, "alpha": 2}


def mixed_batch(data, task_ids: list[int]) -> dict:
    """The collate's batch of the first merge inputs of these datamodule tasks, in this order."""
    rows, used = [], set()
    for task in task_ids:
        i = next(i for i, r in enumerate(data.train_rows) if r["task_id"] == task and i not in used)
        used.add(i)
        rows.append(data.train_rows[i])
    return data.collate(rows)


def test_collate_indexes_each_tasks_rows_and_the_module_maps_them_to_its_experts(tiny):
    module, trainer = fit_module(tiny, EXPERTS, max_steps=0)
    data = trainer.datamodule
    assert module.tasks == ("beta", "alpha") and data.task_names == ["alpha", "beta"]
    batch = mixed_batch(data, [1, 0, 0, 1, 1, 0])

    index = batch["index"]
    assert index.task_ids == (0, 1)
    assert [r.tolist() for r in index.rows] == [[1, 2, 5], [0, 3, 4]]
    assert all(r.dtype == torch.long for r in index.rows)
    assert list(index.row_ids) == batch["row_id"].tolist()

    pairs = [(t, rows.tolist()) for t, rows in module.task_rows(batch)]
    assert pairs == [(0, [0, 3, 4]), (1, [1, 2, 5])]  # beta (datamodule task 1) is expert 0
    by_hand = {k: v for k, v in batch.items() if k != "index"}  # a batch made without the collate
    assert [(t, rows.tolist()) for t, rows in module.task_rows(by_hand)] == pairs

    # each task's rows go through its own expert's head and are compared with its own teacher rows
    with torch.no_grad():
        merged = module.merged_tensors()
        divergences = dict(module.kind.row_divergences(merged, batch))
    for t, rows in module.task_rows(batch):
        logits = per_task_logits(module, t, merged, batch, rows)
        assert logits.shape == (3, EXPERTS[module.tasks[t]])
        teacher = module.teachers.logprobs[batch["row_id"][rows], : logits.shape[-1]]
        want = js_divergence(teacher, torch.log_softmax(logits, -1))
        torch.testing.assert_close(divergences[t], want, atol=1e-6, rtol=0)


class DeviceReads(TorchDispatchMode):
    """Records the ops of ``divmerge_pl``'s own code that read a value back from the device (on a
    GPU: a host sync): scalars, data-dependent shapes, boolean indexing."""

    READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
             "aten.is_nonzero.default", "aten.equal.default", "aten._unique2.default",
             "aten.unique_dim.default", "aten.unique_consecutive.default"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name == "aten.index.Tensor" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in self.READS or boolean_index:
            ours = [
                f
                for f in traceback.extract_stack()
                if "divmerge_pl" in f.filename or "/transformers/" in f.filename
            ]
            if ours and "divmerge_pl" in ours[-1].filename:  # transformers' own (its mask check) aside
                self.found.append(f"{name} at {ours[-1].filename}:{ours[-1].lineno}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weighting", ["sum", "relative"])
def test_the_step_reads_nothing_back_from_the_device(tiny, monkeypatch, weighting):
    module, trainer = fit_module(tiny, EXPERTS, max_steps=0, task_weighting=weighting)
    module.start_divergence.fill_(0.5) if weighting == "relative" else None
    module.finite = FiniteGuard(module.tasks, "js", deferred=True)  # what a GPU fit uses
    module.log = lambda *args, **kwargs: None  # Lightning's logging is not the step's
    batch = mixed_batch(trainer.datamodule, [1, 0, 0, 1, 1, 0])
    optimizer = torch.optim.Adam([module.coefficients], lr=0.1, fused=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the training step read a tensor back to the host")

    with DeviceReads() as reads, monkeypatch.context() as patch:
        for method in ("tolist", "item", "unique"):
            patch.setattr(torch.Tensor, method, refuse)
        loss = module.training_step(batch, 0)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
    assert reads.found == []
    assert torch.isfinite(module.coefficients).all()


def run_fit(tiny, deferred: bool, monkeypatch, steps: int, poison_at: int | None = None):
    """A fit of ``steps`` steps with the check at once (the CPU's) or deferred (a GPU's); the
    teachers are made NaN before step ``poison_at``. Returns the module, its optimizer, the
    coefficients before each step and the error the fit raised, if any."""
    monkeypatch.setattr(module_file, "defers_check", lambda device, scaler: deferred)
    before: list[torch.Tensor] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            before.append(pl_module.coefficients.detach().clone())
            if trainer.global_step == poison_at:
                pl_module.teachers.logprobs[:] = float("nan")

    module, first = fit_module(tiny, EXPERTS, max_steps=0)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Watch()])  # fmt: skip
    error = None
    try:
        trainer.fit(module, datamodule=first.datamodule)
    except FloatingPointError as raised:
        error = raised
    return module, trainer.optimizers[0], before, error


def test_a_deferred_check_steps_as_the_check_at_once(tiny, monkeypatch):
    at_once, plain, _, _ = run_fit(tiny, False, monkeypatch, steps=6)
    deferred, fused, _, _ = run_fit(tiny, True, monkeypatch, steps=6)
    assert deferred.finite.deferred and not at_once.finite.deferred
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    torch.testing.assert_close(deferred.coefficients, at_once.coefficients, atol=1e-6, rtol=0)


@pytest.mark.parametrize("deferred", [False, True])
def test_a_non_finite_step_stops_the_fit_with_the_coefficients_before_it(tiny, monkeypatch, deferred):
    steps = 7  # deferred: fewer than CHECK_EVERY, so the error comes from the checks at the fit's end
    assert steps < CHECK_EVERY
    module, optimizer, before, error = run_fit(tiny, deferred, monkeypatch, steps=steps, poison_at=4)
    assert error is not None
    assert str(error).startswith("step 4: the js objective is not finite for task(s) ['beta', 'alpha']")
    assert len(before) == (steps if deferred else 5)  # deferred: the fit ran on, every update skipped
    assert torch.equal(module.coefficients.detach(), before[4])  # the last good step's
    assert not torch.equal(before[4], before[3])  # (which did move them)
    (state,) = optimizer.state.values()
    assert int(state["step"]) == 4 and torch.isfinite(state["exp_avg"]).all()
