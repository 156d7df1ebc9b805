"""Merged weights that exist only while their module runs, and are rebuilt for backward.

``functional_call`` needs every merged tensor at once, and autograd then keeps each one (a
Linear saves its weight to compute the input's gradient) until backward: a whole second copy
of the model for the whole step. Here a module's merged tensors are built by a pre-hook just
before its forward, put back to the base's after it, and autograd saves a recipe instead of
the tensor; backward rebuilds it when it needs it. The step then holds base + task vectors +
activations + one module's weights, for one more merge per tensor (O(N x params)) in backward.

Only weights read through their own module's forward are swapped in. Outside it a merged
weight reads as NaN (a stride-0 placeholder, no memory), so a model that reads one from another
module (``self.embed.weight`` in its head) gives NaN logits rather than silently using the
base's: one forward with finite logits shows that a model is fit for this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .merged import tied_aliases

MakeTensor = Callable[[str], Tensor]


def _owners(base_model: nn.Module, names: Iterable[str]) -> dict[nn.Module, list[tuple[str, str]]]:
    """Module -> its ``(attribute, merged tensor name)`` pairs, tied second names included."""
    wanted = set(names)
    owned: dict[nn.Module, list[tuple[str, str]]] = {}
    aliases = tied_aliases(base_model)
    for full, _ in base_model.named_parameters(remove_duplicate=False):
        name = aliases.get(full, full)
        if name in wanted:
            prefix, _, attr = full.rpartition(".")
            owned.setdefault(base_model.get_submodule(prefix), []).append((attr, name))
    return owned


def _storage(tensor: Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return None


@contextmanager
def merged_on_demand(base_model: nn.Module, make: MakeTensor, names: Iterable[str]) -> Iterator[None]:
    """Run forwards of ``base_model`` inside this block with ``make(name)`` in place of each of
    ``names``, built per module; the backward may run after the block has closed."""
    owners = _owners(base_model, names)
    live: dict[int, str] = {}  # storage of a merged tensor being used -> its name

    def before(module: nn.Module, _args) -> None:
        for attr, name in owners[module]:
            tensor = make(name)
            live[_storage(tensor)] = name
            module._parameters[attr] = tensor

    def after(module: nn.Module, _args, _output) -> None:
        for attr, _name in owners[module]:
            live.pop(_storage(module._parameters[attr]), None)
            module._parameters[attr] = placeholders[module, attr]

    def pack(tensor: Tensor):
        name = live.get(_storage(tensor)) if live else None
        if name is None:
            return tensor
        return name, tensor.size(), tensor.stride(), tensor.storage_offset()

    def unpack(saved):
        if isinstance(saved, Tensor):
            return saved
        name, size, stride, offset = saved
        with torch.no_grad():
            return make(name).as_strided(size, stride, offset)

    originals = {(m, attr): m._parameters[attr] for m, owned in owners.items() for attr, _ in owned}
    placeholders = {key: nan_like(param) for key, param in originals.items()}
    hooks = []
    try:
        for (module, attr), placeholder in placeholders.items():
            module._parameters[attr] = placeholder
        for module in owners:
            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(after, always_call=True))
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        for hook in hooks:
            hook.remove()
        for (module, attr), param in originals.items():
            module._parameters[attr] = param
        live.clear()


def nan_like(param: Tensor, device: torch.device | None = None) -> Tensor:
    """NaN everywhere, the shape, dtype and device (or ``device``) of ``param``, four bytes of memory."""
    where = param.device if device is None else device
    return torch.full((), float("nan"), dtype=param.dtype, device=where).expand(param.shape)
