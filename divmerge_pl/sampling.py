"""The order of the merge's training rows, and its place in the epoch across a resume.

Lightning saves the ``state_dict`` of a train DataLoader that has one in every checkpoint and
hands it back to ``load_state_dict`` on resume: a run resumed mid-epoch then carries on with the
very batches an unbroken run would have seen, so it ends with the same coefficients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override


class EpochShuffle(DistributedSampler):
    """A fresh permutation per epoch that depends only on ``(seed, epoch)``: the order does not
    hang on whatever else consumed the global RNG (expert fine-tuning, teacher passes), so reruns
    and resumed runs see the same batches. Lightning calls ``set_epoch`` every epoch.

    With several processes, rank ``r`` takes every ``num_replicas``-th row of the one global
    order, so the processes' batches together are exactly the single-process batch of
    ``num_replicas x batch_size`` rows. A DistributedSampler built for the Trainer's own ranks,
    so Lightning keeps it as it is whatever ``use_distributed_sampler`` says (it would replace
    any other sampler by its own under DDP, and that order is not the single-process one).
    """

    def __init__(self, rows: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        # explicit ranks: no process group is needed to build it
        super().__init__(rows, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, rows: int) -> None:
        """Leave out the first ``rows`` of this rank's share of ``epoch``, once."""
        self._resume = (epoch, rows)

    @override
    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # equal shares, as DistributedSampler pads
        share = order[self.rank :: self.num_replicas]
        if self._resume is not None and self._resume[0] == self.epoch:
            share = share[self._resume[1] :]
        self._resume = None
        return iter(share)


class ResumableLoader(DataLoader):
    """A train DataLoader over an :class:`EpochShuffle` whose checkpointed state is its place in
    the epoch: the batches whose optimizer step is done (``steps_done``, the Trainer's
    ``global_step``, tells whether the batch last handed out has been stepped on yet, so a
    checkpoint written in the middle of a step, by Ctrl-C or SLURM's signal, resumes with that
    batch). Its length stays the whole epoch's, as Lightning expects of a resumed loader."""

    sampler: EpochShuffle

    def __init__(self, *args: Any, steps_done: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_done = steps_done
        self._handed_out = 0  # batches of the current epoch given to the loop
        self._step_at_hand_out: int | None = None
        self._resume: dict[str, int] | None = None

    @override
    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        self._handed_out, self._step_at_hand_out = 0, None
        if resume is not None and resume["epoch"] == self.sampler.epoch:
            self._handed_out = resume["batches"]
            self.sampler.resume_at(resume["epoch"], resume["batches"] * self.batch_size)
        for batch in super().__iter__():
            self._handed_out += 1
            self._step_at_hand_out = None if self.steps_done is None else self.steps_done()
            yield batch

    def state_dict(self) -> dict[str, int]:
        in_flight = self.steps_done is not None and self._step_at_hand_out == self.steps_done()
        return {"epoch": self.sampler.epoch, "batches": self._handed_out - int(in_flight)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
