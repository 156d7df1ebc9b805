"""Safe by default: no resuming another merge's checkpoint, no pickles executed, cheap checks of
the models before the data is read; each failure names the culprit and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM

from divmerge_pl.cli import console, main
from divmerge_pl.experts import load_experts
from divmerge_pl.preflight import ExpertMismatchError

from .test_errors import no_model_loads, writes_nothing  # noqa: F401 (fixture)
from .test_fit import run_dir, write_config


@pytest.fixture
def no_data_read(monkeypatch):
    """Model checks must fail before any data file is read or tokenised."""
    from divmerge_pl import data as data_file

    monkeypatch.setattr(data_file, "read_rows", lambda *a: pytest.fail("data was read before the models"))


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("--model.init_args.granularity=task", "granularity: 'layer' in the checkpoint, 'task' now"),
        ("--model.init_args.objective=kl", "objective: 'js' in the checkpoint, 'kl' now"),
        ("--model.init_args.lr=0.001", "lr: 0.01 in the checkpoint, 0.001 now"),
        ("--model.init_args.init=0.3", "init: None in the checkpoint, 0.3 now"),
        ("--model.init_args.clamp=[0.0,1.0]", "clamp: None in the checkpoint, [0.0, 1.0] now"),
        ("--model.init_args.task_vector_transform=ties", "task_vector_transform: 'none'"),
        ("--model.init_args.task_vector_dtype=bfloat16", "task_vector_dtype: 'float32'"),
        ("--model.init_args.task_weighting=relative", "task_weighting: 'sum' in the checkpoint, 'relative'"),
    ],
    ids=["granularity", "objective", "lr", "init", "clamp", "transform", "dtype", "weighting"],
)
def test_resuming_with_other_merge_settings_is_refused_before_models_load(tiny, monkeypatch, option, key):
    folder = tiny.root / "run"
    main(["fit", "--config", str(write_config(tiny, folder, epochs=1))])
    from divmerge_pl import module as module_file

    monkeypatch.setattr(module_file, "load_experts", lambda *a, **k: pytest.fail("models were loaded"))
    config = str(write_config(tiny, folder, epochs=2))
    for ckpt in ("last", str(run_dir(folder) / "checkpoints" / "last.ckpt")):
        with writes_nothing(tiny.root), pytest.raises(ValueError, match="other settings") as info:
            main(["fit", "--config", config, option, "--ckpt_path", ckpt])
        message = str(info.value)
        assert key in message and "default_root_dir" in message and "--model.init_args." in message


def test_resuming_with_the_same_settings_still_works(tiny):
    folder = tiny.root / "run"
    main(["fit", "--config", str(write_config(tiny, folder, epochs=1))])
    main(["fit", "--config", str(write_config(tiny, folder, epochs=2)), "--ckpt_path", "last"])
    assert len(list((folder / "lightning_logs").iterdir())) == 2


def test_python_fit_with_a_checkpoint_of_other_settings_is_refused(tiny):
    import lightning as L

    from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec

    folder = tiny.root / "run"
    main(["fit", "--config", str(write_config(tiny, folder, epochs=1))])
    checkpoint = run_dir(folder) / "checkpoints" / "last.ckpt"
    module = DivMergeModule(**tiny.model_args(granularity="task"))
    data = MergeDataModule(
        [TaskSpec(**t) for t in tiny.task_specs()], batch_size=8, max_length=16, tokenizer=str(tiny.base)
    )
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_progress_bar=False, default_root_dir=tiny.root / "b"
    )
    with (
        writes_nothing(tiny.root),
        pytest.raises(ValueError, match="granularity: 'layer' in the checkpoint, 'task' now"),
    ):
        trainer.fit(module, datamodule=data, ckpt_path=str(checkpoint))


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / ".." / "PWNED",))


def test_a_checkpoint_holding_code_is_never_unpickled(tiny, tmp_path):
    marker = Path(__file__).parent / ".." / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"coefficients": torch.zeros(1)}, "payload": _Payload()}, evil)
    config = str(write_config(tiny, tiny.root / "run", epochs=1))
    with writes_nothing(tiny.root), pytest.raises(ValueError, match=r"evil\.ckpt.*never unpickled"):
        main(["fit", "--config", config, "--ckpt_path", str(evil)])
    assert not marker.exists()


def _as_pickle(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def test_resuming_follows_the_typed_command_not_the_checkpoints_other_options(tiny):
    # allow_pickle is not a merge setting, but a checkpoint of a run that allowed pickles must not
    # allow them for the resumed run: Lightning would apply the checkpoint's hyper-parameters
    folder = tiny.root / "run"
    main(["fit", "--config", str(write_config(tiny, folder, epochs=1, allow_pickle=True))])
    _as_pickle(tiny.experts["beta"])
    config = str(write_config(tiny, folder, epochs=2))
    with pytest.raises(ExpertMismatchError, match=r"expert 'beta'.*pytorch_model\.bin.*allow_pickle: true"):
        main(["fit", "--config", config, "--ckpt_path", "last"])
    other_cache = tiny.root / "other_cache"
    main(["fit", "--config", config, "--ckpt_path", "last", "--model.init_args.allow_pickle=true",
          f"--model.init_args.teacher_cache={other_cache}"])  # fmt: skip
    assert sorted(other_cache.glob("*.safetensors"))  # the typed cache was used, not the checkpoint's


def test_pickled_expert_is_refused_unless_allowed(tiny, no_data_read):
    _as_pickle(tiny.experts["beta"])
    config = str(write_config(tiny, tiny.root / "run", epochs=1))
    with (
        writes_nothing(tiny.root),
        pytest.raises(ExpertMismatchError, match=r"expert 'beta'.*pytorch_model\.bin.*allow_pickle: true"),
    ):
        main(["fit", "--config", config])


def test_allow_pickle_loads_the_same_task_vectors(tiny):
    safe = load_experts(str(tiny.base), {t: str(p) for t, p in tiny.experts.items()})
    _as_pickle(tiny.experts["beta"])
    with pytest.raises(ExpertMismatchError, match="pickles"):
        load_experts(str(tiny.base), {t: str(p) for t, p in tiny.experts.items()})
    loaded = load_experts(str(tiny.base), {t: str(p) for t, p in tiny.experts.items()}, allow_pickle=True)
    assert loaded.fingerprints == safe.fingerprints
    for name, stack in safe.task_vectors.items():
        torch.testing.assert_close(loaded.task_vectors[name], stack, rtol=0, atol=0)


def test_a_typo_in_an_expert_path_fails_before_the_data_is_read(tiny, no_data_read):
    config = write_config(tiny, tiny.root / "run", epochs=1)
    text = config.read_text().replace(str(tiny.experts["beta"]), str(tiny.experts["beta"]) + "x")
    config.write_text(text)
    with (
        writes_nothing(tiny.root),
        pytest.raises(FileNotFoundError, match=r"expert 'beta': model folder .*betax.* does not exist"),
    ):
        main(["fit", "--config", str(config)])


def test_a_masked_lm_base_is_named_with_the_likely_cause_and_fix(tiny, no_data_read):
    masked = tiny.root / "masked_base"
    BertForMaskedLM.from_pretrained(tiny.base).save_pretrained(masked)  # no pooler is saved
    config = write_config(tiny, tiny.root / "run", epochs=1)
    config.write_text(config.read_text().replace(f"base: {tiny.base}", f"base: {masked}"))
    with (
        writes_nothing(tiny.root),
        pytest.raises(ExpertMismatchError, match=r"model.base .*lacks .*pooler.*BertForMaskedLM.*Fix:"),
    ):
        main(["fit", "--config", str(config)])


def test_an_expert_of_other_sizes_is_named_from_its_header(tiny, no_data_read):
    state = load_file(tiny.experts["alpha"] / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    state[name] = state[name][:40]
    save_file(state, tiny.experts["alpha"] / "model.safetensors", metadata={"format": "pt"})
    config = str(write_config(tiny, tiny.root / "run", epochs=1))
    with (
        writes_nothing(tiny.root),
        pytest.raises(ExpertMismatchError, match=r"expert 'alpha'.*layer\.1\.intermediate.*\(40, 32\)"),
    ):
        main(["fit", "--config", config])


def test_the_command_prints_one_line_not_a_traceback(tiny, monkeypatch, capsys):
    config = write_config(tiny, tiny.root / "run", epochs=1)
    config.write_text(config.read_text().replace(str(tiny.experts["beta"]), "/nowhere/beta"))
    monkeypatch.setattr("sys.argv", ["divmerge-pl", "fit", "--config", str(config)])
    monkeypatch.delenv("DIVMERGE_TRACEBACK", raising=False)
    with writes_nothing(tiny.root), pytest.raises(SystemExit) as info:
        console()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "divmerge-pl: error: expert 'beta': model folder '/nowhere/beta' does not exist" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"eval_files": "nowhere.jsonl"},
            r"task 'beta': data file .*nowhere\.jsonl.* \(eval_files\) does not exist",
        ),
        (
            {"text_fields": ["sentence"]},
            r"task 'beta': field 'sentence' not found .*columns there: \['text', 'label'\]",
        ),
        ({"label_field": "gold"}, r"task 'beta': field 'gold' not found .* \(eval_files\)"),
        ({"train_files": "rows.xlsx"}, r"task 'beta': data file .*rows\.xlsx.* must be one of"),
    ],
    ids=["missing-eval-file", "missing-field", "missing-label", "unknown-format"],
)
def test_the_last_tasks_files_are_checked_before_any_task_is_read(tiny, no_data_read, edit, message):
    (tiny.root / "rows.xlsx").write_bytes(b"PK")
    config = write_config(tiny, tiny.root / "run", epochs=1)
    data = yaml.safe_load(config.read_text())
    beta = data["data"]["init_args"]["tasks"][1]
    beta.update({k: str(tiny.root / v) if k.endswith("files") else v for k, v in edit.items()})
    config.write_text(yaml.safe_dump(data))
    with writes_nothing(tiny.root), pytest.raises((ValueError, FileNotFoundError), match=message):
        main(["fit", "--config", str(config)])
