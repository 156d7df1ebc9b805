"""Expert outputs, computed once per input and cached on disk.

The objective compares the merged model with a fixed target per input, so recomputing the
experts every step would waste N forwards. The cache key is a hash of the expert's weights
and of the tokenised inputs, so a changed expert or changed data never reuses stale targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from lightning.pytorch import LightningModule
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .atomic import atomic_file

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/divmerge_pl/teachers")


def cache_key(*parts: str) -> str:
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


def token_fingerprint(token_rows: Iterable[list[int]]) -> str:
    """Hash of tokenised inputs, in order (the teacher tensors are row-aligned with them)."""
    digest = hashlib.blake2b(digest_size=16)
    for ids in token_rows:
        digest.update(json.dumps(ids).encode())
        digest.update(b";")
    return digest.hexdigest()


@torch.no_grad()
def compute_logprobs(
    forward: Callable[[dict[str, Tensor]], Tensor],
    batches: Iterable[dict[str, Tensor]],
    desc: str,
    show_progress: bool = True,
) -> Tensor:
    """Log-probabilities over the last dim of ``forward(batch)``, concatenated over batches."""
    outputs = [
        torch.log_softmax(forward(batch).float(), dim=-1).cpu()
        for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False)
    ]
    return torch.cat(outputs)


class TeacherCache:
    """Teacher tensors on disk under ``root`` (``None`` disables caching)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()

    def load(self, key: str) -> dict[str, Tensor] | None:
        if self.root is None:
            return None
        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as err:
            log.warning("teacher cache %s is unreadable (%s); recomputing it", path, err)
            return None

    def save(self, key: str, tensors: dict[str, Tensor]) -> None:
        """Write atomically: a run killed mid-write never leaves a file that looks complete."""
        if self.root is None:
            return
        with atomic_file(self.root / f"{key}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)


def teacher_key(
    fingerprint: str, inputs: Dataset, evals: Dataset | None, vector_dtype: str, *settings: str
) -> str:
    """What one expert's cached outputs depend on: its weights, its rows, how it was rebuilt."""
    return cache_key(
        fingerprint,
        token_fingerprint(inputs["input_ids"]),
        token_fingerprint(evals["input_ids"]) if evals is not None else "-",
        # experts rebuilt from low-precision task vectors are not quite the float32 ones
        *([vector_dtype] if vector_dtype != "float32" else []),
        *settings,
    )


class Teachers(nn.Module):
    """The targets of the objective, one row per merge input (``row_id``): each expert's
    log-probabilities on its own rows (classes; or, for causal LMs, at each token of its greedy
    answer, with the answers themselves and, under ``top_k``, the kept token ids). Buffers, so
    they move with the module; never checkpointed (the cache on disk holds them)."""

    def __init__(
        self,
        logprobs: Tensor,
        expert_scores: dict[str, float],
        answer_ids: Tensor | None = None,
        answer_len: Tensor | None = None,
        top_ids: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.expert_scores = expert_scores  # each expert's score on its task's scored rows
        self.register_buffer("logprobs", logprobs, persistent=False)
        for name, tensor in (("answer_ids", answer_ids), ("answer_len", answer_len), ("top_ids", top_ids)):
            self.register_buffer(name, tensor, persistent=False)
        # a host copy, not a buffer: a step reads its batch's widest answer without a device sync
        self.host_answer_len = None if answer_len is None else answer_len.cpu()


def rows_of(rows: Dataset, task_id: int) -> Dataset:
    """The rows of one task (``task_id`` as the datamodule numbers its tasks)."""
    ids = rows["task_id"]
    return rows.select([i for i, t in enumerate(ids) if t == task_id])


def across_ranks(
    module: LightningModule,
    batches_of: Callable[[Dataset], Iterable],
    rows: Dataset,
    compute: Callable[[Any], Any],
    equal_shares: bool = False,
) -> Any:
    """``compute`` over ``rows``' batches (a tensor or a dict of tensors, a row each), each of the W
    processes taking every W-th row and the shares gathered back in row order: teachers cost
    1/W of their single-process time, and every rank ends with all of them. ``equal_shares``:
    every rank runs as many rows (a short share repeats its last row, dropped after), for a
    ``compute`` whose forwards communicate (sharded mode gathers weights in each)."""
    world = module.trainer.world_size if module._trainer is not None else 1
    if world == 1 or len(rows) < world:
        return compute(batches_of(rows))
    rank = module.trainer.global_rank
    size = -(-len(rows) // world)
    picked = list(range(rank, len(rows), world))
    own = len(picked)
    if equal_shares:
        picked += picked[-1:] * (size - own)
    share = compute(batches_of(rows.select(picked)))
    if equal_shares:
        share = {k: v[:own] for k, v in share.items()} if isinstance(share, dict) else share[:own]

    def gather(part: Tensor) -> Tensor:
        padded = part.new_zeros((size, *part.shape[1:]))
        padded[: len(part)] = part
        return interleave_shares(module.all_gather(padded.to(module.device)).cpu(), len(rows))

    return {k: gather(v) for k, v in share.items()} if isinstance(share, dict) else gather(share)


def interleave_shares(gathered: Tensor, rows: int) -> Tensor:
    """``[W, ceil(n / W), ...]`` shares (rank r held rows r, r + W, ...) back into row order,
    without the padding of the last share."""
    return gathered.transpose(0, 1).reshape(-1, *gathered.shape[2:])[:rows]
