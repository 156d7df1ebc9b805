"""Causal LM experts: greedy answers as targets, the divergence on answer tokens, one merged LM."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import divmerge_pl.kinds as kinds_code
from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl.cli import main

from .lm_setup import TinyLM, build_lm_setup


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> TinyLM:
    return build_lm_setup(tmp_path_factory.mktemp("lm"), "gpt2")


def fit_lm(lm: TinyLM, tasks=("alpha", "beta"), max_steps: int = 0, specs=None, **kwargs):
    args = lm.model_args(**{"teacher_cache": None, **kwargs})
    args["experts"] = {t: args["experts"][t] for t in tasks}
    module = DivMergeModule(**args)
    specs = specs or [s for s in lm.task_specs() if s["name"] in tasks]
    data = MergeDataModule(
        [TaskSpec(**s) for s in specs], tokenizer=str(lm.base), batch_size=8, max_length=16
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


def first_batch(trainer: L.Trainer) -> dict:
    return next(iter(trainer.datamodule.train_dataloader()))


def test_teacher_answers_are_what_transformers_generates_for_each_prompt_alone(lm):
    module, trainer = fit_lm(lm)
    dm = trainer.datamodule
    tokenizer = AutoTokenizer.from_pretrained(lm.base)
    for dm_id, task in enumerate(dm.task_names):
        expert = AutoModelForCausalLM.from_pretrained(lm.experts[task]).eval()
        rows = [r for r in dm.train_rows if r["task_id"] == dm_id][:6]
        for row in rows:  # unpadded, one at a time: left padding must not change the answer
            out = expert.generate(
                torch.tensor([row["input_ids"]]), max_new_tokens=4, do_sample=False,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            )[0, len(row["input_ids"]):].tolist()  # fmt: skip
            if tokenizer.eos_token_id in out:
                out = out[: out.index(tokenizer.eos_token_id) + 1]
            n = int(module.teachers.answer_len[row["row_id"]])
            assert module.teachers.answer_ids[row["row_id"], :n].tolist() == out
            # the cached distributions are the expert's own: greedy picks their argmax
            top = module.teachers.logprobs[row["row_id"], :n].argmax(-1)
            assert top.tolist() == out


def test_answers_end_at_eos_which_they_keep_or_at_max_new_tokens(lm):
    module, trainer = fit_lm(lm, max_new_tokens=6)
    lengths, eos = module.teachers.answer_len, trainer.datamodule.tokenizer.eos_token_id
    ended = lengths < 6
    assert ended.float().mean() > 0.5, "the tiny experts were trained to answer '<word> <eos>'"
    last = module.teachers.answer_ids[ended].gather(1, (lengths[ended] - 1)[:, None]).flatten()
    assert (last == eos).all()
    pad = trainer.datamodule.tokenizer.pad_token_id
    after = torch.arange(6)[None, :] >= lengths[:, None]
    assert (module.teachers.answer_ids[after] == pad).all()
    short, _ = fit_lm(lm, max_new_tokens=1)
    assert (short.teachers.answer_len == 1).all()


def test_loss_is_zero_when_the_merge_is_the_expert(lm):
    module, trainer = fit_lm(lm, tasks=("alpha",), granularity="task", init=1.0)
    batch = first_batch(trainer)
    per_row = module.kind.answer_divergences(module.merged_tensors(), batch)
    assert per_row.abs().max() < 1e-6
    module.coefficients.data.fill_(0.5)
    assert module.kind.answer_divergences(module.merged_tensors(), batch).min() > 1e-4


def test_positions_outside_the_answer_do_not_change_the_loss(lm):
    module, trainer = fit_lm(lm, max_new_tokens=8)
    batch = first_batch(trainer)
    merged = module.merged_tensors()
    before = module.kind.answer_divergences(merged, batch)
    lengths = module.teachers.answer_len[batch["row_id"]]
    short = int(torch.nonzero(lengths < 8)[0, 0])
    row, n = int(batch["row_id"][short]), int(lengths[short])
    teacher = module.teachers.logprobs
    teacher[row, n:] = torch.log_softmax(torch.randn_like(teacher[row, n:]), -1)  # after the answer
    torch.testing.assert_close(module.kind.answer_divergences(merged, batch), before, rtol=0, atol=0)
    teacher[row, n - 1] = torch.log_softmax(torch.randn_like(teacher[row, n - 1]), -1)  # EOS counts
    after = module.kind.answer_divergences(merged, batch)
    assert (after - before).abs()[short] > 1e-4
    assert torch.equal(
        torch.cat([after[:short], after[short + 1 :]]), torch.cat([before[:short], before[short + 1 :]])
    )


def test_top_k_loss_equals_the_full_loss_at_k_vocab_and_bounds_it_below(lm):
    full, trainer = fit_lm(lm)
    vocab = full.teachers.logprobs.shape[-1]
    batch = first_batch(trainer)
    losses = {}
    for k in (None, vocab, 3):
        module = full if k is None else fit_lm(lm, top_k=k)[0]
        module.coefficients.data = torch.linspace(-0.5, 1.5, module.coefficients.numel()).view_as(
            module.coefficients
        )
        losses[k] = module.kind.answer_divergences(module.merged_tensors(), batch)
        if k is not None:
            assert module.teachers.logprobs.shape[-1] == min(k, vocab) + 1
    torch.testing.assert_close(losses[vocab], losses[None], rtol=1e-5, atol=1e-7)
    # JS on a coarser partition is smaller (data processing inequality), and not trivially 0
    assert (losses[3] <= losses[None] + 1e-7).all() and (losses[3] > 0).all()


def test_cached_answers_are_reused_and_renewed_when_an_expert_changes(lm, tmp_path, monkeypatch):
    calls = []
    real = kinds_code.answer_targets

    def counted(*args, **kwargs):
        calls.append(kwargs.get("desc", args[6] if len(args) > 6 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(kinds_code, "answer_targets", counted)
    cache = str(tmp_path / "cache")

    def run():
        module, _ = fit_lm(lm, max_steps=1, teacher_cache=cache)
        return module

    first = run()
    assert len(calls) == 2
    calls.clear()
    second = run()
    assert calls == []  # no expert generated anything
    assert torch.equal(first.teachers.answer_ids, second.teachers.answer_ids)
    torch.testing.assert_close(first.teachers.logprobs, second.teachers.logprobs, rtol=0, atol=0)

    changed = tmp_path / "beta"  # expert beta with one tensor nudged
    changed.mkdir()
    for f in Path(lm.experts["beta"]).iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    weights = load_file(changed / "model.safetensors")
    name = next(n for n in weights if n.endswith("ln_f.weight"))
    weights[name] = weights[name] + 0.5
    save_file(weights, changed / "model.safetensors", metadata={"format": "pt"})
    other = TinyLM(lm.root, lm.base, {**lm.experts, "beta": changed}, lm.train, lm.eval)
    calls.clear()
    fit_lm(other, max_steps=1, teacher_cache=cache)
    assert len(calls) == 1 and "beta" in calls[0]


def write_lm_config(lm: TinyLM, folder: Path, tasks=None, epochs: int = 2, **model) -> Path:
    config = {
        "seed_everything": 0,
        "model": {"class_path": "divmerge_pl.DivMergeModule", "init_args": lm.model_args(**model)},
        "data": {
            "class_path": "divmerge_pl.MergeDataModule",
            "init_args": {"tasks": tasks or lm.task_specs(), "batch_size": 8, "max_length": 16},
        },
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(folder),
            "enable_progress_bar": False,
            "accelerator": "cpu",
            "devices": 1,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fit_writes_one_merged_lm_equal_to_base_plus_gamma_tau(tmp_path, arch):
    lm = build_lm_setup(tmp_path, arch)
    out = tmp_path / "run"
    main(["fit", "--config", str(write_lm_config(lm, out, granularity="block"))])
    (run,) = sorted((out / "lightning_logs").iterdir())
    assert (run / "merged" / "config.json").is_file()
    assert not [p for p in (run / "merged").iterdir() if p.is_dir()]  # one model, not one per task

    coefficients = json.loads((run / "coefficients.json").read_text())
    gamma = torch.tensor(coefficients["values"])
    assert gamma.shape[0] == 2 and not torch.allclose(gamma, torch.full_like(gamma, 0.5))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(lm.base)
    experts = [AutoModelForCausalLM.from_pretrained(lm.experts[t]) for t in coefficients["tasks"]]
    base_params = dict(base.named_parameters())
    expert_params = [dict(e.named_parameters()) for e in experts]
    groups = coefficients["groups"]
    for name, param in merged.named_parameters():
        group = next((g for g in groups if f"{g}." in name), "other")
        column = gamma[:, groups.index(group)]
        want = base_params[name] + sum(
            column[t] * (expert_params[t][name] - base_params[name]) for t in range(len(experts))
        )
        torch.testing.assert_close(param, want, atol=1e-6, rtol=0)
    tied = arch == "gpt2"
    assert (merged.lm_head.weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()) == tied

    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    prompt = tokenizer("good movie answer :", return_tensors="pt")
    out_ids = merged.generate(
        **prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out_ids.shape[1] > prompt["input_ids"].shape[1]

    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"alpha", "beta"} and report["metric"] == "accuracy"


def test_expert_and_merged_scores_come_from_generated_text(tmp_path):
    """References set to the expert's own answers (decoded by transformers): it scores 1, and so
    does a merge that is the expert."""
    lm = build_lm_setup(tmp_path, "gpt2", tasks=("alpha",))
    tokenizer = AutoTokenizer.from_pretrained(lm.base)
    expert = AutoModelForCausalLM.from_pretrained(lm.experts["alpha"]).eval()
    rows = [json.loads(line) for line in lm.eval["alpha"].read_text().splitlines()]
    with lm.eval["alpha"].open("w") as handle:
        for row in rows:
            ids = tokenizer(f"{row['text']} answer :", return_tensors="pt")["input_ids"]
            out = expert.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=1)
            row["answer"] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            handle.write(json.dumps(row) + "\n")
    spec = {**lm.task_specs(metric="exact_match")[0], "label_words": None, "label_field": "answer"}
    module, _ = fit_lm(lm, tasks=("alpha",), specs=[spec], granularity="task", init=1.0)
    assert module.expert_scores == {"alpha": 1.0}
    assert module.evaluate()["tasks"]["alpha"]["merged"] == 1.0
    module.coefficients.data.fill_(-3.0)  # far from the expert: its answers change
    module.evaluation.last_merged_scores = None  # scored again, not the fit's last validation
    assert module.evaluate()["tasks"]["alpha"]["merged"] < 1.0


def test_prompts_and_expert_kind_must_agree(lm, tiny):
    with pytest.raises(ValueError, match="have no prompt"):
        specs = [{k: v for k, v in s.items() if k not in ("prompt", "label_words")} for s in lm.task_specs()]
        fit_lm(lm, specs=specs)
    module = DivMergeModule(**tiny.model_args())
    specs = [{**s, "prompt": "{text} answer :"} for s in tiny.task_specs()]
    data = MergeDataModule([TaskSpec(**s) for s in specs], tokenizer=str(tiny.base))
    with pytest.raises(ValueError, match="for causal LM experts"):
        L.Trainer(max_steps=1, accelerator="cpu", logger=False).fit(module, datamodule=data)


def test_bad_prompt_settings_are_named():
    with pytest.raises(ValueError, match="not a valid template"):
        MergeDataModule([TaskSpec(name="a", train_files="x.jsonl", prompt="{text answer")])
    with pytest.raises(ValueError, match="names no field"):
        MergeDataModule([TaskSpec(name="a", train_files="x.jsonl", prompt="Answer:")])
    with pytest.raises(ValueError, match="not for generated answers"):
        MergeDataModule([TaskSpec(name="a", train_files="x.jsonl", prompt="{text}", metric="f1")])
    with pytest.raises(ValueError, match="label_words is for causal LM"):
        MergeDataModule([TaskSpec(name="a", train_files="x.jsonl", label_words=["x", "y"])])
    with pytest.raises(ValueError, match="have a prompt"):
        MergeDataModule(
            [TaskSpec(name="a", train_files="x.jsonl", prompt="{text}"), TaskSpec(name="b", train_files="y")]
        )


def test_eval_label_without_a_label_word_is_named(lm, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"text": "good movie", "label": 5}) + "\n")
    specs = lm.task_specs()
    specs[0]["eval_files"] = str(bad)
    with pytest.raises(ValueError, match="eval label 5 has no label word"):
        fit_lm(lm, specs=specs)


def test_training_free_merge_of_one_lm_expert_at_scale_one_is_that_expert(tmp_path):
    lm = build_lm_setup(tmp_path, "llama", tasks=("alpha",))
    config = write_lm_config(lm, tmp_path / "run")
    main(["merge", "--config", str(config), "--method", "task_arithmetic", "--method_args", '{"scale": 1.0}'])
    (run,) = sorted((tmp_path / "run" / "lightning_logs").iterdir())
    merged = load_file(run / "merged" / "model.safetensors")
    expert = load_file(lm.experts["alpha"] / "model.safetensors")
    assert merged.keys() == expert.keys()
    for name, value in merged.items():
        torch.testing.assert_close(value, expert[name], atol=1e-6, rtol=0)
    report = json.loads((run / "report.json").read_text())
    # the merged model is the expert: it answers exactly as the cached expert answers did
    assert report["tasks"]["alpha"]["merged"] == report["tasks"]["alpha"]["expert"] > 0.5


def test_greedy_answers_ignore_the_folders_generation_config(tmp_path):
    """A base whose generation_config.json sets a repetition penalty, an n-gram ban and a minimum
    length: the cached answer at every position is still the argmax of the cached distribution."""
    from transformers import GenerationConfig

    lm = build_lm_setup(tmp_path, "gpt2")
    for folder in [lm.base, *lm.experts.values()]:
        GenerationConfig(
            repetition_penalty=5.0, no_repeat_ngram_size=1, min_new_tokens=3, bos_token_id=1, eos_token_id=1
        ).save_pretrained(folder)
    module, _ = fit_lm(lm, max_new_tokens=6)
    assert module.frozen.base_model.generation_config.repetition_penalty == 5.0  # the folder's, kept
    for row in range(len(module.teachers.answer_len)):
        n = int(module.teachers.answer_len[row])
        top = module.teachers.logprobs[row, :n].argmax(-1)
        assert top.tolist() == module.teachers.answer_ids[row, :n].tolist()
    assert (module.teachers.answer_len < 3).any(), "min_new_tokens=3 of the folder must not lengthen answers"


@pytest.mark.parametrize("strategy", ["ddp", "sharded"])
def test_two_processes_share_the_lm_teachers_and_learn_what_one_learns(tmp_path, strategy):
    """Sharded: the LM (its tied embedding and head too) is cut across the processes."""
    import subprocess
    import sys

    from .test_sharding import TWO_PROCESSES

    lm = build_lm_setup(tmp_path, "gpt2")
    single = write_lm_config(lm, tmp_path / "single", teacher_cache=str(tmp_path / "one"), top_k=4)
    main(["fit", "--config", str(single)])
    config = write_lm_config(lm, tmp_path / "ddp", teacher_cache=str(tmp_path / "two"), top_k=4)
    done = subprocess.run(
        [
            sys.executable, "-m", "divmerge_pl.cli", "fit", "--config", str(config), *TWO_PROCESSES[strategy],
        ],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # each rank answered every other prompt; gathered, the one cache holds the single process's
    one, two = (
        sorted((tmp_path / "one").glob("*.safetensors")),
        sorted((tmp_path / "two").glob("*.safetensors")),
    )
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 2
    for a, b in zip(one, two, strict=True):
        alone, split = load_file(a), load_file(b)
        assert alone.keys() == split.keys()
        for key in alone:
            if alone[key].dtype.is_floating_point:
                torch.testing.assert_close(split[key], alone[key], atol=1e-5, rtol=0)
            else:
                assert torch.equal(split[key], alone[key]), key  # the same greedy answers

    def final(folder: Path) -> torch.Tensor:
        (run,) = sorted((folder / "lightning_logs").iterdir())
        return torch.tensor(json.loads((run / "coefficients.json").read_text())["values"])

    torch.testing.assert_close(final(tmp_path / "ddp"), final(tmp_path / "single"), atol=1e-4, rtol=0)
