"""A non-finite objective never reaches the coefficients, and stops the fit naming its step and tasks.

Reading whether a GPU value is finite stalls the host until the device has caught up: on every
step, that sync alone keeps a small model's step launch-bound. So the check has two modes:

- **at once** (CPU, where reading a value costs nothing, and under a GradScaler, which sets the
  optimizer's skip itself): the objective is checked before backward, as it always was;
- **deferred** (CUDA): the finiteness of the objective and of the (all-reduced) gradients stays
  on the device; fused Adam skips a bad step's update, and every later one, through its
  ``found_inf`` (as a GradScaler uses it: no sync), and the host reads the flag every
  ``CHECK_EVERY`` steps and at the end of each epoch and of the fit. The error names the first
  bad step; the coefficients and Adam's state are still those of the step before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

CHECK_EVERY = 32  # steps between two host reads of the deferred flag


def defers_check(device: torch.device, has_grad_scaler: bool) -> bool:
    """Whether the check stays on the device (see the module's docstring)."""
    return device.type == "cuda" and not has_grad_scaler


class FiniteGuard:
    """Checks each step's objective, at once or deferred (``deferred``), for one fit."""

    def __init__(self, tasks: Sequence[str], objective: str, deferred: bool = False) -> None:
        self.tasks, self.objective, self.deferred = tuple(tasks), objective, deferred
        # deferred only, on the objective's device: the first bad step (-1: none yet), its bad tasks
        self.first_bad_step: Tensor | None = None
        self.bad_tasks: Tensor | None = None

    def optimizer_options(self) -> dict:
        """Adam's options: fused where the skip is deferred (its ``found_inf``), else its defaults."""
        return {"fused": True} if self.deferred else {}

    def record(self, step: int, sums: Tensor, total: Tensor) -> None:
        """The objective ``total`` of ``step`` (``sums``: each task's part): raise at once, or note it."""
        if not self.deferred:
            if not torch.isfinite(total):  # stop before Adam writes NaN into the coefficients
                raise self.error(step, self._named(~torch.isfinite(sums.detach())))
            return
        self._note(step, ~torch.isfinite(total.detach()), ~torch.isfinite(sums.detach()))

    def skip_if_bad(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the update (gradients all-reduced under DDP, so every process skips alike): a
        non-finite gradient is noted too, and the update skipped once any step was not finite."""
        if not self.deferred:
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
            self._note(step, bad, torch.zeros(len(self.tasks), dtype=torch.bool, device=bad.device))
        if self.first_bad_step is not None:
            optimizer.found_inf = (self.first_bad_step >= 0).float()

    def check_every(self, step: int) -> None:
        """Deferred: read the flag every ``CHECK_EVERY`` steps."""
        if self.deferred and step % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        """Raise if a noted step was not finite (a host sync: not every step)."""
        if self.first_bad_step is None:
            return
        step = int(self.first_bad_step)
        if step >= 0:
            raise self.error(step, self._named(self.bad_tasks))

    def _note(self, step: int, bad: Tensor, bad_tasks: Tensor) -> None:
        if self.first_bad_step is None:
            self.first_bad_step = torch.full((), -1, dtype=torch.long, device=bad.device)
            self.bad_tasks = torch.zeros(len(self.tasks), dtype=torch.bool, device=bad.device)
        first = bad & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.bad_tasks = torch.where(first, bad_tasks, self.bad_tasks)

    def _named(self, bad: Tensor) -> list[str]:
        return [t for t, is_bad in zip(self.tasks, bad.tolist(), strict=True) if is_bad]

    def error(self, step: int, bad: list[str]) -> FloatingPointError:
        # deferred under DDP, a process may see only the all-reduced gradients of another's bad task
        gradients = " (in its gradients: another process's rows)" if self.deferred and not bad else ""
        return FloatingPointError(
            f"step {step}: the {self.objective} objective is not finite for task(s) {bad}{gradients}; "
            "the coefficients are still those of the last good step (saved in the checkpoint on "
            "exception). Lower model.lr, or check the experts and inputs of those tasks"
        )
