import torch

from divmerge_pl.coefficients import build_layout
from divmerge_pl.merged import expert_tensors, merge_tensors


def tensors(seed: int):
    gen = torch.Generator().manual_seed(seed)
    base = {
        "a.layer.0.w": torch.randn(4, 3, generator=gen),
        "a.layer.1.b": torch.randn(5, generator=gen),
    }
    taus = {n: torch.randn(3, *t.shape, generator=gen) for n, t in base.items()}
    return base, taus


def test_merge_is_base_plus_weighted_task_vectors_per_group():
    base, taus = tensors(0)
    layout = build_layout(list(base), "layer")
    gamma = torch.tensor([[0.1, -0.4], [0.7, 1.3], [0.25, 0.0]])
    merged = merge_tensors(base, taus, gamma, layout)
    for g, name in enumerate(base):
        expected = base[name] + sum(gamma[t, g] * taus[name][t] for t in range(3))
        assert torch.allclose(merged[name], expected, atol=1e-6)


def test_merge_is_linear_in_coefficients_and_gradients_reach_only_gamma():
    base, taus = tensors(1)
    layout = build_layout(list(base), "task")
    g1, g2 = torch.randn(3, 1), torch.randn(3, 1)
    m1, m2 = merge_tensors(base, taus, g1, layout), merge_tensors(base, taus, g2, layout)
    m12 = merge_tensors(base, taus, g1 + g2, layout)
    for name in base:
        assert torch.allclose(
            m12[name] - base[name], (m1[name] - base[name]) + (m2[name] - base[name]), atol=1e-5
        )
    gamma = torch.zeros(3, 1, requires_grad=True)
    merged = merge_tensors(base, taus, gamma, layout)
    sum(t.sum() for t in merged.values()).backward()
    expected = torch.stack([sum(taus[n][t].sum() for n in base) for t in range(3)]).unsqueeze(1)
    assert torch.allclose(gamma.grad, expected, atol=1e-5)
    assert all(not t.requires_grad for t in list(base.values()) + list(taus.values()))


def test_expert_tensors_rebuild_each_expert():
    base, taus = tensors(2)
    for t in range(3):
        rebuilt = expert_tensors(base, taus, t)
        for name in base:
            assert torch.equal(rebuilt[name], base[name] + taus[name][t])
