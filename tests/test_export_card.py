"""A publishable ``merged/<task>/``: model card, dtype, shards, file modes, Hub upload."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForSequenceClassification, BertForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule, MergedModelExport, TaskSpec
from divmerge_pl.cli import main
from divmerge_pl.export import export_dtype, hub_repo_ids, stored_dtype

from .conftest import build_setup, tiny_config
from .test_fit import run_dir, write_config

TASKS = ("alpha", "beta")


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def yaml_block(text: str) -> dict:
    (block,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return yaml.safe_load(block)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_cli_run_writes_a_card_per_task_with_scores_and_a_recipe(tmp_path, umask_022):
    tiny = build_setup(tmp_path, {"alpha": 2, "beta": 3})
    out = tmp_path / "run"
    main(["fit", "--config", str(write_config(tiny, out, epochs=1))])
    run = run_dir(out)
    report = json.loads((run / "report.json").read_text())
    for task in TASKS:
        card = ModelCard.load(run / "merged" / task / "README.md")
        assert card.data.library_name == "transformers"
        assert "merge" in card.data.tags and card.data.pipeline_tag == "text-classification"
        assert f"`{tiny.base}`" in card.text
        for other, folder in tiny.experts.items():
            assert f"| expert `{other}` | `{folder}` |" in card.text
        assert f"`{report['method']}`" in card.text
        assert '| objective | `"js"` |' in card.text and '| granularity | `"layer"` |' in card.text
        for other, row in report["tasks"].items():  # the whole table, this task's row marked
            name = f"**{other}** (this model)" if other == task else other
            assert f"| {name} | accuracy | {row['expert']:.4f} | {row['merged']:.4f} |" in card.text
        assert f'AutoModelForSequenceClassification.from_pretrained("merged/{task}")' in card.text
        assert "divmerge-pl fit --config recipe.yaml" in card.text
        recipe = yaml_block(card.text)
        assert recipe == yaml.safe_load((run / "config.yaml").read_text())  # the run's resolved config
        assert recipe["model"]["init_args"]["objective"] == "js"
        assert recipe["model"]["init_args"]["granularity"] == "layer"
        assert recipe["model"]["init_args"]["experts"] == {t: str(p) for t, p in tiny.experts.items()}
        assert recipe["trainer"]["max_epochs"] == 1
    # readable by others, as save_pretrained leaves files, not tempfile's 0600 / 0700
    assert mode(run / "merged") == 0o755 and mode(run / "merged" / "alpha") == 0o755
    for path in [run / "report.json", run / "coefficients.json", *(run / "merged").rglob("*.*")]:
        assert mode(path) == 0o644, path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One short fit exported three ways at the same coefficients: float32 (the experts' dtype),
    bfloat16, and float32 in small shards."""
    root = tmp_path_factory.mktemp("export")
    tiny = build_setup(root, {"alpha": 2, "beta": 3})
    module = DivMergeModule(
        base=str(tiny.base), experts={t: str(p) for t, p in tiny.experts.items()}, teacher_cache=None
    )
    data = MergeDataModule(
        [TaskSpec(**s) for s in tiny.task_specs(num_samples=16)],
        tokenizer=str(tiny.base),
        batch_size=8,
        max_length=16,
    )
    folders = {kind: root / kind for kind in ("plain", "bf16", "sharded")}
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[
            MergedModelExport(dirpath=str(folders["plain"])),
            MergedModelExport(dirpath=str(folders["bf16"]), dtype="bfloat16"),
            MergedModelExport(dirpath=str(folders["sharded"]), max_shard_size="40KB"),
        ],
    )
    trainer.fit(module, datamodule=data)
    return module, trainer, folders


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    return {n: t.detach() for n, t in model.state_dict().items()}


def test_bfloat16_export_is_the_float32_merge_rounded(exported):
    _, _, folders = exported
    for task in TASKS:
        plain, bf16 = folders["plain"] / "merged" / task, folders["bf16"] / "merged" / task
        assert json.loads((plain / "config.json").read_text())["dtype"] == "float32"
        assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
        with safe_open(str(bf16 / "model.safetensors"), "pt") as handle:
            kinds = {handle.get_slice(name).get_dtype() for name in handle.keys()}  # noqa: SIM118
        assert kinds == {"BF16"}
        assert (bf16 / "model.safetensors").stat().st_size < 0.6 * (
            plain / "model.safetensors"
        ).stat().st_size
        full, rounded = tensors_of(plain), tensors_of(bf16)
        assert set(full) == set(rounded)
        for name, value in full.items():
            if value.is_floating_point():
                assert rounded[name].dtype == torch.bfloat16
                assert torch.equal(rounded[name], value.to(torch.bfloat16)), name
        assert "weights are stored in `bfloat16`" in (bf16 / "README.md").read_text()


def test_small_shards_load_to_the_same_weights(exported):
    _, _, folders = exported
    for task in TASKS:
        sharded = folders["sharded"] / "merged" / task
        shards = sorted(sharded.glob("model-*.safetensors"))
        index = json.loads((sharded / "model.safetensors.index.json").read_text())
        assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
        assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
        assert all(s.stat().st_size < 60_000 for s in shards)  # 40KB each, a big tensor alone more
        full, loaded = tensors_of(folders["plain"] / "merged" / task), tensors_of(sharded)
        assert set(full) == set(loaded)
        assert all(torch.equal(full[n], loaded[n]) for n in full)
        assert (sharded / "README.md").is_file()


def test_push_to_hub_uploads_each_folder_with_its_card(exported, tmp_path, monkeypatch):
    module, trainer, _ = exported
    created, uploaded = [], []

    def create_repo(self, repo_id, **kwargs):
        created.append((repo_id, kwargs.get("private"), kwargs.get("exist_ok")))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded.append((repo_id, folder, files, (folder / "README.md").read_text()))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest keeps tests offline; the upload is intercepted
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    export = MergedModelExport(dirpath=str(tmp_path / "pushed"), push_to_hub="someone/tiny-merge-{task}")
    export.on_fit_start(trainer, module)
    export.export(trainer, module)

    assert created == [(f"someone/tiny-merge-{t}", True, True) for t in TASKS]
    assert [u[0] for u in uploaded] == [f"someone/tiny-merge-{t}" for t in TASKS]
    for (repo_id, folder, files, card), task in zip(uploaded, TASKS, strict=True):
        assert folder == tmp_path / "pushed" / "merged" / task  # the final folder, not a temporary one
        assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert f'from_pretrained("{repo_id}")' in card and f"**{task}** (this model)" in card


def test_push_to_hub_settings_are_checked_before_the_run(exported, tmp_path, monkeypatch):
    assert hub_repo_ids("me/m-{task}", ["a", "b"]) == {"a": "me/m-a", "b": "me/m-b"}
    assert hub_repo_ids("me/lm-{task}", ["a", "b"], one_model=True) == {"": "me/lm-a-b"}
    with pytest.raises(ValueError, match=r"put \{task\} in it"):
        hub_repo_ids("me/merged", ["a", "b"])
    with pytest.raises(ValueError, match="needs export.save_weights"):
        MergedModelExport(push_to_hub="me/m-{task}", save_weights=False)
    module, trainer, _ = exported
    export = MergedModelExport(dirpath=str(tmp_path / "never"), push_to_hub="me/m-{task}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    with pytest.raises(ValueError, match="no Hugging Face token; set HF_TOKEN"):
        export.on_fit_start(trainer, module)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="the Hub is switched off"):
        export.on_fit_start(trainer, module)
    with pytest.raises(ValueError, match="'me/m-alpha b' .task 'alpha'. is not a Hub repo id"):
        MergedModelExport(dirpath=str(tmp_path / "never"), push_to_hub="me/m-{task} b").on_fit_start(
            trainer, module
        )


def test_default_dtype_is_the_experts_own(tmp_path):
    configs, folders = {}, {}
    for task, dtype in (("a", torch.bfloat16), ("b", torch.bfloat16)):
        folders[task] = tmp_path / task
        BertForSequenceClassification(tiny_config()).to(dtype).save_pretrained(folders[task])
        configs[task] = AutoConfig.from_pretrained(folders[task])
    assert export_dtype(None, configs, folders) == "bfloat16"
    assert export_dtype("float16", configs, folders) == "float16"
    with pytest.raises(ValueError, match="export.dtype 'int8' is not one of float32, bfloat16, float16"):
        export_dtype("int8", configs, folders)
    configs["a"].dtype = None  # a config without dtype: the weights' header says it
    assert stored_dtype(configs["a"], folders["a"]) == "bfloat16"
    folders["c"] = tmp_path / "c"
    BertForSequenceClassification(tiny_config()).save_pretrained(folders["c"])
    configs["c"] = AutoConfig.from_pretrained(folders["c"])
    assert export_dtype(None, configs, folders) == "float32"  # experts differ: float32


def test_one_causal_lm_folder_gets_its_card_and_one_repo(tmp_path, monkeypatch, umask_022):
    """A causal LM merge is ``merged/`` itself: the card lies there, and is what is pushed."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    from divmerge_pl.export import push_folders, write_outputs
    from divmerge_pl.model_card import MergeFacts, hub_id, model_card

    from .lm_setup import lm_config, save_lm_tokenizer

    tokenizer = save_lm_tokenizer(tmp_path / "tok")
    model = GPT2LMHeadModel(lm_config("gpt2", len(tokenizer)))
    report = {
        "metric": "accuracy",
        "method": "ties",
        "tasks": {t: {"expert": 0.8, "merged": 0.6, "normalized": 0.75, "metric": "accuracy"} for t in TASKS},
        "average": {"expert": 0.8, "merged": 0.6, "normalized": 0.75},
        "settings": {"kind": "static", "params": {"density": 0.1, "scale": 1.8}},
        "params": {"density": 0.1, "scale": 1.8},
    }
    snapshots = [f"/cache/models--org--{name}/snapshots/0a1b" for name in ("base", "alpha", "beta")]
    assert [hub_id(p) for p in snapshots] == ["org/base", "org/alpha", "org/beta"]
    assert hub_id("/work/experts/alpha") is None
    facts = MergeFacts("org/base", {t: f"org/{t}" for t in TASKS}, report, "model: {}\n",
                       "AutoModelForCausalLM", "bfloat16", is_causal_lm=True,
                       hub_ids=tuple(hub_id(p) for p in snapshots))  # fmt: skip
    repo_ids = hub_repo_ids("me/lm-{task}", TASKS, one_model=True)
    written = write_outputs(
        tmp_path / "run", [("", model)], None, report, tokenizer, dtype="bfloat16",
        card=lambda task: model_card(facts, task or None, repo_ids[task]),
    )  # fmt: skip
    assert written == {"": tmp_path / "run" / "merged" / ""}
    card = ModelCard.load(tmp_path / "run" / "merged" / "README.md")
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == ["org/base", "org/alpha", "org/beta"]
    assert card.data.base_model_relation == "merge"
    assert "| base (theta0) | `org/base` |" in card.text and "| expert `beta` | `org/beta` |" in card.text
    assert "one merged causal language model serving every task" in card.text
    assert "(this model)" not in card.text and "| alpha | accuracy | 0.8000 | 0.6000 | 0.7500 |" in card.text
    assert "divmerge-pl merge --config recipe.yaml --method ties" in card.text
    assert """--method_args '{"density": 0.1, "scale": 1.8}'""" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/lm-alpha-beta")' in card.text
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged")
    assert loaded.dtype == torch.bfloat16
    assert mode(tmp_path / "run" / "merged" / "model.safetensors") == 0o644

    uploads = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: None)
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: uploads.append(kw) or "url")
    assert push_folders(written, repo_ids, private=True) == {"": "url"}
    assert [(u["repo_id"], Path(u["folder_path"])) for u in uploads] == [
        ("me/lm-alpha-beta", tmp_path / "run" / "merged")
    ]
