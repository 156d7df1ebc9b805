"""The merged model: ``theta0 + sum_t Gamma[t, g] * tau_t`` applied without building a new module.

The merged weights are a differentiable function of Gamma only; ``functional_call`` runs the
frozen base module with them swapped in, so no second copy of the model exists and gradients
reach nothing but the coefficients.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from .coefficients import CoefficientLayout


def merge_tensors(
    base: dict[str, Tensor],
    task_vectors: dict[str, Tensor],
    coefficients: Tensor,
    layout: CoefficientLayout,
) -> dict[str, Tensor]:
    """``theta0_n + sum_t Gamma[t, group(n)] * tau_t_n`` for every merged tensor ``n``."""
    merged = {}
    for name, stacked in task_vectors.items():
        gamma = coefficients[:, layout.group_of[name]]
        # low-precision storage (bf16 task vectors) is upcast here, one tensor at a time
        delta = torch.tensordot(gamma, stacked.to(gamma.dtype), dims=1)
        merged[name] = base[name] + delta.to(base[name].dtype)
    return merged


def expert_tensors(
    base: dict[str, Tensor], task_vectors: dict[str, Tensor], task_index: int
) -> dict[str, Tensor]:
    """Expert ``t``'s own weights, ``theta0 + tau_t``, rebuilt from its task vector."""
    return {
        name: base[name] + stacked[task_index].to(base[name].dtype) for name, stacked in task_vectors.items()
    }


def forward_logits(
    skeleton: torch.nn.Module, tensors: dict[str, Tensor], inputs: dict[str, Tensor]
) -> Tensor:
    """Run ``skeleton`` with ``tensors`` in place of its own (the rest stay the base's)."""
    return functional_call(skeleton, tensors, args=(), kwargs=inputs, strict=False).logits


def build_model(
    skeleton: torch.nn.Module, tensors: dict[str, Tensor], config: PretrainedConfig
) -> PreTrainedModel:
    """A plain ``transformers`` model holding ``tensors`` over the base's remaining weights."""
    state = {n: t.detach().to("cpu") for n, t in skeleton.state_dict().items()}
    state.update({n: t.detach().to("cpu") for n, t in tensors.items()})
    # Built on the CPU, not on "meta": non-persistent buffers (position ids) must be real.
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_model(model: PreTrainedModel, folder: Path, tokenizer=None) -> None:
    """``save_pretrained`` the model (and tokenizer) so plain ``from_pretrained`` loads it."""
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
