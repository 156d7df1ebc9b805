"""Expert outputs, computed once per input and cached on disk.

The objective compares the merged model with a fixed target per input, so recomputing the
experts every step would waste N forwards. The cache key is a hash of the expert's weights
and of the tokenised inputs, so a changed expert or changed data never reuses stale targets.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

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
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, self.root / f"{key}.safetensors")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
