"""LoRA adapters as experts: read with peft, kept as factors, merged without forming B @ A.

Every adapter is made by peft itself (get_peft_model + save_pretrained) on a tiny random base,
with B set random (LoRA starts B at zero, which would make every delta vanish); peft's own
merge_and_unload is the reference the factors must reproduce.
"""

from __future__ import annotations

import copy
import json
import logging
import math

import lightning as L
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    LlamaForCausalLM,
)

from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl.data import MODEL_INPUTS
from divmerge_pl.experts import load_experts
from divmerge_pl.lora import UnsupportedAdapterError, is_adapter_folder, read_adapter, read_lora_experts
from divmerge_pl.low_rank import (
    LoraFactors,
    LowRankExperts,
    low_rank_added,
    low_rank_delta,
    merged_linear,
    merged_weight,
    stack_factors,
)
from divmerge_pl.methods import get_method
from divmerge_pl.preflight import ExpertMismatchError

from .conftest import TinySetup, make_base, make_expert, save_tokenizer, tiny_config, write_rows
from .lm_setup import TinyLM, lm_config, make_lm, write_prompt_rows

HEADS = {"classifier.weight", "classifier.bias"}


def make_adapter(base: torch.nn.Module, folder, config, seed: int, step: float | None = None) -> None:
    """Save a peft adapter of ``config`` over a copy of ``base``, every LoRA/IA3 tensor random
    (rounded to multiples of ``step`` when given)."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_" in name or "modules_to_save" in name:
                param.normal_(0.0, 0.2)
                if step is not None:
                    param.copy_((param / step).round() * step)
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

    # the channel layout: one coefficient per task per row of the weight as stored (a Linear's
    # output, a Conv1D's input), still through rank R
    deltas = [low_rank_delta(f["w"].down, f["w"].up, f["w"].scaling) for f in factors]
    rows = torch.randn(3, d_out)
    dense = weight + sum(g[:, None] * delta for g, delta in zip(rows, deltas, strict=True))
    torch.testing.assert_close(merged_weight(weight, stack, rows), dense, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        merged_linear(x, weight, bias, stack, rows), x @ dense.T + bias, atol=1e-5, rtol=0
    )
    rows = torch.randn(3, d_in)  # Conv1D: rows of the d_in x d_out weight
    dense_t = weight.T + sum(g[:, None] * delta.T for g, delta in zip(rows, deltas, strict=True))
    torch.testing.assert_close(merged_weight(weight.T, t_stack["w"], rows), dense_t, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        merged_linear(x, weight.T, bias, t_stack["w"], rows), x @ dense_t + bias, atol=1e-5, rtol=0
    )


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


# ---------------------------------------------------------------- end to end: a fit with LoRA experts
def lora_reference(folder) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Base weight name -> (A, B, scaling), read straight from peft (no code of ours)."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    config, state = PeftConfig.from_pretrained(str(folder)), load_peft_weights(str(folder), device="cpu")
    out = {}
    for key, down in state.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            up = state[key.replace(".lora_A.", ".lora_B.")]
            out[f"{module}.weight"] = (down, up, config.lora_alpha / config.r)
    return out


def fit(model_args: dict, specs: list[dict], tokenizer, max_steps: int):
    module = DivMergeModule(**{"lr": 0.05, **model_args})
    data = MergeDataModule(
        [TaskSpec(**s) for s in specs], tokenizer=str(tokenizer), batch_size=8, max_length=16
    )
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module, data


@pytest.fixture(scope="module")
def bert_setup(tmp_path_factory) -> TinySetup:
    """A full expert (alpha, 2 labels) and two LoRA experts (beta: r 4 on query and value, 3
    labels; gamma: r 2 on query only, 2 labels) of one BertModel base."""
    root = tmp_path_factory.mktemp("bert_lora")
    base = root / "base"
    make_base(base)
    labels = {"alpha": 2, "beta": 3, "gamma": 2}
    experts = {t: root / "experts" / t for t in labels}
    make_expert(base, experts["alpha"], 2, seed=100)
    for task, targets, seed in (("beta", ["query", "value"], 101), ("gamma", ["query"], 102)):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(tiny_config(labels[task])).eval()
        model.bert.load_state_dict(BertModel.from_pretrained(base).state_dict())
        r = 4 if task == "beta" else 2
        make_adapter(
            model,
            experts[task],
            LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=8, target_modules=targets),
            seed,
        )
    train, evals = {}, {}
    for i, (task, k) in enumerate(labels.items()):
        (root / "data" / task).mkdir(parents=True)
        train[task] = write_rows(root / "data" / task / "train.jsonl", 24, k, seed=10 + i)
        evals[task] = write_rows(root / "data" / task / "eval.jsonl", 12, k, seed=20 + i)
    return TinySetup(root, base, experts, train, evals, labels)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_fit_with_lora_experts_merges_their_factors(bert_setup, granularity):
    setup = bert_setup
    args = setup.model_args(teacher_cache=None, granularity=granularity)
    module, data = fit(args, setup.task_specs(), setup.base, max_steps=3)
    frozen, tasks = module.frozen, list(module.tasks)
    base = dict(frozen.base_model.named_parameters())
    targets = [
        f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")
    ]
    assert sorted(frozen.low_rank.names) == sorted(targets)
    # no dense d_out x d_in vector for a LoRA target: only the full expert's stack holds them
    for name in targets:
        assert frozen.task_vectors()[name][1:].abs().sum() == 0  # LoRA tasks' rows of the dense stack
    assert all(b.shape not in (base[n].shape for n in targets) for b in frozen.low_rank.buffers())
    query = frozen.low_rank.stacks()[targets[0]]
    assert query.down.shape == (4 + 2, 32) and query.task_of_rank.tolist() == [1] * 4 + [2] * 2

    # teachers: each LoRA expert's outputs are peft's model of that adapter
    for task in ("beta", "gamma"):
        t, dm_id = tasks.index(task), data.task_names.index(task)
        expert = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(setup.base, num_labels=setup.labels[task]),
            setup.experts[task],
        ).eval()
        rows = data.train_rows.select([i for i, r in enumerate(data.train_rows["task_id"]) if r == dm_id])
        for batch in data.ordered_dataloader(rows):
            with torch.no_grad():
                want = torch.log_softmax(
                    expert(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits, -1
                )
            got = module.teachers.logprobs[batch["row_id"], : setup.labels[task]]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    gamma = module.merge_coefficients().detach()
    assert not torch.allclose(gamma, torch.full_like(gamma, 1 / 3))  # it learned
    group = module.layout.group_of
    factors = {task: lora_reference(setup.experts[task]) for task in ("beta", "gamma")}
    exported = dict(module.merged_models())
    batch = next(iter(data.ordered_dataloader(data.train_rows)))
    with torch.no_grad(), module.low_rank():
        in_training = {
            t: (rows, logits) for t, rows, logits in module.kind.batch_logits(module.merged_tensors(), batch)
        }
    for t, task in enumerate(tasks):
        params = dict(exported[task].named_parameters())
        for name in targets:  # W0 + Gamma_alpha tau_alpha + sum over LoRA tasks Gamma s B A
            g = gamma[:, group[name]]  # [tasks], or [tasks, rows] for the channel layout
            g = g[:, :, None] if g.dim() == 2 else g
            if granularity == "channel":
                assert g.shape == (3, base[name].shape[0], 1) and g[1].std() > 0  # rows learn apart
            want = base[name] + g[0] * frozen.task_vectors()[name][0]
            for s, other in enumerate(("beta", "gamma"), start=1):
                if name in factors[other]:
                    down, up, scaling = factors[other][name]
                    want = want + g[s] * scaling * (up @ down)
            torch.testing.assert_close(params[name], want, atol=1e-6, rtol=0)
        if task != "alpha":  # its head is the adapter's modules_to_save classifier
            torch.testing.assert_close(params["classifier.weight"], frozen.head(t)["classifier.weight"])
            assert exported[task].config.num_labels == setup.labels[task]
        # the merged forward of training (low-rank hooks) is the exported dense model's
        if t in in_training:
            rows, logits = in_training[t]
            with torch.no_grad():
                dense = exported[task](**{k: batch[k][rows] for k in MODEL_INPUTS if k in batch}).logits
            torch.testing.assert_close(logits, dense, atol=1e-5, rtol=0)
    report = module.evaluate()  # scoring runs the merged forward too
    assert set(report["tasks"]) == set(tasks)


@pytest.fixture(scope="module")
def twin_setups(tmp_path_factory) -> tuple[TinySetup, TinySetup]:
    """The same three experts twice: alpha a full fine-tune; beta and gamma LoRA adapters, and
    the same as full models (W0 + s B A, peft's merge_and_unload). Base weights and factors are
    multiples of powers of two, so (W0 + s B A) - W0 is s B A exactly in float32: both give the
    same task vectors bit for bit, and TIES's trim and sign are decided the same way in both."""
    root = tmp_path_factory.mktemp("twins")
    base = root / "base"
    torch.manual_seed(0)
    backbone = BertModel(tiny_config())
    with torch.no_grad():
        for param in backbone.parameters():
            param.copy_((param * 4096).round() / 4096)
    backbone.save_pretrained(base)
    save_tokenizer(base)
    labels = {"alpha": 2, "beta": 3, "gamma": 2}
    lora = {t: root / "lora" / t for t in labels}
    full = {"alpha": lora["alpha"], "beta": root / "full" / "beta", "gamma": root / "full" / "gamma"}
    make_expert(base, lora["alpha"], 2, seed=100)
    for task, targets, r, seed in (("beta", ["query", "value"], 4, 101), ("gamma", ["query"], 2, 102)):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(tiny_config(labels[task])).eval()
        model.bert.load_state_dict(backbone.state_dict())
        config = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=8, target_modules=targets)
        make_adapter(model, lora[task], config, seed, step=1 / 64)
        PeftModel.from_pretrained(model, lora[task]).merge_and_unload().save_pretrained(full[task])
        save_tokenizer(full[task])
    train, evals = {}, {}
    for i, (task, k) in enumerate(labels.items()):
        (root / "data" / task).mkdir(parents=True)
        train[task] = write_rows(root / "data" / task / "train.jsonl", 24, k, seed=10 + i)
        evals[task] = write_rows(root / "data" / task / "eval.jsonl", 24, k, seed=20 + i)
    return (
        TinySetup(root, base, lora, train, evals, labels),
        TinySetup(root, base, full, train, evals, labels),
    )


def static_merge(setup: TinySetup, method: str, params: dict) -> DivMergeModule:
    """``divmerge-pl merge --method`` in Python: the method's merge, scored by ``validate``."""
    module = DivMergeModule(**setup.model_args(teacher_cache=None), static_method=get_method(method, params))
    data = MergeDataModule(
        [TaskSpec(**s) for s in setup.task_specs()], tokenizer=str(setup.base), batch_size=8, max_length=16
    )
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(module, datamodule=data, verbose=False)
    return module


STATIC_CASES = {
    "average": ("average", {}),
    "task_arithmetic": ("task_arithmetic", {"scale": 0.7}),
    "ties": ("ties", {"density": 0.3, "scale": 1.2}),  # trimmed over the whole task vector
    "ties_per_tensor": ("ties", {"density": 0.3, "scale": 1.2, "scope": "tensor"}),
    "dare": ("dare", {"drop_rate": 0.5, "scale": 0.5, "seed": 3}),
    "dare_ties": ("dare", {"drop_rate": 0.5, "then": "ties", "density": 0.5, "scale": 0.8, "seed": 3}),
}


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_training_free_merges_of_lora_experts_equal_those_of_their_full_models(twin_setups, case):
    method, params = STATIC_CASES[case]
    over_lora, over_full = (static_merge(setup, method, params) for setup in twin_setups)
    assert over_lora.frozen.low_rank.names and not over_full.frozen.low_rank.names
    linear = method in ("average", "task_arithmetic")
    # average / TA keep the factors, at the method's weights; TIES / DARE hold the targets dense
    fixed, targets = over_lora.fixed_delta, set(over_lora.frozen.low_rank.names)
    if linear:
        assert fixed.low_rank_weights is not None  # (alpha, a full expert, is dense on the targets)
    else:
        assert fixed.low_rank_weights is None and targets <= set(fixed.names)
    lora_models, full_models = dict(over_lora.merged_models()), dict(over_full.merged_models())
    for task in ("alpha", "beta", "gamma"):
        want = dict(full_models[task].named_parameters())
        for name, param in lora_models[task].named_parameters():
            torch.testing.assert_close(param, want[name], atol=1e-6, rtol=0, msg=f"{case}: {task} {name}")
    lora_report, full_report = over_lora.evaluate(), over_full.evaluate()
    assert lora_report["method"] == full_report["method"] == method
    assert lora_report["params"] == full_report["params"]
    for task, row in full_report["tasks"].items():
        assert lora_report["tasks"][task] == pytest.approx(row, abs=1e-6), task


def test_linear_merges_of_lora_experts_form_no_dense_target(twin_setups, caplog):
    """All-LoRA experts: average and task arithmetic, merged and scored, build no d_out x d_in
    tensor of a LoRA target; TIES, which needs each entry, does (one per target)."""
    lora = twin_setups[0]
    setup = TinySetup(lora.root, lora.base, {t: lora.experts[t] for t in ("beta", "gamma")},
                      lora.train, lora.eval, lora.labels)  # fmt: skip
    module = static_merge(setup, "average", {})
    targets = {tuple(p.shape) for n, p in module.frozen.base_model.named_parameters()
               if n in module.frozen.low_rank.names}  # fmt: skip
    caplog.set_level(logging.INFO)
    for method, params in (("average", {}), ("task_arithmetic", {"scale": 0.4}), ("ties", {})):
        with ShapeRecorder() as made:
            module.set_static_merge(get_method(method, params).build())
            report = module.evaluate()
        assert set(report["tasks"]) == {"beta", "gamma"}
        if method == "ties":
            assert targets & made.shapes  # the recorder sees the dense targets TIES needs
            assert "task vectors are made dense, one target at a time (ties needs each entry)" in caplog.text
        else:
            assert not targets & made.shapes, (method, sorted(targets & made.shapes))
            assert module.fixed_delta.names == []  # nothing dense: the adapters save only heads


@pytest.mark.parametrize("transform", ["ties", "dare", "tsv"])
def test_learned_merge_over_transformed_lora_experts_equals_full_models(twin_setups, transform):
    """``task_vector_transform`` (AdaMerging++) over LoRA experts: their targets' transformed
    vectors are dense, as their full models', and the learned merge follows the same path."""
    runs = []
    for setup in twin_setups:
        args = setup.model_args(teacher_cache=None, task_vector_transform=transform, density=0.3,
                                drop_rate=0.5, granularity="task")  # fmt: skip
        runs.append(fit(args, setup.task_specs(), setup.base, max_steps=2)[0])
    over_lora, over_full = runs
    lora_vectors, full_vectors = over_lora.frozen.merge_vectors(), over_full.frozen.merge_vectors()
    assert set(over_lora.frozen.low_rank.names) <= set(lora_vectors)
    assert lora_vectors.keys() == full_vectors.keys()
    for name, stacked in full_vectors.items():
        torch.testing.assert_close(lora_vectors[name], stacked, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        over_lora.merge_coefficients(), over_full.merge_coefficients(), atol=1e-6, rtol=0
    )
    lora_models, full_models = dict(over_lora.merged_models()), dict(over_full.merged_models())
    for name, param in lora_models["beta"].named_parameters():
        torch.testing.assert_close(
            param, dict(full_models["beta"].named_parameters())[name], atol=1e-6, rtol=0
        )


def test_wrong_adapter_fails_before_the_data_is_read(bert_setup, tmp_path):
    make_adapter(
        BertForSequenceClassification(tiny_config(num_labels=2)),
        tmp_path / "ia3",
        IA3Config(task_type="SEQ_CLS", target_modules=["query"], feedforward_modules=[]),
        seed=3,
    )
    module = DivMergeModule(
        base=str(bert_setup.base), experts={"alpha": str(tmp_path / "ia3")}, teacher_cache=None
    )
    with pytest.raises(UnsupportedAdapterError, match="expert 'alpha'.*IA3 adapter"):
        module.prepare_data()


def test_fit_with_lora_causal_lm_experts(tmp_path):
    base = tmp_path / "base"
    make_lm(base, "llama", seed=0)
    experts, train, evals = {}, {}, {}
    for i, task in enumerate(("alpha", "beta")):
        experts[task] = tmp_path / "experts" / task
        config = LoraConfig(task_type="CAUSAL_LM", r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        make_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), experts[task], config, seed=30 + i)
        (tmp_path / "data" / task).mkdir(parents=True)
        train[task] = write_prompt_rows(tmp_path / "data" / task / "train.jsonl", 16, task, seed=10 + i)
        evals[task] = write_prompt_rows(tmp_path / "data" / task / "eval.jsonl", 4, task, seed=20 + i)
    lm = TinyLM(tmp_path, base, experts, train, evals)
    module, data = fit(lm.model_args(teacher_cache=None), lm.task_specs(), base, max_steps=2)
    assert module.frozen.names == [] and len(module.frozen.low_rank.names) == 4
    tokenizer = AutoTokenizer.from_pretrained(base)
    for dm_id, task in enumerate(data.task_names):  # teachers: peft's model of each adapter answers
        expert = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), experts[task]).eval()
        for row in [r for r in data.train_rows if r["task_id"] == dm_id][:4]:
            out = expert.generate(
                input_ids=torch.tensor([row["input_ids"]]), max_new_tokens=4, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[0, len(row["input_ids"]):].tolist()  # fmt: skip
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id) + 1]
            n = int(module.teachers.answer_len[row["row_id"]])
            assert module.teachers.answer_ids[row["row_id"], :n].tolist() == out
    ((folder, merged),) = list(module.merged_models())
    gamma, group = module.merge_coefficients().detach(), module.layout.group_of
    base_params = dict(AutoModelForCausalLM.from_pretrained(base).named_parameters())
    factors = [lora_reference(experts[t]) for t in module.tasks]
    for name, param in merged.named_parameters():
        want = base_params[name]
        for t, own in enumerate(factors):
            if name in own:
                down, up, scaling = own[name]
                want = want + gamma[t, group[name]] * scaling * (up @ down)
        torch.testing.assert_close(param, want, atol=1e-6, rtol=0)
    assert folder == "" and set(module.evaluate()["tasks"]) == {"alpha", "beta"}

    # a training step's forward and backward never form a d_out x d_in matrix of a LoRA target
    targets = {tuple(base_params[name].shape) for name in module.frozen.low_rank.names}
    batch = next(iter(data.train_dataloader()))
    with ShapeRecorder() as made:
        loss = sum(per_row.sum() for _t, per_row in module.merged_divergences(batch))
        loss.backward()
    assert module.coefficients.grad.abs().sum() > 0
    assert not targets & made.shapes, sorted(targets & made.shapes)
    # the rank-5 path ran: tokens x rank made, beside the factors (a target's size x rank)
    sizes = {size for shape in targets for size in shape}
    assert any(shape[-1] == 2 + 3 and math.prod(shape[:-1]) not in sizes for shape in made.shapes)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an aten op creates (views of its inputs left out)."""

    def __enter__(self):
        self.shapes: set[tuple[int, ...]] = set()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(tensor.shape))
        return out


def test_backbone_modules_an_adapter_saves_whole_merge_as_dense_task_vectors(bert_setup, tmp_path):
    torch.manual_seed(40)
    model = BertForSequenceClassification(tiny_config(2)).eval()
    model.bert.load_state_dict(BertModel.from_pretrained(bert_setup.base).state_dict())
    config = LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"], modules_to_save=["pooler.dense"])
    make_adapter(model, tmp_path / "pooled", config, seed=41)
    experts = {"alpha": str(bert_setup.experts["alpha"]), "pooled": str(tmp_path / "pooled")}
    loaded = load_experts(str(bert_setup.base), experts)
    saved = {
        k.removeprefix("base_model.model."): v
        for k, v in load_file(tmp_path / "pooled" / "adapter_model.safetensors").items()
    }
    base = dict(loaded.base_model.named_parameters())
    for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias"):
        torch.testing.assert_close(loaded.task_vectors[name][1], saved[name] - base[name], atol=0, rtol=0)
    assert set(loaded.heads["pooled"]) == HEADS and set(loaded.low_rank) == {
        f"bert.encoder.layer.{i}.attention.self.query.weight" for i in (0, 1)
    }
    assert (
        loaded.configs["pooled"].num_labels == 2
        and loaded.fingerprints["pooled"] != loaded.fingerprints["alpha"]
    )


def test_cli_fit_with_lora_experts_writes_merged_models(bert_setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from divmerge_pl.cli import main

    from .test_fit import run_dir, write_config

    out = tmp_path / "run"
    main(["fit", "--config", str(write_config(bert_setup, out, granularity="block", epochs=1))])
    run = run_dir(out)
    coefficients = json.loads((run / "coefficients.json").read_text())
    gamma, groups = torch.tensor(coefficients["values"]), coefficients["groups"]
    base = dict(BertModel.from_pretrained(bert_setup.base).named_parameters())
    alpha = dict(
        AutoModelForSequenceClassification.from_pretrained(bert_setup.experts["alpha"]).named_parameters()
    )
    factors = {t: lora_reference(bert_setup.experts[t]) for t in ("beta", "gamma")}
    merged = AutoModelForSequenceClassification.from_pretrained(run / "merged" / "beta")
    assert merged.config.num_labels == 3
    name = "bert.encoder.layer.1.attention.self.query.weight"
    g = gamma[:, groups.index("layer.1")]
    theta0 = base[name.removeprefix("bert.")]
    want = theta0 + g[0] * (alpha[name] - theta0)
    for t, task in enumerate(("beta", "gamma"), start=1):
        down, up, scaling = factors[task][name]
        want = want + g[t] * scaling * (up @ down)
    torch.testing.assert_close(dict(merged.named_parameters())[name], want, atol=1e-6, rtol=0)
    assert set(json.loads((run / "report.json").read_text())["tasks"]) == {"alpha", "beta", "gamma"}


def test_adapters_given_as_hub_ids_merge_as_their_folders(bert_setup, tmp_path, monkeypatch):
    """An adapter repository in the Hub cache (offline), named by its id, is read as the folder it
    holds: same fingerprints, factors and heads as when the folder is given."""
    from .test_hub import COMMIT_A, lay_out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    cache = tmp_path / "hf_home" / "hub"
    lay_out(cache, "org/beta-lora", bert_setup.experts["beta"], COMMIT_A)
    by_folder = {t: str(bert_setup.experts[t]) for t in ("alpha", "beta")}
    by_id = {**by_folder, "beta": "org/beta-lora"}
    folder, hub = load_experts(str(bert_setup.base), by_folder), load_experts(str(bert_setup.base), by_id)
    assert hub.fingerprints == folder.fingerprints
    assert hub.paths["beta"] == cache / "models--org--beta-lora" / "snapshots" / COMMIT_A
    assert set(hub.low_rank) == set(folder.low_rank) and folder.low_rank
    for name, stack in folder.low_rank.items():
        torch.testing.assert_close(hub.low_rank[name].down, stack.down, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="expert 'beta'.*org/missing-lora"):
        load_experts(str(bert_setup.base), {**by_folder, "beta": "org/missing-lora"})


def test_experts_all_lora_take_their_kind_from_the_adapters(bert_setup):
    """The base is a BertModel folder (no head, architectures BertModel): the adapters' task_type
    says classification, their heads say how many labels."""
    experts = {t: str(bert_setup.experts[t]) for t in ("beta", "gamma")}
    loaded = load_experts(str(bert_setup.base), experts)
    assert loaded.kind == "sequence_classification" and loaded.task_vectors == {}
    assert {t: c.num_labels for t, c in loaded.configs.items()} == {"beta": 3, "gamma": 2}
    assert [h["classifier.weight"].shape[0] for h in loaded.heads.values()] == [3, 2]
    assert len(loaded.low_rank) == 4 and set(loaded.fingerprints) == {"base", "beta", "gamma"}


def test_resume_mid_epoch_with_lora_experts_ends_as_an_unbroken_run(bert_setup, tmp_path):
    """Ctrl-C mid-epoch (9 batches an epoch), then ``--ckpt_path last``: the coefficients of a
    run that was never stopped (the checkpoint holds Gamma, never the factors)."""
    from divmerge_pl.cli import main

    from .test_fit import write_config
    from .test_resume import final_coefficients, with_callback

    main(["fit", "--config", str(write_config(bert_setup, tmp_path / "whole", epochs=2))])
    broken = tmp_path / "broken"
    config = with_callback(write_config(bert_setup, broken, epochs=2), "tests.test_resume.InterruptAt", 5)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    (checkpoint,) = broken.rglob("last.ckpt")
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["global_step"] == 5 and not any("down_" in k or "tau_" in k for k in saved["state_dict"])
    main(["fit", "--config", str(write_config(bert_setup, broken, epochs=2)), "--ckpt_path", "last"])
    whole = final_coefficients(tmp_path / "whole")
    assert not torch.allclose(whole, torch.full_like(whole, 1 / 3))  # it learned
    torch.testing.assert_close(final_coefficients(broken), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("strategy", ["ddp", "sharded"])
def test_two_gloo_processes_with_lora_experts_learn_what_one_learns(bert_setup, tmp_path, strategy):
    """2 x 4 rows against 1 x 8: each rank runs the LoRA experts' teachers on its share and the
    low-rank merge on its rows; the coefficients are one process's, to float tolerance. Sharded:
    the base is cut across the processes, the LoRA factors held whole."""
    import subprocess
    import sys

    from divmerge_pl.cli import main

    from .test_fit import write_config
    from .test_lightning import REPO
    from .test_resume import final_coefficients
    from .test_sharding import TWO_PROCESSES

    main(["fit", "--config", str(write_config(bert_setup, tmp_path / "single", epochs=1))])
    done = subprocess.run(
        [
            sys.executable, "-m", "divmerge_pl.cli", "fit",
            "--config", str(write_config(bert_setup, tmp_path / "ddp", epochs=1)), *TWO_PROCESSES[strategy],
            f"--model.init_args.teacher_cache={tmp_path / 'ddp_teachers'}",  # computed anew, split
        ],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = final_coefficients(tmp_path / "single"), final_coefficients(tmp_path / "ddp")
    assert not torch.allclose(single, torch.full_like(single, 1 / 3))
    torch.testing.assert_close(ddp, single, atol=1e-4, rtol=0)  # as for full experts (test_lightning)
    (report,) = [json.loads(p.read_text()) for p in (tmp_path / "ddp").rglob("report.json")]
    assert (
        report["tasks"] == json.loads(next((tmp_path / "single").rglob("report.json")).read_text())["tasks"]
    )


def test_merge_command_over_lora_experts_writes_the_full_models_merge(twin_setups, tmp_path):
    """``divmerge-pl merge --method ties`` (the paper's trim over the whole task vector): the
    exported merged models are those of the same experts saved as full models."""
    from divmerge_pl.cli import main

    from .test_fit import run_dir, write_config

    for setup, name in zip(twin_setups, ("lora", "full"), strict=True):
        main(["merge", "--config", str(write_config(setup, tmp_path / name)), "--method", "ties"])
    for task in ("alpha", "beta", "gamma"):
        over_lora = load_file(run_dir(tmp_path / "lora") / "merged" / task / "model.safetensors")
        over_full = load_file(run_dir(tmp_path / "full") / "merged" / task / "model.safetensors")
        assert over_lora.keys() == over_full.keys()
        for key, value in over_full.items():
            torch.testing.assert_close(over_lora[key], value, atol=1e-6, rtol=0, msg=f"{task} {key}")
    reports = [json.loads((run_dir(tmp_path / n) / "report.json").read_text()) for n in ("lora", "full")]
    assert reports[0]["method"] == "ties" and reports[0]["params"] == reports[1]["params"]
    for task, row in reports[1]["tasks"].items():
        assert reports[0]["tasks"][task] == pytest.approx(row, abs=1e-6), task
