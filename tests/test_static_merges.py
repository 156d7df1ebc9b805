"""Training-free merges against results worked out by hand on small tensors."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from divmerge_pl.static_merges import (
    average,
    build_static_merge,
    dare_drop,
    dare_task_vectors,
    decorrelate_matrix,
    disjoint_mean,
    elect_sign,
    model_trim_thresholds,
    task_arithmetic,
    ties,
    ties_task_vectors,
    trim_top_k,
    trimmed,
    tsv_task_vectors,
)


def test_trim_keeps_each_tasks_largest_entries():
    stacked = torch.tensor([[0.1, -0.5, 0.3, 0.05], [2.0, 0.0, -1.0, 0.4]])
    assert_close(trim_top_k(stacked, 0.5), torch.tensor([[0.0, -0.5, 0.3, 0.0], [2.0, 0.0, -1.0, 0.0]]))
    assert_close(trim_top_k(stacked, 0.25), torch.tensor([[0.0, -0.5, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    assert_close(trim_top_k(stacked, 1.0), stacked)


def test_ties_on_three_tasks_with_a_sign_conflict():
    # entry 0: +1, +2, -4 -> sum -1 -> sign -, only task 2 agrees -> -4
    # entry 1: +3, -1, +1 -> sum +3 -> sign +, tasks 0 and 2 agree -> (3 + 1) / 2 = 2
    # entry 2: all trimmed away (smallest in every task) -> 0
    # entry 3: -2, -2, +0.5... trimmed: task 2 keeps its two largest: 4 (e0) and 1 (e1)
    stacked = torch.tensor(
        [
            [1.0, 3.0, 0.1, -2.0],
            [2.0, -1.0, 0.1, -2.0],
            [-4.0, 1.0, 0.2, 0.5],
        ]
    )
    trimmed = trim_top_k(stacked, 0.5)
    assert_close(
        trimmed,
        torch.tensor([[0.0, 3.0, 0.0, -2.0], [2.0, 0.0, 0.0, -2.0], [-4.0, 1.0, 0.0, 0.0]]),
    )
    sign = elect_sign(trimmed)  # sums: -2, 4, 0, -4
    assert_close(sign, torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    # e0: only -4 agrees; e1: 3 and 1 -> 2; e2: none -> 0; e3: -2 and -2 -> -2
    expected = torch.tensor([-4.0, 2.0, 0.0, -2.0])
    assert_close(disjoint_mean(trimmed, sign), expected)
    merged = ties({"w": stacked}, density=0.5, scale=0.5)["w"]
    assert_close(merged, 0.5 * expected)
    processed = ties_task_vectors({"w": stacked}, density=0.5)["w"]
    assert_close(
        processed, torch.tensor([[0.0, 3.0, 0.0, -2.0], [0.0, 0.0, 0.0, -2.0], [-4.0, 1.0, 0.0, 0.0]])
    )


def test_ties_without_trimming_or_conflict_is_the_average():
    stacked = torch.rand(3, 5, 4) + 0.1  # all positive: no conflict
    assert_close(ties({"w": stacked}, density=1.0, scale=1.0)["w"], average({"w": stacked})["w"])


def test_task_arithmetic_and_average():
    tau = torch.randn(1, 6, 3)
    assert_close(task_arithmetic({"w": tau}, scale=1.0)["w"], tau[0])  # one expert, scale 1: the expert
    stacked = torch.randn(4, 6, 3)
    assert_close(average({"w": stacked})["w"], task_arithmetic({"w": stacked}, scale=0.25)["w"])
    assert_close(average({"w": stacked})["w"], stacked.mean(0))


def test_dare_rescale_keeps_the_expectation_and_is_seeded():
    stacked = torch.full((2, 200_000), 0.5)
    dropped = dare_drop(stacked, 0.9, torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert_close(dropped[kept], torch.full_like(dropped[kept], 5.0))  # survivors rescaled by 1/(1-p)
    # mean of 400k draws: standard error 0.5 * sqrt(0.9 / 0.1) / sqrt(4e5) ~ 0.0024; 5 sigma
    assert abs(dropped.mean().item() - 0.5) < 0.012
    assert abs(kept.float().mean().item() - 0.1) < 0.003
    assert_close(dare_drop(stacked, 0.0, torch.Generator()), stacked)
    vectors = {"a": torch.randn(2, 50), "b": torch.randn(2, 50)}
    first, again = (
        dare_task_vectors(vectors, 0.5, seed=1),
        dare_task_vectors(dict(reversed(vectors.items())), 0.5, 1),
    )
    assert all(torch.equal(first[n], again[n]) for n in vectors)  # dict order does not matter
    other = dare_task_vectors(vectors, 0.5, seed=2)
    assert not torch.equal(first["a"], other["a"])


def test_low_precision_vectors_keep_their_dtype():
    vectors = {"w": torch.randn(3, 8, dtype=torch.bfloat16)}
    for method in ("average", "task_arithmetic", "ties", "dare"):
        assert build_static_merge(method).merge(vectors)["w"].dtype == torch.bfloat16


def test_registry_names_bad_methods_and_parameters():
    with pytest.raises(
        ValueError, match=r"unknown training-free method 'tie'.*average, task_arithmetic, ties, dare"
    ):
        build_static_merge("tie")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\].*1.5"):
        build_static_merge("ties", density=1.5)
    with pytest.raises(ValueError, match=r"drop_rate must be in \[0, 1\).*1.0"):
        build_static_merge("dare", drop_rate=1.0)
    with pytest.raises(
        ValueError,
        match=r"ties: unknown parameter\(s\) \['lambda'\]; it takes \['density', 'scale', 'scope'\]",
    ):
        build_static_merge("ties", **{"lambda": 1.0})


def test_ties_trims_over_the_whole_task_vector_by_default_as_published():
    # task 0: tensor "a" holds its 4 largest entries, "b" its 4 smallest; density 0.5 over all 8
    # keeps all of "a" and none of "b" (the TIES paper); per tensor keeps half of each (mergekit)
    vectors = {
        "a": torch.tensor([[4.0, -3.0, 2.5, 2.0], [1.0, 1.0, 1.0, 1.0]]),
        "b": torch.tensor([[0.1, -0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]]),
    }
    whole = trimmed(vectors, 0.5, "model")
    assert_close(whole["a"][0], vectors["a"][0])
    assert_close(whole["b"][0], torch.zeros(4))
    per_tensor = trimmed(vectors, 0.5, "tensor")
    assert_close(per_tensor["a"][0], torch.tensor([4.0, -3.0, 0.0, 0.0]))
    assert_close(per_tensor["b"][0], torch.tensor([0.0, 0.0, 0.3, 0.4]))
    assert (model_trim_thresholds(vectors, 0.5) == torch.tensor([2.0, 1.0], dtype=torch.float64)).all()
    default = build_static_merge("ties", density=0.5).merge(vectors)
    expected = ties(vectors, density=0.5, scope="model")
    assert all(torch.equal(default[n], expected[n]) for n in vectors)
    assert not torch.equal(default["b"], ties(vectors, density=0.5, scope="tensor")["b"])
    over_ties = ties_task_vectors(vectors, 0.5)  # AdaMerging++'s TIES vectors trim the same way
    assert_close(over_ties["b"][0], torch.zeros(4))
    with pytest.raises(ValueError, match="ties scope 'layer'"):
        build_static_merge("ties", scope="layer")


def test_model_threshold_keeps_the_density_share_of_each_task():
    vectors = {"a": torch.randn(3, 40, 7), "b": torch.randn(3, 13), "c": torch.randn(3, 5, 5)}
    for density in (0.05, 0.2, 0.5):
        kept = trimmed(vectors, density, "model")
        total = sum(v[0].numel() for v in vectors.values())
        for t in range(3):
            count = sum(int((kept[n][t] != 0).sum()) for n in vectors)
            assert count == max(1, int(total * density))


def test_model_threshold_is_exactly_the_kth_largest_magnitude():
    """The two-pass radix select gives the k-th value of all a task's magnitudes together, bit
    for bit, with repeated values, zeros, -0.0, tiny and huge magnitudes, in any dtype."""
    torch.manual_seed(0)
    vectors = {
        "a": torch.randn(3, 40, 7) * torch.logspace(-30, 30, 7),
        "b": torch.randint(-3, 4, (3, 50)).float() / 4,  # many equal magnitudes, and zeros
        "c": torch.tensor([[-0.0] * 5, [1e-40] * 5, [3.0] * 5]),  # -0.0 and a subnormal
    }
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        typed = {n: v.to(dtype) for n, v in vectors.items()}
        for density in (0.01, 0.2, 0.5, 0.9, 1.0):
            total = sum(v[0].numel() for v in typed.values())
            keep = max(1, int(total * density))
            want = torch.tensor(
                [
                    float(torch.cat([v[t].reshape(-1).abs().float() for v in typed.values()]).kthvalue(
                        total - keep + 1
                    ).values)
                    for t in range(3)
                ],
                dtype=torch.float64,
            )  # fmt: skip
            assert torch.equal(model_trim_thresholds(typed, density), want), (dtype, density)


def test_dare_then_ties_reads_the_dropped_vectors_lazily_and_as_before():
    torch.manual_seed(1)
    vectors = {"a": torch.randn(3, 30, 4), "b": torch.randn(3, 17)}
    stored = dare_task_vectors(vectors, 0.5, seed=3)  # dropped once, held
    want = ties(stored, density=0.3, scale=1.2)
    got = build_static_merge("dare", drop_rate=0.5, then="ties", density=0.3, scale=1.2, seed=3).merge(
        vectors
    )
    assert all(torch.equal(got[n], want[n]) for n in vectors)


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def test_tsv_parts_of_tasks_in_orthogonal_subspaces_are_their_truncated_svds():
    # each task's kept singular vectors lie in subspaces no other task keeps: the polar step has
    # nothing to change, so each part is its task's top-(1/tasks) truncation (4 of 6 here)
    g = torch.Generator().manual_seed(0)
    left, right = _orthonormal(20, 20, g), _orthonormal(12, 12, g)
    singular = torch.tensor([9.0, 7.0, 5.0, 3.0, 0.5, 0.25], dtype=torch.float64)
    matrices, truncated = [], []
    for t in range(3):
        u = left[:, 6 * t : 6 * t + 6]
        dropped = right[:, (4 * t + 4) % 12 : (4 * t + 4) % 12 + 2]  # another task's: orthogonal to its own
        v = torch.cat([right[:, 4 * t : 4 * t + 4], dropped], dim=1)
        matrices.append(u @ torch.diag(singular * (t + 1)) @ v.T)
        truncated.append(u[:, :4] @ torch.diag(singular[:4] * (t + 1)) @ v[:, :4].T)
    assert_close(decorrelate_matrix(torch.stack(matrices)), torch.stack(truncated), rtol=0, atol=1e-10)


def test_tsv_parts_do_not_interfere_and_drop_the_small_singular_values():
    g = torch.Generator().manual_seed(1)
    stacked = torch.randn(3, 30, 16, generator=g, dtype=torch.float64)
    parts = decorrelate_matrix(stacked)
    keep = 16 // 3
    for t in range(3):
        assert torch.linalg.matrix_rank(parts[t]) == keep
        # each part keeps its task's top singular values exactly (polar factors are orthonormal)
        top = torch.linalg.svdvals(stacked[t])[:keep]
        assert_close(torch.linalg.svdvals(parts[t])[:keep], top, rtol=1e-9, atol=1e-9)
        for other in range(t + 1, 3):  # mutually orthogonal row and column spaces
            assert parts[t].T.matmul(parts[other]).abs().max() < 1e-9
            assert parts[t].matmul(parts[other].T).abs().max() < 1e-9


def test_tsv_task_vectors_decorrelate_matrices_and_keep_vectors():
    g = torch.Generator().manual_seed(2)
    vectors = {"w": torch.randn(2, 8, 6, generator=g), "b": torch.randn(2, 8, generator=g)}
    out = tsv_task_vectors(vectors)
    assert torch.equal(out["b"], vectors["b"])
    assert_close(out["w"], decorrelate_matrix(vectors["w"]))
    assert not torch.allclose(out["w"], vectors["w"])
    merged = build_static_merge("tsv", scale=0.5).merge(vectors)  # TSV-Merge: parts summed, the rest averaged
    assert_close(merged["w"], 0.5 * out["w"].sum(dim=0))
    assert_close(merged["b"], 0.5 * vectors["b"].mean(dim=0))
