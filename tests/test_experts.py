import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
)

from divmerge_pl.experts import ExpertMismatchError, load_experts

from .conftest import make_expert, tiny_config


def test_task_vectors_are_expert_minus_base_stacked_per_tensor(tiny):
    loaded = load_experts(str(tiny.base), {t: str(p) for t, p in tiny.experts.items()})
    base = BertModel.from_pretrained(tiny.base).state_dict()
    assert loaded.tasks == ("alpha", "beta")
    # word embeddings are equal in base and every expert: no task vector is kept for them
    assert "bert.embeddings.word_embeddings.weight" not in loaded.task_vectors
    assert "bert.encoder.layer.1.output.dense.weight" in loaded.task_vectors
    for t, task in enumerate(loaded.tasks):
        expert = BertForSequenceClassification.from_pretrained(tiny.experts[task]).state_dict()
        for name, stacked in loaded.task_vectors.items():
            assert stacked.shape[0] == 2
            tau = expert[name] - base[name.removeprefix("bert.")]
            assert torch.allclose(stacked[t], tau, atol=1e-7)
        assert torch.equal(loaded.heads[task]["classifier.weight"], expert["classifier.weight"])
    assert loaded.heads["beta"]["classifier.weight"].shape[0] == 3
    assert len(set(loaded.fingerprints.values())) == 3
    assert not any(p.requires_grad for p in loaded.base_model.parameters())


def test_expert_with_other_shape_names_expert_and_tensor(tiny):
    odd = tiny.root / "odd"
    BertForSequenceClassification(tiny_config(2, intermediate_size=40)).save_pretrained(odd)
    with pytest.raises(ExpertMismatchError, match=r"expert 'odd'.*intermediate\.dense\.(weight|bias).*shape"):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "odd": str(odd)})


def test_expert_missing_a_tensor_names_it(tiny):
    holed = tiny.root / "holed"
    make_expert(tiny.base, holed, 2, seed=6)
    state = load_file(holed / "model.safetensors")
    del state["bert.encoder.layer.1.attention.self.key.bias"]
    save_file(state, holed / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExpertMismatchError, match=r"'holed'.*layer\.1\.attention\.self\.key\.bias"):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "holed": str(holed)})


def test_expert_of_another_architecture_is_refused(tiny):
    other = tiny.root / "distil"
    config = DistilBertConfig(vocab_size=39, dim=32, n_layers=1, n_heads=2, hidden_dim=48)
    DistilBertForSequenceClassification(config).save_pretrained(other)
    with pytest.raises(ExpertMismatchError, match=r"expert 'other' is a distilbert.*'alpha' is a bert"):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "other": str(other)})


def test_paths_that_are_not_model_folders_are_named(tiny, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"expert 'gone'.*does not exist"):
        load_experts(str(tiny.base), {"gone": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model.base.*no config.json"):
        load_experts(str(tmp_path / "empty"), {"alpha": str(tiny.experts["alpha"])})


def test_experts_in_one_dtype_load_silently_and_mixed_dtypes_warn(tiny):
    experts = {t: str(p) for t, p in tiny.experts.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_experts(str(tiny.base), experts)
    half = tiny.root / "half"
    model = BertForSequenceClassification.from_pretrained(tiny.experts["alpha"], dtype=torch.bfloat16)
    model.save_pretrained(half)
    with pytest.warns(UserWarning, match=r"different dtypes.*'half': 'bfloat16'.*upcast to float32"):
        loaded = load_experts(str(tiny.base), {"beta": experts["beta"], "half": str(half)})
    assert all(v.dtype == torch.float32 for v in loaded.task_vectors.values())


def test_expert_with_an_extra_tensor_names_it(tiny):
    extra = tiny.root / "extra"
    make_expert(tiny.base, extra, 2, seed=7)
    state = load_file(extra / "model.safetensors")
    state["bert.encoder.layer.9.output.dense.weight"] = torch.zeros(2, 2)
    save_file(state, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExpertMismatchError, match=r"'extra'.*layer\.9\.output\.dense\.weight.*not part of"):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "extra": str(extra)})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_expert_with_nan_or_inf_weights_names_the_tensor(tiny, bad):
    broken = tiny.root / "broken"
    make_expert(tiny.base, broken, 2, seed=8)
    state = load_file(broken / "model.safetensors")
    state["bert.encoder.layer.0.attention.output.dense.weight"][1, 2] = bad
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ExpertMismatchError, match=r"'broken'.*layer\.0\.attention\.output\.dense\.weight.*1 NaN/inf"
    ):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "broken": str(broken)})


def test_expert_with_another_vocabulary_is_refused(tiny):
    # another vocabulary size: the word embeddings' shapes differ
    bigger = tiny.root / "bigger"
    BertForSequenceClassification(tiny_config(2, vocab_size=60)).save_pretrained(bigger)
    with pytest.raises(ExpertMismatchError, match=r"'bigger'.*word_embeddings\.weight.*shape \(60, 32\)"):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "bigger": str(bigger)})
    # same size, other tokens: only the tokenizer tells
    renamed = tiny.root / "renamed"
    make_expert(tiny.base, renamed, 2, seed=9)
    vocab = renamed / "vocab.txt"
    vocab.write_text(vocab.read_text().replace("\ngood\n", "\nnice\n"))
    (renamed / "tokenizer.json").unlink()
    with pytest.raises(
        ExpertMismatchError, match=r"'renamed'.*tokenizer's vocabulary differs.*'(good|nice)'"
    ):
        load_experts(str(tiny.base), {"alpha": str(tiny.experts["alpha"]), "renamed": str(renamed)})


def _same_loads(first, second) -> None:
    assert list(first.task_vectors) == list(second.task_vectors)
    for name, stacked in first.task_vectors.items():
        assert torch.equal(stacked, second.task_vectors[name])
    assert first.fingerprints == second.fingerprints
    for task, head in first.heads.items():
        assert all(torch.equal(t, second.heads[task][n]) for n, t in head.items())


def test_experts_are_read_tensor_by_tensor_from_one_file_or_shards(tiny, monkeypatch, tmp_path):
    import divmerge_pl.experts as experts_code

    experts = {t: str(p) for t, p in tiny.experts.items()}
    whole = load_experts(str(tiny.base), experts)  # reference, before whole loads are forbidden
    monkeypatch.setattr(experts_code, "_load_expert_whole", lambda *a: pytest.fail("expert built whole"))
    _same_loads(load_experts(str(tiny.base), experts), whole)
    sharded = tmp_path / "sharded"  # several safetensors files and their index
    BertForSequenceClassification.from_pretrained(tiny.experts["beta"]).save_pretrained(
        sharded, max_shard_size="20KB"
    )
    assert (sharded / "model.safetensors.index.json").is_file()
    _same_loads(load_experts(str(tiny.base), {**experts, "beta": str(sharded)}), whole)


def test_bf16_stacks_are_built_in_bf16_and_equal_the_rounded_float32_vectors(tiny):
    experts = {t: str(p) for t, p in tiny.experts.items()}
    full = load_experts(str(tiny.base), experts)
    half = load_experts(str(tiny.base), experts, torch.bfloat16)
    for name, stacked in half.task_vectors.items():
        assert stacked.dtype == torch.bfloat16
        assert torch.equal(stacked, full.task_vectors[name].to(torch.bfloat16))


def test_an_expert_in_another_file_layout_is_loaded_whole_and_checked(tiny, monkeypatch):
    import divmerge_pl.experts as experts_code

    calls = []
    real = experts_code._load_expert_whole
    monkeypatch.setattr(
        experts_code, "_load_expert_whole", lambda *a, **k: calls.append(a[2]) or real(*a, **k)
    )
    weights = load_file(tiny.experts["beta"] / "model.safetensors")
    # an old checkpoint naming: files saved under another prefix still load by from_pretrained
    save_file({f"old.{k}": v for k, v in weights.items()}, tiny.experts["beta"] / "model.safetensors")
    with pytest.raises(ExpertMismatchError, match="expert 'beta'"):
        load_experts(str(tiny.base), {t: str(p) for t, p in tiny.experts.items()})
    assert calls == ["beta"]
