"""Fine-tuning of the LM experts (the LM demo's and the quality benchmark's causal-LM arm):
epochs resumed after a kill, and bf16-mixed matmuls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from divmerge_pl.demo import lm
from divmerge_pl.demo.tasks import prepare_task
from divmerge_pl.tasks import TaskSpec

from .lm_setup import make_lm
from .test_demo import fake_archives

SETTINGS = dict(epochs=3, patience=5, lr=3e-3, max_length=16, val_rows=12, test_rows=16, show_progress=False)


@pytest.fixture
def lm_task(tmp_path: Path) -> tuple[Path, TaskSpec, Path]:
    root = tmp_path / "cache"
    fake_archives(root / "archives")
    base = root / "models" / "base"
    make_lm(base, "gpt2", seed=0)
    folder = prepare_task(root, "bbc_news", 40, 16, 16, seed=0)
    spec = TaskSpec(
        name="bbc_news", train_files=str(folder / "val.jsonl"), prompt="{text} answer :",
        label_words=["business", "sport"], num_samples=1,
    )  # fmt: skip
    return base, spec, folder


def kill_in_the_second_epoch(base: Path, spec: TaskSpec, folder: Path, out: Path, monkeypatch) -> None:
    """A fine-tuning killed while scoring epoch 2: epoch 1's state is on disk, epoch 2's is not."""
    scored = lm.answer_score
    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return scored(*args, **kwargs)

    monkeypatch.setattr(lm, "answer_score", killed)
    with pytest.raises(KeyboardInterrupt):
        lm.finetune_lm_expert(base, spec, folder, out, **SETTINGS)
    assert lm.epoch_state_file(out).is_file() and not out.exists()
    monkeypatch.setattr(lm, "answer_score", scored)


def test_a_killed_fine_tuning_resumes_after_its_last_epoch_and_ends_as_an_unbroken_one(
    lm_task, tmp_path: Path, monkeypatch, capsys
):
    base, spec, folder = lm_task
    unbroken = lm.finetune_lm_expert(base, spec, folder, tmp_path / "unbroken", **SETTINGS)

    out = tmp_path / "resumed"
    kill_in_the_second_epoch(base, spec, folder, out, monkeypatch)

    capsys.readouterr()
    resumed = lm.finetune_lm_expert(base, spec, folder, out, **SETTINGS)
    log = capsys.readouterr().out
    assert "resumed after epoch 1" in log and "epoch 1 of 3" not in log  # epoch 1 is not run again
    assert "epoch 3 of 3, val" in log  # a background run's log says where it stands
    assert resumed["val_accuracy_per_epoch"] == unbroken["val_accuracy_per_epoch"]
    assert resumed["eval_accuracy_first_16"] == unbroken["eval_accuracy_first_16"]
    ours, theirs = (
        load_file(out / "model.safetensors"),
        load_file(tmp_path / "unbroken" / "model.safetensors"),
    )
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=1e-6)
    assert not lm.epoch_state_file(out).exists()  # a finished expert keeps no state
    assert lm.finetune_lm_expert(base, spec, folder, out, **SETTINGS) == resumed  # reused, as trained


def test_a_state_saved_with_other_settings_is_not_resumed(lm_task, tmp_path: Path, monkeypatch, capsys):
    base, spec, folder = lm_task
    out = tmp_path / "expert"
    kill_in_the_second_epoch(base, spec, folder, out, monkeypatch)
    capsys.readouterr()
    other = lm.finetune_lm_expert(base, spec, folder, out, **{**SETTINGS, "lr": 1e-3})
    assert "resumed" not in capsys.readouterr().out
    assert other["epochs_run"] == 3 and other["settings"]["lr"] == 1e-3
    # a finished expert is reused only for its own settings: asked for others, it is trained again
    again = lm.finetune_lm_expert(base, spec, folder, out, **SETTINGS)
    assert again["settings"]["lr"] == SETTINGS["lr"] and again["val_accuracy_per_epoch"] != []


def test_bf16_mixed_fine_tuning_runs_its_matmuls_in_bfloat16_and_keeps_float32_weights(
    lm_task, tmp_path: Path
):
    base, spec, folder = lm_task
    settings = {**SETTINGS, "epochs": 1}
    full = lm.finetune_lm_expert(base, spec, folder, tmp_path / "fp32", **settings)
    mixed = lm.finetune_lm_expert(base, spec, folder, tmp_path / "bf16", precision="bf16-mixed", **settings)
    assert mixed["settings"]["precision"] == "bf16-mixed" and "precision" not in full["settings"]
    ours, theirs = (
        load_file(tmp_path / "bf16" / "model.safetensors"),
        load_file(tmp_path / "fp32" / "model.safetensors"),
    )
    assert all(t.dtype == torch.float32 for t in ours.values())
    gaps = [(ours[n] - t).abs().max().item() for n, t in theirs.items() if n.endswith("attn.c_attn.weight")]
    assert 0 < max(gaps) < 0.1  # other roundings, the same training
    with pytest.raises(ValueError, match="precision 'bf16'"):
        lm.finetune_lm_expert(base, spec, folder, tmp_path / "bad", precision="bf16", **settings)
