"""The merged model: ``theta0 + sum_t Gamma[t, g] * tau_t`` applied without building a new module.

The merged weights are a differentiable function of Gamma only; ``functional_call`` runs the
frozen base module with them swapped in, so no second copy of the model exists and gradients
reach nothing but the coefficients.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call
from transformers import AutoModelForSequenceClassification, PretrainedConfig, PreTrainedModel

from .coefficients import CoefficientLayout


def merge_tensor(base: Tensor, stacked: Tensor, gamma: Tensor) -> Tensor:
    """``base + sum_t gamma[t] * stacked[t]`` for one tensor: one fused contraction over tasks.
    ``gamma`` is [tasks], or [tasks x rows] for one coefficient per row (the channel layout)."""
    if stacked.dtype == gamma.dtype:
        delta = torch.tensordot(gamma, stacked, dims=1) if gamma.dim() == 1 else _per_row(gamma, stacked)
    else:  # low-precision storage: upcast inside, keep only the stored vectors for backward
        delta = _UpcastCombination.apply(gamma, stacked)
    return base + delta.to(base.dtype)


def merge_tensors(
    base: dict[str, Tensor],
    task_vectors: dict[str, Tensor],
    coefficients: Tensor,
    layout: CoefficientLayout,
) -> dict[str, Tensor]:
    """``theta0_n + sum_t Gamma[t, group(n)] * tau_t_n`` for every merged tensor ``n``."""
    return {
        name: merge_tensor(base[name], stacked, coefficients[:, layout.group_of[name]])
        for name, stacked in task_vectors.items()
    }


def _per_row(gamma: Tensor, stacked: Tensor) -> Tensor:
    """``sum_t gamma[t, r] * stacked[t, r, ...]``: row ``r`` of every task vector by its own weight."""
    return torch.einsum("tr,tr...->r...", gamma, stacked)


def _rows_first(gamma_t: Tensor, like: Tensor) -> Tensor:
    """One task's coefficient(s) shaped to broadcast over ``like`` (a vector: one per row)."""
    return gamma_t if gamma_t.dim() == 0 else gamma_t.reshape(-1, *([1] * (like.dim() - 1)))


class _UpcastCombination(torch.autograd.Function):
    """``sum_t gamma_t * tau_t`` in gamma's precision for bf16/fp16-stored ``tau``.

    Autograd would keep an upcast copy of every task vector for the backward pass, undoing the
    memory that low-precision storage saves; here the backward upcasts one task at a time.
    """

    @staticmethod
    def forward(ctx, gamma: Tensor, stacked: Tensor) -> Tensor:
        ctx.save_for_backward(stacked)
        ctx.gamma_rows = gamma.dim() == 2
        delta = torch.zeros(stacked.shape[1:], dtype=gamma.dtype, device=stacked.device)
        for t in range(stacked.shape[0]):
            delta.addcmul_(stacked[t], _rows_first(gamma[t], delta))  # promotes in place: no upcast copy
        return delta

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (stacked,) = ctx.saved_tensors
        dims = tuple(range(1 if ctx.gamma_rows else 0, grad.dim()))  # a row's weight: all but its row
        grad_gamma = torch.stack(  # promotes: one temporary per task
            [torch.mul(grad, stacked[t]).sum(dims) for t in range(stacked.shape[0])]
        )
        return grad_gamma, None


def expert_tensor(base: Tensor, stacked: Tensor, task_index: int) -> Tensor:
    """Expert ``t``'s own weight, ``theta0 + tau_t``, rebuilt from its task vector."""
    return base + stacked[task_index].to(base.dtype)


def expert_tensors(
    base: dict[str, Tensor], task_vectors: dict[str, Tensor], task_index: int
) -> dict[str, Tensor]:
    return {name: expert_tensor(base[name], stacked, task_index) for name, stacked in task_vectors.items()}


def forward_logits(
    base_model: torch.nn.Module, tensors: dict[str, Tensor], inputs: dict[str, Tensor]
) -> Tensor:
    """Run ``base_model`` with ``tensors`` in place of its own (the rest stay the base's)."""
    return functional_call(base_model, tensors, args=(), kwargs=inputs, strict=False).logits


def head_module_name(head_names: list[str]) -> str | None:
    """The one top-level submodule holding a task head (``classifier`` in BERT, RoBERTa...), or
    None when the head is spread over several (DistilBERT's ``pre_classifier`` + ``classifier``)."""
    roots = {name.split(".", 1)[0] for name in head_names}
    return roots.pop() if len(roots) == 1 else None


def logits_per_task(
    base_model: torch.nn.Module,
    merged: dict[str, Tensor],
    heads: list[dict[str, Tensor]],
    inputs: dict[str, Tensor],
    task_rows: list[tuple[int, Tensor]],
) -> list[Tensor]:
    """Logits of each ``(task, rows)`` group, each through its own head.

    The merged backbone is the same for every task, so it runs once on the whole batch and only
    the (small) heads run per task: the step costs one forward, not one per task. When the head
    is not one submodule, each task's rows take their own full forward instead.
    """
    name = head_module_name(list(heads[0]))
    if name is None or not hasattr(base_model, name):
        return [
            forward_logits(base_model, {**merged, **heads[t]}, {k: v[rows] for k, v in inputs.items()})
            for t, rows in task_rows
        ]
    head = getattr(base_model, name)
    captured: dict[str, tuple] = {}

    def capture(_module, args, kwargs):
        captured["call"] = (args, kwargs)

    hook = head.register_forward_pre_hook(capture, with_kwargs=True)
    try:  # the backbone once (any task's head fits here: its output is not used)
        forward_logits(base_model, {**merged, **heads[task_rows[0][0]]}, inputs)
    finally:
        hook.remove()
    args, kwargs = captured["call"]
    size = next(iter(inputs.values())).shape[0]

    def take(value, rows):
        return value[rows] if isinstance(value, Tensor) and value.dim() and value.shape[0] == size else value

    prefix = f"{name}."
    return [
        functional_call(
            head,
            {k.removeprefix(prefix): v for k, v in heads[t].items()},
            args=tuple(take(a, rows) for a in args),
            kwargs={k: take(v, rows) for k, v in kwargs.items()},
        )
        for t, rows in task_rows
    ]


@contextmanager
def swapped_weights(base_model: torch.nn.Module, tensors: dict[str, Tensor]) -> Iterator[torch.nn.Module]:
    """``base_model`` holding ``tensors`` for the duration, then its own weights again.

    For what ``functional_call`` cannot reach, such as ``generate`` (it calls ``forward`` many
    times). No copy is made and tied weights follow (they are one parameter); use it under
    ``torch.no_grad``: nothing here is differentiable.
    """
    params = dict(base_model.named_parameters())
    saved = {name: params[name].data for name in tensors}
    try:
        for name, tensor in tensors.items():
            params[name].data = tensor.detach().to(saved[name].dtype)
        yield base_model
    finally:
        for name, data in saved.items():
            params[name].data = data


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Second state-dict names of tied tensors -> their first name (``lm_head.weight`` ->
    ``model.embed_tokens.weight``): ``save_pretrained`` stores a tied tensor once, under its
    first name, and one merged tensor serves every name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def build_model(
    base_model: torch.nn.Module,
    tensors: dict[str, Tensor],
    config: PretrainedConfig,
    model_class: type = AutoModelForSequenceClassification,
) -> PreTrainedModel:
    """A plain ``transformers`` model holding ``tensors`` over the base's remaining weights."""
    state = {n: t.detach().to("cpu") for n, t in base_model.state_dict().items()}
    state.update({n: t.detach().to("cpu") for n, t in tensors.items()})
    for alias, name in tied_aliases(base_model).items():  # a tied head is the merged embedding
        state[alias] = state[name]
    # Built on the CPU, not on "meta": non-persistent buffers (position ids) must be real.
    model = model_class.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_model(
    model: PreTrainedModel, folder: Path, tokenizer=None, max_shard_size: str | int | None = None
) -> None:
    """``save_pretrained`` the model (and tokenizer) so plain ``from_pretrained`` loads it;
    ``max_shard_size`` (e.g. ``"2GB"``) splits the weights into shards with an index."""
    # save_pretrained records the model's dtype in its config, and build_model's models share the
    # expert's config object: without a copy one bfloat16 export would relabel the expert.
    model.config = copy.deepcopy(model.config)
    model.save_pretrained(folder, **({} if max_shard_size is None else {"max_shard_size": max_shard_size}))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
