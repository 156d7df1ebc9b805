import math

import pytest
import torch

from divmerge_pl.divergences import (
    coarsen,
    entropy,
    get_objective,
    js_divergence,
    kl_divergence,
    masked_mean,
    top_k_with_rest,
)


def random_logp(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(*shape, generator=gen, dtype=torch.float64), -1)


def reference_js(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Textbook JS on probabilities, float64, 0 log 0 = 0."""
    m = (p + q) / 2

    def kl(a, b):
        return torch.where(a > 0, a * (a / b).log(), torch.zeros_like(a)).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_js_of_identical_distributions_is_zero():
    logp = random_logp(16, 7)
    assert js_divergence(logp, logp).abs().max() < 1e-12


def test_js_matches_textbook_formula_and_is_symmetric():
    logp, logq = random_logp(32, 5, seed=1), random_logp(32, 5, seed=2)
    ours = js_divergence(logp, logq)
    assert torch.allclose(ours, reference_js(logp.exp(), logq.exp()), atol=1e-10)
    assert torch.allclose(ours, js_divergence(logq, logp), atol=1e-12)


def test_js_bounds_reach_log2_for_disjoint_supports():
    logp = torch.log(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    logq = torch.log(torch.tensor([[0.0, 0.5, 0.5]], dtype=torch.float64))
    assert js_divergence(logp, logq).item() == pytest.approx(math.log(2), abs=1e-12)
    values = js_divergence(random_logp(200, 4, seed=3), random_logp(200, 4, seed=4))
    assert (values >= -1e-12).all() and (values <= math.log(2) + 1e-12).all()


def test_kl_is_forward_with_expert_as_reference():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    assert kl_divergence(p.log(), q.log()).item() == pytest.approx(expected.item(), rel=1e-12)
    assert kl_divergence(q.log(), p.log()).item() != pytest.approx(expected.item(), rel=1e-3)
    values = kl_divergence(random_logp(100, 6, seed=5), random_logp(100, 6, seed=6))
    assert (values >= 0).all()
    assert kl_divergence(p.log(), p.log()).abs().item() < 1e-12


def test_entropy_of_uniform_is_log_k_and_ignores_reference():
    logq = torch.full((3, 8), -math.log(8), dtype=torch.float64)
    assert torch.allclose(entropy(None, logq), torch.full((3,), math.log(8), dtype=torch.float64))
    assert torch.equal(entropy(random_logp(3, 8), logq), entropy(None, logq))


@pytest.mark.parametrize("name", ["js", "kl", "entropy"])
def test_gradients_finite_where_probabilities_are_zero(name):
    # a padded class: probability 0 in both (log-prob -inf), and one exactly 0 in the expert
    expert = torch.log(torch.tensor([[0.6, 0.4, 0.0, 0.0]]))
    logits = torch.tensor([[1.0, -2.0, 0.5, float("-inf")]], requires_grad=True)
    merged = torch.log_softmax(logits, -1)
    value = get_objective(name)(expert, merged).sum()
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


def test_masked_mean_ignores_masked_positions():
    values = torch.tensor([1.0, 2.0, 100.0, 3.0])
    mask = torch.tensor([True, True, False, True])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values).item() == pytest.approx(26.5)


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="entropy, js, kl"):
        get_objective("jsd")


@pytest.mark.parametrize("divergence", [js_divergence, kl_divergence])
def test_top_k_with_rest_is_exact_at_k_vocab_and_a_lower_bound_below(divergence):
    logp, logq = random_logp(5, 7, 40, seed=1), random_logp(5, 7, 40, seed=2)
    full = divergence(logp, logq)
    ids, coarse = top_k_with_rest(logp, 40)
    assert torch.isneginf(coarse[..., -1]).all()  # nothing is left for the rest
    torch.testing.assert_close(divergence(coarse, coarsen(logq, ids)), full, rtol=1e-12, atol=1e-12)
    previous = torch.zeros_like(full)
    for k in (1, 4, 16, 39):  # a finer partition never lowers the divergence
        ids, coarse = top_k_with_rest(logp, k)
        value = divergence(coarse, coarsen(logq, ids))
        assert (value <= full + 1e-12).all() and (value >= previous - 1e-12).all()
        previous = value
    assert (previous > 0).all()


def test_rest_bucket_holds_exactly_the_mass_outside_the_top_k():
    logp = random_logp(3, 50, seed=3)
    ids, coarse = top_k_with_rest(logp, 5)
    probs = logp.exp()
    torch.testing.assert_close(coarse.exp().sum(-1), torch.ones(3, dtype=logp.dtype))
    torch.testing.assert_close(coarse[:, :5].exp(), probs.topk(5, -1).values)
    torch.testing.assert_close(coarse[:, 5].exp(), 1 - probs.topk(5, -1).values.sum(-1))


def test_top_k_at_k_vocab_keeps_gradients_finite():
    logp = random_logp(4, 12, seed=4)
    logits = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    ids, coarse = top_k_with_rest(logp, 12)
    js_divergence(coarse, coarsen(torch.log_softmax(logits, -1), ids)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
