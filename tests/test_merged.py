import torch

from divmerge_pl.coefficients import build_layout
from divmerge_pl.merged import (
    expert_tensors,
    forward_logits,
    head_module_name,
    logits_per_task,
    merge_tensors,
)

from .conftest import per_task_logits


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


def test_backbone_once_then_heads_equals_a_forward_per_task(tiny):

    from .test_fit import fit_module

    module, trainer = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0)
    batch = next(iter(trainer.datamodule.train_dataloader()))
    gamma = torch.tensor([[0.3], [0.9]]).expand_as(module.coefficients).clone().requires_grad_()
    module.coefficients.data = gamma.detach()
    merged = module.merged_tensors()
    groups = list(module.task_rows(batch))
    assert len(groups) == 2
    fast = module.kind.batch_logits(merged, batch)
    for (t, rows), (t2, _, logits) in zip(groups, fast, strict=True):
        assert t == t2 and logits.shape == (len(rows), (2, 3)[t])
        torch.testing.assert_close(
            logits, per_task_logits(module, t, merged, batch, rows), atol=1e-5, rtol=1e-5
        )
    assert head_module_name(list(module.frozen.head(0))) == "classifier"


def test_head_over_several_modules_takes_a_forward_per_task(tmp_path):
    """DistilBERT's head is pre_classifier + classifier: each task's rows get their own forward."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel

    from divmerge_pl.experts import load_experts

    config = DistilBertConfig(vocab_size=39, dim=32, n_layers=1, n_heads=2, hidden_dim=48)
    DistilBertModel(config).save_pretrained(tmp_path / "base")
    experts = {}
    for t, labels in enumerate((2, 3)):
        torch.manual_seed(t)
        model = DistilBertForSequenceClassification(DistilBertConfig(**config.to_dict(), num_labels=labels))
        model.save_pretrained(tmp_path / f"e{t}")
        experts[f"e{t}"] = str(tmp_path / f"e{t}")
    loaded = load_experts(str(tmp_path / "base"), experts)
    heads = list(loaded.heads.values())
    assert head_module_name(list(heads[0])) is None
    base_model = loaded.base_model.eval()
    base = {n: p for n, p in base_model.named_parameters() if n in loaded.task_vectors}
    inputs = {"input_ids": torch.randint(5, 39, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.long)}
    rows = [
        (0, torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)),
        (1, torch.tensor([0, 1, 0, 1, 1, 0], dtype=torch.bool)),
    ]
    out = logits_per_task(base_model, base, heads, inputs, rows)
    for (t, mask), logits in zip(rows, out, strict=True):
        expected = forward_logits(base_model, {**base, **heads[t]}, {k: v[mask] for k, v in inputs.items()})
        torch.testing.assert_close(logits, expected)
        assert logits.shape == (3, (2, 3)[t])


def test_low_precision_vectors_give_the_gradient_of_their_float32_upcast():
    torch.manual_seed(0)
    stacked = torch.randn(3, 5, 4).to(torch.bfloat16)
    gamma = torch.randn(3, dtype=torch.float64, requires_grad=True)
    layout = build_layout(["w"], "task")
    base = {"w": torch.zeros(5, 4, dtype=torch.float64)}
    merged = merge_tensors(base, {"w": stacked}, gamma.unsqueeze(1), layout)["w"]
    torch.testing.assert_close(merged, torch.tensordot(gamma, stacked.double(), dims=1))
    assert torch.autograd.gradcheck(
        lambda g: merge_tensors(base, {"w": stacked}, g.unsqueeze(1), layout)["w"], (gamma,)
    )


def test_channel_merge_weights_each_row_of_each_task_vector_by_its_own_coefficient():
    base, taus = tensors(3)
    layout = build_layout(list(base), "channel", rows={n: t.shape[0] for n, t in base.items()})
    gamma = torch.randn(3, layout.width, generator=torch.Generator().manual_seed(4), requires_grad=True)
    merged = merge_tensors(base, taus, gamma, layout)
    for name, value in merged.items():
        own = gamma[:, layout.group_of[name]]  # [tasks x rows]
        for r in range(value.shape[0]):
            expected = base[name][r] + sum(own[t, r] * taus[name][t][r] for t in range(3))
            torch.testing.assert_close(value[r], expected, atol=1e-6, rtol=0)
    # a row's gradient is the inner product of the output's gradient with that row of its vector
    weights = {n: torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) for n, t in base.items()}
    sum((merged[n] * weights[n]).sum() for n in base).backward()
    for name in base:
        columns = layout.group_of[name]
        expected = (taus[name] * weights[name]).reshape(3, base[name].shape[0], -1).sum(-1)
        torch.testing.assert_close(gamma.grad[:, columns], expected, atol=1e-5, rtol=0)
    # equal rows are the layer layout's merge
    layer = build_layout(list(base), "layer")
    per_tensor = torch.tensor([[0.2, -0.5], [0.9, 0.3], [0.0, 1.1]])
    rows = torch.cat([per_tensor[:, [g]].expand(-1, base[n].shape[0]) for g, n in enumerate(base)], 1)
    for name, value in merge_tensors(base, taus, rows, layout).items():
        torch.testing.assert_close(
            value, merge_tensors(base, taus, per_tensor, layer)[name], atol=1e-6, rtol=0
        )


def test_low_precision_vectors_with_a_coefficient_per_row_give_their_float32_upcasts_gradient():
    torch.manual_seed(1)
    stacked = torch.randn(3, 5, 4).to(torch.bfloat16)
    layout = build_layout(["w"], "channel", rows={"w": 5})
    gamma = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    base = {"w": torch.zeros(5, 4, dtype=torch.float64)}
    merged = merge_tensors(base, {"w": stacked}, gamma, layout)["w"]
    torch.testing.assert_close(merged, (gamma[:, :, None] * stacked.double()).sum(0))
    assert torch.autograd.gradcheck(lambda g: merge_tensors(base, {"w": stacked}, g, layout)["w"], (gamma,))
