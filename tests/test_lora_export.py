"""The merged PEFT adapter (``merged_adapter/``): when every expert is a LoRA adapter, the
merge written as one adapter over the base, loaded by peft alone, gives the merged model's
logits; with a full expert among them no adapter is written."""

from __future__ import annotations

import json
import logging
import os
import stat

import lightning as L
import pytest
import torch
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule, MergedModelExport, TaskSpec

from .conftest import TinySetup
from .lm_setup import TinyLM, make_lm, write_prompt_rows
from .test_lora import bert_setup, lora_reference, make_adapter  # noqa: F401 (bert_setup: a fixture)


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def fit_and_export(model_args: dict, specs: list[dict], tokenizer, exports: list[MergedModelExport]):
    module = DivMergeModule(**{"lr": 0.05, **model_args})
    data = MergeDataModule(
        [TaskSpec(**s) for s in specs], tokenizer=str(tokenizer), batch_size=8, max_length=16
    )
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=exports,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module


def by_hand(base_model, coefficients: dict, experts: dict, rows: dict | None = None) -> torch.nn.Module:
    """``W0 + sum_t Gamma_t s_t B_t A_t`` from coefficients.json (or, for the channel layout,
    coefficients.safetensors' ``rows``: Gamma_t per row) and peft's own reading of each adapter
    (no code of ours), in ``base_model``."""
    gamma, groups = torch.tensor(coefficients["values"]), coefficients["groups"]
    params = dict(base_model.named_parameters())
    with torch.no_grad():
        for t, task in enumerate(coefficients["tasks"]):
            for name, (down, up, scaling) in lora_reference(experts[task]).items():
                g = gamma[t, groups.index(name) if len(groups) > 1 else 0]
                if rows is not None:
                    g = rows[name][t][:, None]
                params[name] += g * scaling * (up @ down)
    return base_model


def adapter_tensors(folder) -> dict[str, str]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {name: handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("granularity", ["task", "layer", "channel"])
def test_classification_adapters_merge_into_one_adapter_per_task(
    bert_setup,  # noqa: F811 (the fixture)
    tmp_path,
    granularity,
    umask_022,
):
    tasks = ("beta", "gamma")  # the LoRA experts only (alpha is a full model)
    setup = TinySetup(
        bert_setup.root, bert_setup.base, {t: bert_setup.experts[t] for t in tasks},
        bert_setup.train, bert_setup.eval, {t: bert_setup.labels[t] for t in tasks},
    )  # fmt: skip
    out = tmp_path / "out"
    args = setup.model_args(teacher_cache=None, granularity=granularity)
    module = fit_and_export(args, setup.task_specs(), setup.base, [MergedModelExport(dirpath=str(out))])
    coefficients = json.loads((out / "coefficients.json").read_text())
    gamma = torch.tensor(coefficients["values"])
    assert not torch.allclose(gamma, torch.full_like(gamma, 0.5))  # it learned: Gamma matters
    report = json.loads((out / "report.json").read_text())
    assert report["merged_adapter"] == {t: f"merged_adapter/{t}" for t in tasks}
    inputs = {
        "input_ids": torch.randint(5, 30, (4, 10)),
        "attention_mask": torch.ones(4, 10, dtype=torch.long),
    }
    for task in tasks:
        folder = out / "merged_adapter" / task
        k = setup.labels[task]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(setup.base) and config["task_type"] == "SEQ_CLS"
        assert config["r"] == config["lora_alpha"] and "classifier" in config["modules_to_save"]
        # query: beta's r 4 + gamma's r 2; value: beta's 4 alone (by pattern)
        assert config["r"] == 6 and set(config["rank_pattern"].values()) == {4}
        assert config["alpha_pattern"] == config["rank_pattern"]
        base = AutoModelForSequenceClassification.from_pretrained(setup.base, num_labels=k).eval()
        adapter = PeftModel.from_pretrained(base, folder).eval()
        merged = AutoModelForSequenceClassification.from_pretrained(out / "merged" / task).eval()
        with torch.no_grad():
            got, want = adapter(**inputs).logits, merged(**inputs).logits
            head = {n.removeprefix("base_model.model."): p for n, p in adapter.named_parameters()}
            reference = AutoModelForSequenceClassification.from_pretrained(setup.base, num_labels=k)
            reference.classifier.load_state_dict({n: head[f"classifier.modules_to_save.default.{n}"]
                                                  for n in ("weight", "bias")})  # fmt: skip
            rows = load_file(out / "coefficients.safetensors") if granularity == "channel" else None
            if rows is not None:  # rows learned apart, so a merge by their mean would differ
                assert all(rows[name][0].std() > 0 for name in module.frozen.low_rank.names)
            hand = by_hand(reference, coefficients, setup.experts, rows).eval()(**inputs).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            head["classifier.modules_to_save.default.weight"],
            module.frozen.head(tasks.index(task))["classifier.weight"],
        )
        card = ModelCard.load(folder / "README.md")
        assert card.data.library_name == "peft"
        assert f'PeftModel.from_pretrained(base, "merged_adapter/{task}")' in card.text
        assert f'from_pretrained("{setup.base}", num_labels={k})' in card.text
        for other in tasks:
            assert (
                f"| `{other}` | {sum(gamma[tasks.index(other)].tolist()) / gamma.shape[1]:.4f} |" in card.text
            )
        assert f"`merged_adapter/{task}`" in (out / "merged" / task / "README.md").read_text()
        for path in [folder, *folder.iterdir()]:
            assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_causal_lm_adapters_merge_into_one_adapter(tmp_path, umask_022, granularity):
    base = tmp_path / "base"
    make_lm(base, "llama", seed=0)
    experts, train, evals = {}, {}, {}
    for i, (task, targets) in enumerate((("alpha", ["q_proj", "v_proj"]), ("beta", ["q_proj", "down_proj"]))):
        experts[task] = tmp_path / "experts" / task
        config = LoraConfig(task_type="CAUSAL_LM", r=2 + i, lora_alpha=4, target_modules=targets)
        make_adapter(AutoModelForCausalLM.from_pretrained(base).eval(), experts[task], config, seed=30 + i)
        (tmp_path / "data" / task).mkdir(parents=True)
        train[task] = write_prompt_rows(tmp_path / "data" / task / "train.jsonl", 16, task, seed=10 + i)
        evals[task] = write_prompt_rows(tmp_path / "data" / task / "eval.jsonl", 4, task, seed=20 + i)
    lm = TinyLM(tmp_path, base, experts, train, evals)
    plain, bf16 = tmp_path / "plain", tmp_path / "bf16"
    exports = [MergedModelExport(dirpath=str(plain)), MergedModelExport(dirpath=str(bf16), dtype="bfloat16")]
    fit_and_export(lm.model_args(teacher_cache=None, granularity=granularity), lm.task_specs(), base, exports)
    coefficients = json.loads((plain / "coefficients.json").read_text())
    rows = load_file(plain / "coefficients.safetensors") if granularity == "channel" else None
    if rows is not None:  # rows learned apart, so a merge by their mean would differ
        assert all(any(r[t].std() > 0 for r in rows.values()) for t in range(len(coefficients["tasks"])))
    folder = plain / "merged_adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(base)
    # q_proj: rank 2 + 3; v_proj 2, down_proj 3 alone: ranks differ by target, scaling 1 on each
    ranks = {
        m.rpartition(".")[2]: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]
    }
    alphas = {
        m.rpartition(".")[2]: config["alpha_pattern"].get(m, config["lora_alpha"])
        for m in config["target_modules"]
    }
    assert ranks == alphas == {"q_proj": 5, "v_proj": 2, "down_proj": 3}
    assert json.loads((plain / "report.json").read_text())["merged_adapter"] == {"": "merged_adapter"}
    inputs = {"input_ids": torch.randint(3, 40, (3, 9))}
    with torch.no_grad():
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).eval()
        got = adapter(**inputs).logits
        want = AutoModelForCausalLM.from_pretrained(plain / "merged").eval()(**inputs).logits
        hand = (
            by_hand(AutoModelForCausalLM.from_pretrained(base), coefficients, experts, rows)
            .eval()(**inputs)
            .logits
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)
    assert set(adapter_tensors(folder).values()) == {"F32"}
    assert set(adapter_tensors(bf16 / "merged_adapter").values()) == {"BF16"}  # export.dtype
    assert 'PeftModel.from_pretrained(base, "merged_adapter")' in (folder / "README.md").read_text()


def test_no_adapter_with_a_full_expert_or_when_switched_off(bert_setup, tmp_path, caplog):  # noqa: F811
    mixed, off = tmp_path / "mixed", tmp_path / "off"
    exports = [MergedModelExport(dirpath=str(mixed)), MergedModelExport(dirpath=str(off), save_adapter=False)]
    with caplog.at_level(logging.INFO):
        fit_and_export(
            bert_setup.model_args(teacher_cache=None), bert_setup.task_specs(), bert_setup.base, exports
        )
    for out in (mixed, off):
        assert (out / "merged" / "beta").is_dir() and not (out / "merged_adapter").exists()
        assert "merged_adapter" not in json.loads((out / "report.json").read_text())
    assert "no merged_adapter/" in caplog.text and "expert 'alpha' is a full model" in caplog.text
    assert caplog.text.count("no merged_adapter/") == 1  # save_adapter: false says nothing


def test_save_adapter_is_a_typed_export_option_of_the_cli(capsys):
    from divmerge_pl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--export.save_adapter {true,false}" in help_text
    assert "also write ``merged_adapter/``" in help_text  # its docstring, as LightningCLI shows it
