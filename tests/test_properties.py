"""Property-based checks (hypothesis): divergences stay finite and within their bounds for any
distributions, zeros and masks included; merges are linear in the coefficients."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from divmerge_pl.coefficients import build_layout
from divmerge_pl.divergences import entropy, js_divergence, kl_divergence, masked_mean
from divmerge_pl.merged import merge_tensors
from divmerge_pl.static_merges import average, dare, task_arithmetic, ties

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def log_distributions(draw):
    """Pairs of [rows, classes] log-probabilities; some probabilities exactly 0 (-inf logits)."""
    rows, classes = draw(st.integers(1, 6)), draw(st.integers(2, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    pair = []
    for _ in range(2):
        logits = torch.randn(rows, classes, generator=generator) * draw(
            st.sampled_from([0.1, 1.0, 10.0, 50.0])
        )
        zeros = torch.rand(rows, classes, generator=generator) < draw(st.sampled_from([0.0, 0.3, 0.7]))
        zeros[:, 0] = False  # at least one class with mass
        pair.append(torch.log_softmax(logits.masked_fill(zeros, float("-inf")), dim=-1))
    mask = torch.rand(rows, generator=generator) < 0.7
    return pair[0], pair[1], mask


@SETTINGS
@given(log_distributions())
def test_divergences_are_finite_and_within_bounds(data):
    logp, logq, mask = data
    js, js_back = js_divergence(logp, logq), js_divergence(logq, logp)
    assert torch.isfinite(js).all()
    assert (js >= -1e-6).all() and (js <= math.log(2) + 1e-6).all()
    torch.testing.assert_close(js, js_back, atol=1e-5, rtol=1e-5)  # symmetric
    assert (js_divergence(logp, logp).abs() < 1e-6).all()  # JS(p, p) = 0
    kl = kl_divergence(logp, logq)
    assert (kl >= -1e-6).all() and not torch.isnan(kl).any()  # +inf where q misses p's support
    h = entropy(None, logq)
    assert torch.isfinite(h).all() and (h >= -1e-6).all() and (h <= math.log(logq.shape[-1]) + 1e-5).all()
    value = masked_mean(js, mask)
    assert torch.isfinite(value)
    if mask.any():
        torch.testing.assert_close(value, js[mask].mean())


@SETTINGS
@given(log_distributions())
def test_js_gradients_are_finite_where_probabilities_are_zero(data):
    logp, logq, _ = data
    logits = torch.where(torch.isfinite(logq), logq, torch.full_like(logq, -1e4)).requires_grad_()
    js_divergence(logp, torch.log_softmax(logits, dim=-1)).sum().backward()
    assert torch.isfinite(logits.grad).all()


@st.composite
def task_vector_sets(draw):
    tasks = draw(st.integers(1, 4))
    shapes = draw(st.lists(st.sampled_from([(3,), (2, 3), (4, 1)]), min_size=1, max_size=3))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    names = [f"layer.{i}.w" for i in range(len(shapes))]
    base = {n: torch.randn(s, generator=generator) for n, s in zip(names, shapes, strict=True)}
    vectors = {n: torch.randn((tasks, *s), generator=generator) for n, s in zip(names, shapes, strict=True)}
    return base, vectors, tasks, draw(st.sampled_from(["task", "layer", "block"]))


@SETTINGS
@given(task_vector_sets(), st.floats(-3, 3), st.floats(-3, 3))
def test_merge_is_linear_in_the_coefficients(data, a, b):
    base, vectors, tasks, granularity = data
    layout = build_layout(list(vectors), granularity)
    g1, g2 = torch.randn(tasks, layout.num_groups), torch.randn(tasks, layout.num_groups)
    m1, m2 = merge_tensors(base, vectors, g1, layout), merge_tensors(base, vectors, g2, layout)
    combined = merge_tensors(base, vectors, a * g1 + b * g2, layout)
    for name in vectors:
        expected = base[name] + a * (m1[name] - base[name]) + b * (m2[name] - base[name])
        torch.testing.assert_close(combined[name], expected, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(task_vector_sets(), st.floats(0.05, 1.0), st.floats(0.0, 0.95))
def test_static_merges_are_finite_and_bounded(data, density, drop_rate):
    _, vectors, tasks, _ = data
    for name, delta in ties(vectors, density=density, scale=1.0).items():
        assert torch.isfinite(delta).all()
        # a disjoint mean of entries never exceeds the largest of them
        assert (delta.abs() <= vectors[name].abs().amax(dim=0) + 1e-6).all()
    for name, delta in average(vectors).items():
        torch.testing.assert_close(delta, task_arithmetic(vectors, scale=1 / tasks)[name])
    for delta in dare(vectors, drop_rate=drop_rate, seed=3).values():
        assert torch.isfinite(delta).all()
