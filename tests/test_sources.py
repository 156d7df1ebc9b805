"""A task's inputs from files of every format, ``save_to_disk`` folders and Hub datasets (laid
out in a hub cache in ``tmp_path``, offline): the same rows as the equivalent csv, and errors
that name the task and the source."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict

from divmerge_pl.cli import main
from divmerge_pl.sources import DatasetSource
from divmerge_pl.tasks import check_files, read_rows

from .test_fit import run_dir, write_config

ROWS = [
    {"text": "good, tasty food", "label": 1},
    {"text": 'a "bland" film', "label": 0},
    {"text": "win, win, win", "label": 1},
    {"text": "cold rain", "label": 0},
]
OTHER = [{"text": "sun", "label": 1}]
COLUMNS = ["text", "label"]
COMMIT = "c" * 40
OLDER = "d" * 40


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def dataset_repo(folder: Path) -> Path:
    """A dataset repository as on the Hub: data files and a card whose ``configs`` name them."""
    write_csv(folder / "plain" / "train.csv", OTHER)
    write_csv(folder / "plain" / "validation.csv", ROWS)
    write_csv(folder / "other" / "train.csv", OTHER + OTHER)
    card = {
        "configs": [
            {
                "config_name": "plain",
                "data_files": [
                    {"split": "train", "path": "plain/train.csv"},
                    {"split": "validation", "path": "plain/validation.csv"},
                ],
            },
            {"config_name": "other", "data_files": [{"split": "train", "path": "other/train.csv"}]},
        ]
    }
    (folder / "README.md").write_text(f"---\n{yaml.safe_dump(card)}---\n# tiny\n")
    return folder


@pytest.fixture
def hub_datasets(tmp_path, monkeypatch) -> Path:
    """An offline hub cache holding the dataset ``org/tiny`` (``datasets--org--tiny``)."""
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    repo = cache / "datasets--org--tiny"
    dataset_repo(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    older = dataset_repo(repo / "snapshots" / OLDER)  # an earlier commit, no branch points at
    write_csv(older / "plain" / "train.csv", ROWS[:2])
    return cache


def test_tsv_txt_and_saved_folders_give_the_rows_of_the_csv(tmp_path):
    reference = read_rows("alpha", str(write_csv(tmp_path / "rows.csv", ROWS)), COLUMNS).to_list()
    assert reference == ROWS
    tsv = write_csv(tmp_path / "rows.tsv", ROWS, delimiter="\t")
    assert read_rows("alpha", str(tsv), COLUMNS).to_list() == reference
    txt = tmp_path / "rows.txt"
    txt.write_text("".join(r["text"] + "\n" for r in ROWS))
    assert read_rows("alpha", str(txt), ["text"]).to_list() == [{"text": r["text"]} for r in ROWS]

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert read_rows("alpha", str(tmp_path / "single"), COLUMNS).to_list() == reference
    assert read_rows("alpha", {"path": str(tmp_path / "single")}, COLUMNS).to_list() == reference
    DatasetDict({"train": Dataset.from_list(OTHER), "validation": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "splits")
    )
    both = {"path": str(tmp_path / "splits"), "split": "validation"}
    assert read_rows("alpha", both, COLUMNS).to_list() == reference
    assert read_rows("alpha", {**both, "split": "train"}, COLUMNS).to_list() == OTHER


def test_a_hub_dataset_is_read_offline_from_the_hub_cache(hub_datasets):
    plain = DatasetSource(path="org/tiny", name="plain", split="validation")
    assert read_rows("alpha", plain, COLUMNS).to_list() == ROWS
    assert read_rows("alpha", {"path": "org/tiny", "name": "other", "split": "train"}, COLUMNS).to_list() == (
        OTHER + OTHER
    )
    pinned = DatasetSource(path=f"org/tiny@{COMMIT}", name="plain", split="train")
    assert read_rows("alpha", pinned, COLUMNS).to_list() == OTHER
    sliced = {"path": "org/tiny", "name": "plain", "split": "validation[:2]"}
    assert read_rows("alpha", sliced, COLUMNS).to_list() == ROWS[:2]
    older = DatasetSource(path=f"org/tiny@{OLDER}", name="plain", split="train")
    assert read_rows("alpha", older, COLUMNS).to_list() == ROWS[:2]


def test_a_local_dataset_repository_folder_is_read_as_load_dataset_reads_it(tmp_path):
    folder = dataset_repo(tmp_path / "repo")
    source = {"path": str(folder), "name": "plain", "split": "validation"}
    assert read_rows("alpha", source, COLUMNS).to_list() == ROWS


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"path": "org/missing", "split": "train"},
            r"\(eval_files\): 'org/missing' is not a local",
        ),
        ({"path": "org/tiny", "name": "plain", "split": "test"}, r"no split 'test'; splits there: \['train'"),
        ({"path": "org/tiny", "name": "plain"}, r"'org/tiny', name 'plain' \(eval_files\) needs a split"),
        (
            {"path": "org/tiny", "name": "nope", "split": "train"},
            r"cannot open dataset 'org/tiny', name 'nope'",
        ),
        (
            {"path": "SPLITS"},
            r"dataset '.*splits' \(eval_files\) needs a split; splits there: \['train', 'valid",
        ),
        ({"path": "SPLITS", "split": "dev"}, r"has no split 'dev'; splits there: \['train', 'validation'\]"),
        ({"path": "SINGLE", "split": "train"}, r"single saved Dataset, without splits; leave split out"),
        ({"path": "SPLITS", "split": "train", "columns": 1}, r"not a dataset: .*unknown key 'columns'"),
        ("stanfordnlp/sst2", r"data file 'stanfordnlp/sst2' \(eval_files\) does not exist; a Hub dataset is"),
        (["SPLITS", "rows.csv"], r"is a folder in a list of files; give a saved or repository dataset"),
    ],
    ids=[
        "hub-missing",
        "hub-split",
        "hub-no-split",
        "hub-config",
        "no-split",
        "bad-split",
        "single",
        "key",
        "id",
        "folder-in-list",
    ],
)
def test_bad_sources_are_named_with_the_task_before_reading(tmp_path, hub_datasets, source, message):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    DatasetDict({"train": Dataset.from_list(OTHER), "validation": Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "splits")
    )
    if isinstance(source, dict) and source["path"] in ("SPLITS", "SINGLE"):
        source = {**source, "path": str(tmp_path / source["path"].lower())}
    if isinstance(source, list):
        source = [str(tmp_path / s.lower()) for s in source]
    with pytest.raises((ValueError, FileNotFoundError), match=r"task 'alpha'.*" + message):
        check_files("alpha", source, COLUMNS, "eval_files")


def test_a_missing_hub_dataset_offline_says_how_to_get_it(hub_datasets):
    with pytest.raises(FileNotFoundError) as info:
        check_files("beta", {"path": "org/missing", "split": "train"}, COLUMNS, "train_files")
    message = str(info.value)
    for part in ("task 'beta' (train_files)", "Hub dataset 'org/missing'", "HF_HUB_OFFLINE is set"):
        assert part in message, (part, message)
    assert "hf download org/missing --repo-type dataset" in message and str(hub_datasets) in message


def test_a_missing_field_is_named_for_saved_and_hub_datasets(tmp_path, hub_datasets):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(ValueError, match=r"task 'alpha': field 'sentence' not found in dataset '.*single' "):
        check_files("alpha", str(tmp_path / "single"), ["sentence"], "train_files")
    # csv metadata carries no columns: the field is named once the rows are read
    plain = {"path": "org/tiny", "name": "plain", "split": "validation"}
    with pytest.raises(
        ValueError,
        match=r"field 'sentence' not found in dataset 'org/tiny'.*columns there: \['text', 'label'\]",
    ):
        read_rows("alpha", plain, ["sentence"], "train_files")


def test_fit_on_saved_folders_and_tsv_equals_fit_on_the_jsonl_files(tiny):
    by_files = tiny.root / "by_files"
    main(["fit", "--config", str(write_config(tiny, by_files, epochs=1))])

    config = write_config(tiny, tiny.root / "by_sources", epochs=1)
    data = yaml.safe_load(config.read_text())
    data["model"]["init_args"]["teacher_cache"] = str(tiny.root / "teacher_cache_sources")
    for task in data["data"]["init_args"]["tasks"]:
        name = task["name"]
        train = [json.loads(line) for line in tiny.train[name].read_text().splitlines()]
        evals = [json.loads(line) for line in tiny.eval[name].read_text().splitlines()]
        saved = tiny.root / "saved" / name
        DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(evals)}).save_to_disk(
            str(saved)
        )
        task["train_files"] = {"path": str(saved), "split": "train"}
        task["eval_files"] = str(write_csv(tiny.root / "tsv" / f"{name}.tsv", evals, delimiter="\t"))
    config.write_text(yaml.safe_dump(data))
    shutil.rmtree(tiny.root / "data")  # the jsonl files cannot be read by mistake
    main(["fit", "--config", str(config)])

    mine, reference = (
        json.loads((run_dir(f) / "report.json").read_text()) for f in (tiny.root / "by_sources", by_files)
    )
    assert mine["tasks"] == reference["tasks"]
    coefficients = [
        json.loads((run_dir(f) / "coefficients.json").read_text())
        for f in (tiny.root / "by_sources", by_files)
    ]
    assert coefficients[0] == coefficients[1]
