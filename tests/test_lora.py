"""LoRA adapters as experts: read with peft, kept as factors, merged without forming B @ A.

Every adapter is made by peft itself (get_peft_model + save_pretrained) on a tiny random base,
with B set random (LoRA starts B at zero, which would make every delta vanish); peft's own
merge_and_unload is the reference the factors must reproduce.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from torch.func import functional_call
from transformers import BertForSequenceClassification, LlamaForCausalLM

from divmerge_pl.lora import (
    LoraFactors,
    LowRankExperts,
    UnsupportedAdapterError,
    is_adapter_folder,
    low_rank_added,
    low_rank_delta,
    merged_linear,
    merged_weight,
    read_adapter,
    read_lora_experts,
    stack_factors,
)
from divmerge_pl.preflight import ExpertMismatchError

from .conftest import tiny_config
from .lm_setup import lm_config

HEADS = {"classifier.weight", "classifier.bias"}


def make_adapter(base: torch.nn.Module, folder, config, seed: int) -> None:
    """Save a peft adapter of ``config`` over a copy of ``base``, every LoRA/IA3 tensor random."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(folder)


def peft_merged(base: torch.nn.Module, folder) -> dict[str, torch.Tensor]:
    merged = PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    return {name: p.detach() for name, p in merged.named_parameters()}


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(num_labels=3)).eval()


def bert_lora(**settings) -> LoraConfig:
    return LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value", "dense"], **settings)


@pytest.mark.parametrize(
    "settings",
    [
        dict(r=4, lora_alpha=8),
        dict(r=4, lora_alpha=8, use_rslora=True),
        dict(r=4, lora_alpha=8, rank_pattern={"query": 2}, alpha_pattern={"value": 3}),
    ],
    ids=["plain", "rslora", "patterns"],
)
def test_factors_rebuild_peft_merge(bert, tmp_path, settings):
    make_adapter(bert, tmp_path / "ad", bert_lora(**settings), seed=1)
    adapter = read_adapter(tmp_path / "ad", "expert 'a'", bert, HEADS)
    reference = peft_merged(bert, tmp_path / "ad")
    base = dict(bert.named_parameters())
    # query, value, and every dense (attention output, intermediate, output, pooler) of 2 layers
    assert len(adapter.factors) == 2 * 5 + 1
    for name, f in adapter.factors.items():
        rebuilt = base[name] + low_rank_delta(f.down, f.up, f.scaling)
        assert not torch.allclose(rebuilt, base[name], atol=1e-3)  # a real delta
        torch.testing.assert_close(rebuilt, reference[name], atol=1e-6, rtol=0)
    if "rank_pattern" in settings:
        assert adapter.factors["bert.encoder.layer.0.attention.self.query.weight"].down.shape[0] == 2
    # modules_to_save: the classifier head, whole
    assert set(adapter.full) == HEADS
    for name, tensor in adapter.full.items():
        torch.testing.assert_close(tensor, reference[name], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_factors_rebuild_peft_merge(tmp_path, arch):
    torch.manual_seed(0)
    from transformers import GPT2LMHeadModel

    cls = LlamaForCausalLM if arch == "llama" else GPT2LMHeadModel
    base = cls(lm_config(arch, vocab_size=50)).eval()
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    config = LoraConfig(task_type="CAUSAL_LM", r=3, lora_alpha=6, target_modules=targets)
    make_adapter(base, tmp_path / "ad", config, seed=2)
    if arch == "gpt2":  # as older peft saved it: the layout must come from the layer (Conv1D), as in peft
        saved = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
        assert saved["fan_in_fan_out"] is True
        (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**saved, "fan_in_fan_out": False}))
    adapter = read_adapter(tmp_path / "ad", "expert 'lm'", base)
    reference = peft_merged(base, tmp_path / "ad")
    stacks = stack_factors([adapter.factors])
    params = dict(base.named_parameters())
    assert len(stacks) == 2 * len(targets) and not adapter.full
    for name, stack in stacks.items():
        assert stack.fan_in_fan_out == (arch == "gpt2")  # Conv1D stores d_in x d_out
        torch.testing.assert_close(
            merged_weight(params[name], stack, torch.ones(1)), reference[name], atol=1e-6, rtol=0
        )


def random_stack(d_in: int, d_out: int, ranks: list[int]):
    factors = [
        {"w": LoraFactors(torch.randn(r, d_in), torch.randn(d_out, r), 0.5 + t)} for t, r in enumerate(ranks)
    ]
    return factors, stack_factors(factors)["w"]


def test_merged_linear_equals_dense_computation():
    torch.manual_seed(3)
    d_in, d_out = 7, 5
    factors, stack = random_stack(d_in, d_out, ranks=[2, 3, 1])
    weight, bias = torch.randn(d_out, d_in), torch.randn(d_out)
    gamma = torch.tensor([0.3, -1.2, 0.7])
    x = torch.randn(4, 6, d_in)
    dense = weight + sum(
        g * low_rank_delta(f["w"].down, f["w"].up, f["w"].scaling)
        for g, f in zip(gamma, factors, strict=True)
    )
    torch.testing.assert_close(
        merged_linear(x, weight, bias, stack, gamma), x @ dense.T + bias, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(merged_weight(weight, stack, gamma), dense, atol=1e-6, rtol=0)
    # Conv1D layout (GPT-2): the weight is d_in x d_out, the low-rank term the same
    t_stack = stack_factors(
        [{k: LoraFactors(f.down, f.up, f.scaling, True) for k, f in fs.items()} for fs in factors]
    )
    torch.testing.assert_close(
        merged_linear(x, weight.T, bias, t_stack["w"], gamma), x @ dense.T + bias, atol=1e-5, rtol=0
    )
    torch.testing.assert_close(merged_weight(weight.T, t_stack["w"], gamma), dense.T, atol=1e-6, rtol=0)


def test_task_without_factors_adds_no_rank():
    torch.manual_seed(4)
    a = LoraFactors(torch.randn(2, 6), torch.randn(4, 2), 2.0)
    stack = stack_factors([{"w": a}, {}, {"w": a}])["w"]
    assert stack.down.shape == (4, 6) and stack.task_of_rank.tolist() == [0, 0, 2, 2]
    weight = torch.zeros(4, 6)
    only_middle = merged_weight(weight, stack, torch.tensor([0.0, 5.0, 0.0]))
    assert torch.count_nonzero(only_middle) == 0  # task 1 (a full expert here) has no low-rank part


@pytest.fixture(scope="module")
def two_bert_adapters(bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("bert_adapters")
    make_adapter(bert, root / "a", bert_lora(r=4, lora_alpha=8), seed=5)
    make_adapter(
        bert, root / "b", LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=2, target_modules=["query"]), 6
    )
    return [read_adapter(root / n, f"expert {n!r}", bert, HEADS) for n in ("a", "b")], root


def test_low_rank_hooks_give_the_experts_and_the_dense_merge(bert, two_bert_adapters):
    adapters, root = two_bert_adapters
    stacks = stack_factors([a.factors for a in adapters])
    inputs = {"input_ids": torch.randint(5, 30, (3, 8)), "attention_mask": torch.ones(3, 8, dtype=torch.long)}
    # gamma one-hot: each expert's own forward equals peft's model of that adapter
    for t, name in enumerate(("a", "b")):
        expert = PeftModel.from_pretrained(copy.deepcopy(bert), root / name).eval()
        onehot = torch.nn.functional.one_hot(torch.tensor(t), 2).float()
        with torch.no_grad(), low_rank_added(bert, stacks, lambda _n, g=onehot: g):
            ours = functional_call(bert, adapters[t].full, args=(), kwargs=inputs, strict=False).logits
        torch.testing.assert_close(ours, expert(**inputs).logits, atol=1e-5, rtol=0)
    # any gamma: the hooked forward equals the base with the dense merged weights, gradients too
    params = dict(bert.named_parameters())
    gamma = torch.tensor([0.6, -0.4], requires_grad=True)
    with low_rank_added(bert, stacks, lambda _n: gamma):
        hooked = bert(**inputs).logits
    (grad_hooked,) = torch.autograd.grad(hooked.square().sum(), gamma)
    dense = {n: merged_weight(params[n], s, gamma) for n, s in stacks.items()}
    plain = functional_call(bert, dense, args=(), kwargs=inputs, strict=False).logits
    (grad_dense,) = torch.autograd.grad(plain.square().sum(), gamma)
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(grad_hooked, grad_dense, atol=1e-4, rtol=1e-4)
    assert bert(**inputs).logits.shape == (3, 3) and not bert._forward_hooks  # hooks removed


def test_no_dense_task_vector_is_stored(bert, two_bert_adapters):
    adapters, _ = two_bert_adapters
    held = LowRankExperts(stack_factors([a.factors for a in adapters]), torch.bfloat16)
    params = dict(bert.named_parameters())
    buffers = dict(held.named_buffers())
    assert not any(b.dim() == 2 and b.shape == params[n].shape for n in held.names for b in buffers.values())
    expected = sum(f.down.numel() + f.up.numel() for a in adapters for f in a.factors.values())
    assert sum(b.numel() for n, b in buffers.items() if n.startswith(("down_", "up_"))) == expected
    assert all(b.dtype == torch.bfloat16 for n, b in buffers.items() if n.startswith(("down_", "up_")))
    assert held.state_dict() == {}  # never checkpointed
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert held.stacks()[query].down.shape == (4 + 2, 32)


def test_adapter_folder_detected(bert, two_bert_adapters, tmp_path):
    _, root = two_bert_adapters
    bert.save_pretrained(tmp_path / "base")
    assert is_adapter_folder(root / "a") and not is_adapter_folder(tmp_path / "base")


def test_adapter_of_another_base_is_refused(bert, two_bert_adapters):
    _, root = two_bert_adapters
    wider = BertForSequenceClassification(tiny_config(num_labels=3, hidden_size=48))
    with pytest.raises(
        ExpertMismatchError,
        match=r"expert 'a': LoRA target 'bert\.encoder\.layer\.0\..*\.weight'.*\(48, 48\)",
    ):
        read_adapter(root / "a", "expert 'a'", wider, HEADS)
    llama = LlamaForCausalLM(lm_config("llama", vocab_size=50))
    with pytest.raises(ExpertMismatchError, match="expert 'a'.*not a tensor of model.base"):
        read_adapter(root / "a", "expert 'a'", llama)


def test_other_peft_types_and_lora_variants_are_refused(bert, tmp_path):
    ia3 = IA3Config(task_type="SEQ_CLS", target_modules=["query", "intermediate.dense"],
                    feedforward_modules=["intermediate.dense"])  # fmt: skip
    make_adapter(bert, tmp_path / "ia3", ia3, seed=7)
    with pytest.raises(UnsupportedAdapterError, match=r"expert 'x'.*ia3.*is a IA3 adapter; only LoRA"):
        read_adapter(tmp_path / "ia3", "expert 'x'", bert, HEADS)
    for setting, pattern in [
        (dict(use_dora=True), "use_dora=True"),
        (dict(bias="lora_only"), "bias='lora_only'"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    ]:
        folder = tmp_path / pattern.split("=")[0]
        make_adapter(bert, folder, bert_lora(r=2, **setting), seed=8)
        with pytest.raises(UnsupportedAdapterError, match=f"expert 'x'.*{folder.name}.*{pattern}"):
            read_adapter(folder, "expert 'x'", bert, HEADS)


def test_pickled_adapter_needs_allow_pickle(bert, tmp_path):
    torch.manual_seed(9)
    peft_model = get_peft_model(copy.deepcopy(bert), bert_lora(r=2))
    peft_model.save_pretrained(tmp_path / "ad", safe_serialization=False)
    with pytest.raises(ExpertMismatchError, match="adapter_model.bin.*allow_pickle"):
        read_adapter(tmp_path / "ad", "expert 'p'", bert, HEADS)
    assert read_adapter(tmp_path / "ad", "expert 'p'", bert, HEADS, allow_pickle=True).factors


def test_lora_experts_stack_heads_configs_fingerprints(bert, two_bert_adapters, tmp_path):
    _, root = two_bert_adapters
    # a third adapter with a 5-label head, over the same backbone
    torch.manual_seed(10)
    five = BertForSequenceClassification(tiny_config(num_labels=5)).eval()
    five.load_state_dict({k: v for k, v in bert.state_dict().items() if "classifier" not in k}, strict=False)
    make_adapter(five, tmp_path / "five", bert_lora(r=2), seed=11)
    folders = {"a": root / "a", "b": root / "b", "five": tmp_path / "five"}
    tasks = ["a", "dense", "b", "five"]  # "dense": a full expert, no adapter
    experts = read_lora_experts(bert, "sequence_classification", tasks, folders, HEADS)
    query = experts.stacks["bert.encoder.layer.0.attention.self.query.weight"]
    assert query.task_of_rank.tolist() == [0] * 4 + [2] * 2 + [3] * 2
    value = experts.stacks["bert.encoder.layer.0.attention.self.value.weight"]
    assert value.task_of_rank.tolist() == [0] * 4 + [3] * 2  # b targets query only
    assert set(experts.heads) == {"a", "b", "five"} and experts.full == {"a": {}, "b": {}, "five": {}}
    assert experts.heads["five"]["classifier.weight"].shape == (5, 32)
    assert {t: c.num_labels for t, c in experts.configs.items()} == {"a": 3, "b": 3, "five": 5}
    assert bert.config.num_labels == 3  # the base's own config is left alone
    assert len(set(experts.fingerprints.values())) == 3
    # the same adapter, another B: another fingerprint
    make_adapter(bert, tmp_path / "a2", bert_lora(r=4, lora_alpha=8), seed=12)
    again = read_lora_experts(bert, "sequence_classification", ["a"], {"a": tmp_path / "a2"}, HEADS)
    assert again.fingerprints["a"] != experts.fingerprints["a"]
    same = read_lora_experts(bert, "sequence_classification", ["a"], {"a": root / "a"}, HEADS)
    assert same.fingerprints["a"] == experts.fingerprints["a"]


def test_lora_experts_refuse_another_kind_and_a_missing_head(bert, tmp_path):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(lm_config("llama", vocab_size=50)).eval()
    make_adapter(
        llama, tmp_path / "lm", LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"]), 13
    )
    with pytest.raises(ExpertMismatchError, match="expert 'lm'.*causal_lm LoRA but the merge is sequence_cl"):
        read_lora_experts(llama, "sequence_classification", ["lm"], {"lm": tmp_path / "lm"}, set())
    assert read_lora_experts(llama, "causal_lm", ["lm"], {"lm": tmp_path / "lm"}, set()).heads == {"lm": {}}
    make_adapter(bert, tmp_path / "headless", LoraConfig(r=2, target_modules=["query"]), 14)
    with pytest.raises(ExpertMismatchError, match="expert 'h'.*does not save head tensor 'classifier.bias'"):
        read_lora_experts(bert, "sequence_classification", ["h"], {"h": tmp_path / "headless"}, HEADS)
