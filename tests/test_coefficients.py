import pytest
import torch

from divmerge_pl.coefficients import build_layout, initial_coefficients

NAMES = [
    "bert.embeddings.LayerNorm.weight",
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.output.dense.bias",
    "bert.encoder.layer.1.attention.self.query.weight",
    "bert.encoder.layer.10.output.dense.bias",
    "model.layers.2.mlp.up_proj.weight",
    "transformer.h.3.attn.c_attn.weight",
    "vision.patch.0.weight",
    "bert.pooler.dense.weight",
]


def test_task_granularity_is_one_group():
    layout = build_layout(NAMES, "task")
    assert layout.groups == ("all",)
    assert set(layout.group_of.values()) == {0}


def test_layer_granularity_is_one_group_per_tensor():
    layout = build_layout(NAMES, "layer")
    assert layout.groups == tuple(NAMES)
    assert [layout.group_of[n] for n in NAMES] == list(range(len(NAMES)))


def test_block_granularity_groups_by_block_index():
    layout = build_layout(NAMES, "block")
    assert layout.groups == ("other", "layer.0", "layer.1", "layer.10", "layers.2", "h.3")
    group = {n: layout.groups[layout.group_of[n]] for n in NAMES}
    assert group["bert.encoder.layer.0.output.dense.bias"] == "layer.0"
    assert group["bert.encoder.layer.10.output.dense.bias"] == "layer.10"
    assert group["vision.patch.0.weight"] == "other"  # "h.0" inside "patch.0" is no block
    assert group["bert.pooler.dense.weight"] == "other"


def test_block_granularity_with_custom_regex():
    layout = build_layout(NAMES, "block", block_pattern=r"(embeddings|pooler)")
    assert layout.groups == ("embeddings", "other", "pooler")


def test_bad_regex_and_granularity_are_named():
    with pytest.raises(ValueError, match="block_pattern"):
        build_layout(NAMES, "block", block_pattern="(")
    with pytest.raises(ValueError, match="task, layer, block, channel"):
        build_layout(NAMES, "tensor")
    with pytest.raises(ValueError, match="number of rows"):
        build_layout(NAMES, "channel", rows={NAMES[0]: 3})


def test_channel_granularity_gives_each_row_of_each_tensor_its_own_column():
    rows = {name: 2 + i for i, name in enumerate(NAMES)}
    layout = build_layout(NAMES, "channel", rows=rows)
    assert layout.groups == tuple(NAMES) and layout.width == sum(rows.values())
    columns = [list(range(layout.width))[layout.group_of[n]] for n in NAMES]
    assert [len(c) for c in columns] == [rows[n] for n in NAMES]  # each tensor's rows
    assert sum(columns, []) == list(range(layout.width))  # in order, none shared, none left out
    gamma = torch.arange(2.0 * layout.width).reshape(2, -1)
    means = layout.group_means(gamma)
    assert means.shape == (2, len(NAMES))
    assert torch.equal(means[:, 1], gamma[:, columns[1]].mean(1))
    layer = build_layout(NAMES, "layer")
    assert layer.width == len(NAMES) and torch.equal(layer.group_means(gamma[:, :9]), gamma[:, :9])


def test_initial_coefficients_default_to_one_over_n():
    assert torch.equal(initial_coefficients(4, 3, None), torch.full((4, 3), 0.25))
    assert torch.equal(initial_coefficients(2, 1, None), torch.full((2, 1), 0.5))
    assert torch.equal(initial_coefficients(3, 2, 0.3), torch.full((3, 2), 0.3))
