"""The causal LM demo's pipeline (data -> LM experts that answer label words -> merge), offline.

The SmolLM2 GGUF wheel is not read here (that needs gguf and accelerate, and 100 MB): a tiny
GPT-2 stands where the de-quantised base is cached, and stand-in archives hold the tasks' data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from divmerge_pl.cli import main

from .lm_setup import make_lm
from .test_demo import fake_archives


def demo_lm_config(root: Path, run: Path) -> Path:
    """configs/demo_lm.yaml with its cache moved to ``root`` and small sizes."""
    config = yaml.safe_load(Path("configs/demo_lm.yaml").read_text())
    config = json.loads(json.dumps(config).replace("~/.cache/divmerge_pl/demo_lm", str(root)))
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    model["teacher_cache"] = str(root / "teachers")
    words = {"amazon_reviews": ["bad", "good"], "bbc_news": ["business", "sport"]}  # the stand-ins' classes
    for task in data["tasks"]:
        task.update(num_samples=16, label_words=words[task["name"]], prompt="{text} answer :")
    data.update(train_size=44, val_size=16, test_size=16, finetune_lr=0.003, finetune_epochs=4)
    data.update(finetune_max_length=16)
    data.update(max_length=16)
    config["trainer"].update(max_epochs=1, default_root_dir=str(run), enable_progress_bar=False)
    config["trainer"]["check_val_every_n_epoch"] = 1
    path = run / "demo_lm.yaml"
    run.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_lm_demo_fine_tunes_label_word_experts_then_merges_them(tmp_path: Path, monkeypatch):
    from divmerge_pl.demo import packages

    monkeypatch.setattr(packages.subprocess, "run", lambda *a, **k: pytest.fail(f"download: {a}"))
    root = tmp_path / "cache"
    fake_archives(root / "archives")
    make_lm(root / "models" / "base", "gpt2", seed=0)  # where the de-quantised SmolLM2 is cached
    main(["fit", "--config", str(demo_lm_config(root, tmp_path / "run"))])

    (report_file,) = (tmp_path / "run").rglob("report.json")
    report = json.loads(report_file.read_text())
    for task in ("amazon_reviews", "bbc_news"):
        summary = json.loads((root / "experts" / task / "finetune.json").read_text())
        # the stand-in tasks are easy: fine-tuning taught the expert its label words
        assert summary["eval_accuracy_first_100"] >= 0.7
        # the fine-tuning script and the merge's teachers score the expert independently
        assert report["tasks"][task]["expert"] == pytest.approx(summary["eval_accuracy_first_100"], abs=1e-6)
    assert (report_file.parent / "merged" / "config.json").is_file()


def test_lm_demo_names_a_task_whose_label_words_do_not_fit(tmp_path: Path):
    root = tmp_path / "cache"
    fake_archives(root / "archives")
    make_lm(root / "models" / "base", "gpt2", seed=0)
    path = demo_lm_config(root, tmp_path / "run")
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"]["tasks"][1]["label_words"] = ["business", "sport", "tech"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"bbc_news.*give one label word for each"):
        main(["fit", "--config", str(path)])
