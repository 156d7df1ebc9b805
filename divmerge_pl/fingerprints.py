"""Content hashes of weights: caches, checkpoints and benchmark records are keyed by what the
weights are, not where they lie."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def fingerprint(state: dict[str, Tensor]) -> str:
    """A content hash of named tensors: caches and checkpoints are keyed by what the weights are."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        digest_tensor(digest, name, state[name])
    return digest.hexdigest()


def digest_tensor(digest: hashlib._Hash, name: str, tensor: Tensor) -> None:
    """Add one named tensor, its shape and dtype included, to a running ``digest``."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself, no bytes copy
