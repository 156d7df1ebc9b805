"""Merging module by module (``merge_on_demand``): the whole merge's objective and gradient,
without a merged copy of the model held from forward to backward."""

from __future__ import annotations

import gc
import weakref
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from divmerge_pl.on_demand import merged_on_demand

from .lm_setup import build_lm_setup
from .test_causal_lm import first_batch, fit_lm
from .test_fit import fit_module

TASKS = {"alpha": 2, "beta": 3}


def objective_and_gradient(module, batch, on_demand: bool) -> tuple[torch.Tensor, torch.Tensor]:
    module.coefficients.grad = None
    if on_demand:
        with module.frozen.on_demand(module.frozen.merge_at(module.merge_coefficients(), module.layout)):
            rows = module.kind.row_divergences({}, batch)
    else:
        rows = module.kind.row_divergences(module.merged_tensors(), batch)
    values = torch.cat([v for _, v in rows])
    values.sum().backward()
    return values.detach(), module.coefficients.grad.clone()


def trained_at_spread_coefficients(kind: str, tiny, tmp_path):
    if kind == "bert":
        module, trainer = fit_module(tiny, TASKS, max_steps=0)
    else:  # every tensor differs from the base, the embeddings (tied to GPT-2's head) too
        module, trainer = fit_lm(build_lm_setup(tmp_path / kind, kind))
    torch.manual_seed(0)
    module.coefficients.data = torch.rand_like(module.coefficients)  # one value per task and group
    return module, first_batch(trainer)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_on_demand_gives_the_whole_merge_objective_and_gradient(kind, tiny, tmp_path):
    module, batch = trained_at_spread_coefficients(kind, tiny, tmp_path)
    assert module.on_demand_ok  # the check at fit start found this model fit for it
    before = {n: p.clone() for n, p in module.frozen.base_model.named_parameters()}
    values, grad = objective_and_gradient(module, batch, on_demand=False)
    on_demand_values, on_demand_grad = objective_and_gradient(module, batch, on_demand=True)
    assert values.abs().min() > 0 and grad.abs().max() > 0
    torch.testing.assert_close(on_demand_values, values, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(on_demand_grad, grad, rtol=1e-5, atol=1e-7)
    for name, param in module.frozen.base_model.named_parameters():  # the base is back, unchanged
        assert torch.equal(param, before[name]), name


def test_no_merged_weight_lives_from_forward_to_backward(tiny):
    module, trainer = fit_module(tiny, TASKS, max_steps=0)
    batch = first_batch(trainer)
    merge = module.frozen.merge_at(module.merge_coefficients(), module.layout)
    made: list[weakref.ref] = []
    alive_at_make: list[int] = []

    def make(name: str) -> torch.Tensor:
        alive_at_make.append(sum(ref() is not None for ref in made))
        tensor = merge(name)
        made.append(weakref.ref(tensor))
        return tensor

    with merged_on_demand(module.frozen.base_model, make, module.frozen.names):
        loss = torch.cat([v for _, v in module.kind.row_divergences({}, batch)]).sum()
    built_in_forward = len(made)
    gc.collect()
    assert built_in_forward >= len(module.frozen.names)
    # during the forward, only the running module's own weights (a weight and a bias) exist
    per_module = Counter(name.rsplit(".", 1)[0] for name in module.frozen.names)
    assert max(alive_at_make) < max(per_module.values()) == 2
    assert all(ref() is None for ref in made)  # the whole merge keeps every one until backward
    loss.backward()
    assert len(made) > built_in_forward  # backward rebuilt the weights it needed
    assert module.coefficients.grad.abs().max() > 0


def test_fit_on_demand_ends_with_the_coefficients_of_the_whole_merge(tiny):
    on_demand, _ = fit_module(tiny, TASKS, max_steps=4)
    whole, _ = fit_module(tiny, TASKS, max_steps=4, merge_on_demand=False)
    assert on_demand.on_demand_ok and not whole.on_demand_ok
    assert not torch.allclose(whole.coefficients, torch.full_like(whole.coefficients, 0.5))
    torch.testing.assert_close(on_demand.coefficients, whole.coefficients, rtol=1e-5, atol=1e-6)


def test_a_model_reading_a_weight_outside_its_module_falls_back_with_a_warning(tiny, monkeypatch):
    """As a head reading the embedding matrix would: BERT's pooler made to read its dense
    layer's weight without running that layer."""
    from transformers.models.bert import modeling_bert

    def pooler_reading_directly(self, hidden_states):
        return torch.tanh(F.linear(hidden_states[:, 0], self.dense.weight, self.dense.bias))

    monkeypatch.setattr(modeling_bert.BertPooler, "forward", pooler_reading_directly)
    with pytest.warns(UserWarning, match="merge_on_demand.*outside its own module"):
        module, _ = fit_module(tiny, TASKS, max_steps=3)
    assert not module.on_demand_ok
    assert torch.isfinite(module.coefficients).all()
    assert not torch.allclose(module.coefficients, torch.full_like(module.coefficients, 0.5))
