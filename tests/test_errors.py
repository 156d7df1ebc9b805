"""Bad input fails early with the key, file, task or tensor named; damaged caches are rebuilt."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from divmerge_pl.cli import main

from .test_fit import run_dir, write_config


@pytest.fixture
def no_model_loads(monkeypatch):
    """Config errors must stop the run before any model is read."""
    from divmerge_pl import module as module_file

    monkeypatch.setattr(module_file, "load_experts", lambda *a: pytest.fail("models were loaded"))


def tree_state(root: Path) -> dict[Path, tuple[bool, int, int]]:
    """Every path under ``root`` with whether it is a folder, its size and its modification time."""
    return {p: (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@contextmanager
def writes_nothing(root: Path) -> Iterator[None]:
    """A refused run must leave ``root`` as it was: no run folder, no cache file, no checkpoint."""
    before = tree_state(root)
    yield
    after = tree_state(root)
    assert sorted(map(str, after.keys() - before.keys())) == [], "a refused run created these"
    assert sorted(str(p) for p in before if after.get(p, before[p]) != before[p]) == [], "and changed these"
    assert sorted(map(str, before.keys() - after.keys())) == [], "and removed these"


def edit_config(path, edit) -> str:
    config = yaml.safe_load(path.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["model"]["init_args"].update(objektive="js"), r"objektive"),
        (lambda c: c["model"]["init_args"].update(lr="fast"), r"lr"),
        (lambda c: c["model"]["init_args"].update(objective="jsd"), r"objective.*(js|kl|entropy)"),
        (lambda c: c["data"]["init_args"]["tasks"][0].update(num_sample=3), r"num_sample"),
    ],
    ids=["unknown-key", "wrong-type", "bad-choice", "unknown-task-key"],
)
def test_config_mistakes_name_the_key(tiny, no_model_loads, capsys, edit, message):
    config = edit_config(write_config(tiny, tiny.root / "run"), edit)
    with writes_nothing(tiny.root), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config])
    assert exit_info.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err, __import__("re").S)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda c: c["data"]["init_args"].update(tasks=[]), ValueError, r"data\.tasks is empty"),
        (
            lambda c: c["data"]["init_args"]["tasks"].append(dict(c["data"]["init_args"]["tasks"][0])),
            ValueError,
            r"task name 'alpha' appears more than once",
        ),
        (
            lambda c: c["data"]["init_args"]["tasks"][1].update(num_samples=0),
            ValueError,
            r"task 'beta': num_samples must be a positive integer, got 0",
        ),
        (
            lambda c: c["model"]["init_args"].update(experts={}),
            ValueError,
            r"model\.experts is empty",
        ),
    ],
    ids=["zero-tasks", "duplicate-task", "num-samples", "zero-experts"],
)
def test_invalid_task_lists_fail_before_models_load(tiny, no_model_loads, edit, error, message):
    config = edit_config(write_config(tiny, tiny.root / "run"), edit)
    with writes_nothing(tiny.root), pytest.raises(error, match=message):
        main(["fit", "--config", config])


def test_data_file_problems_name_task_and_file(tiny, no_model_loads):
    missing = edit_config(
        write_config(tiny, tiny.root / "a"),
        lambda c: c["data"]["init_args"]["tasks"][0].update(train_files=str(tiny.root / "nowhere.jsonl")),
    )
    with (
        writes_nothing(tiny.root),
        pytest.raises(FileNotFoundError, match=r"task 'alpha': data file .*nowhere\.jsonl.* does not exist"),
    ):
        main(["fit", "--config", missing])

    (tiny.root / "empty.jsonl").write_text("")
    empty = edit_config(
        write_config(tiny, tiny.root / "b"),
        lambda c: c["data"]["init_args"]["tasks"][1].update(train_files=str(tiny.root / "empty.jsonl")),
    )
    with (
        writes_nothing(tiny.root),
        pytest.raises(ValueError, match=r"task 'beta': .*empty\.jsonl.* hold no rows"),
    ):
        main(["fit", "--config", empty])

    field = edit_config(
        write_config(tiny, tiny.root / "c"),
        lambda c: c["data"]["init_args"]["tasks"][0].update(text_fields=["sentence"]),
    )
    with (
        writes_nothing(tiny.root),
        pytest.raises(
            ValueError, match=r"task 'alpha': field 'sentence' not found.*columns there: \['text', 'label'\]"
        ),
    ):
        main(["fit", "--config", field])


def test_empty_and_long_texts_are_skipped_or_truncated_and_counted(tiny, caplog):
    rows = [json.loads(line) for line in tiny.train["alpha"].read_text().splitlines()]
    rows[0]["text"] = "   "
    rows[1]["text"] = ""
    rows[2]["text"] = " ".join(["good"] * 40)  # far over max_length=16
    tiny.train["alpha"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = edit_config(
        write_config(tiny, tiny.root / "run", epochs=1),
        lambda c: c["data"]["init_args"]["tasks"][0].update(num_samples=100),
    )
    with caplog.at_level(logging.WARNING, logger="divmerge_pl"):
        main(["fit", "--config", config])
    log = caplog.text
    assert "task 'alpha': 2 row(s) of train_files have empty text and are skipped" in log
    long_rows = sum(len(r["text"].split()) + 2 > 16 for r in rows[2:])
    assert f"task 'alpha': {long_rows} of 38 merge inputs are longer than max_length=16" in log
    assert (run_dir(tiny.root / "run") / "report.json").is_file()


def test_eval_label_outside_the_head_is_refused(tiny):
    rows = [json.loads(line) for line in tiny.eval["alpha"].read_text().splitlines()]
    rows[3]["label"] = 7  # alpha's head has 2 classes
    tiny.eval["alpha"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = str(write_config(tiny, tiny.root / "run"))
    with (
        writes_nothing(tiny.root),
        pytest.raises(ValueError, match=r"task 'alpha': eval label\(s\) \[7\] outside 0\.\.1"),
    ):
        main(["fit", "--config", config])


def test_damaged_teacher_cache_is_rebuilt_not_trusted(tiny, monkeypatch, caplog):
    from divmerge_pl import kinds

    main(["fit", "--config", str(write_config(tiny, tiny.root / "first", epochs=1))])
    files = sorted((tiny.root / "teacher_cache").glob("*.safetensors"))
    assert len(files) == 2
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])  # a run killed while copying, a full disk...

    calls = []
    real = kinds.compute_logprobs
    monkeypatch.setattr(kinds, "compute_logprobs", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    with caplog.at_level(logging.WARNING, logger="divmerge_pl"):
        main(["fit", "--config", str(write_config(tiny, tiny.root / "second", epochs=1))])
    assert "is unreadable" in caplog.text
    assert len(calls) == 2  # one expert's inputs and eval rows recomputed; the other from the cache
    assert files[0].read_bytes() != data[: len(data) // 2]  # and the damaged file was rewritten
    first = json.loads((run_dir(tiny.root / "first") / "report.json").read_text())
    second = json.loads((run_dir(tiny.root / "second") / "report.json").read_text())
    assert first["tasks"] == second["tasks"]


def test_damaged_checkpoint_is_named(tiny):
    main(["fit", "--config", str(write_config(tiny, tiny.root / "first", epochs=1))])
    checkpoint = run_dir(tiny.root / "first") / "checkpoints" / "last.ckpt"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 3])
    config = write_config(tiny, tiny.root / "second", epochs=2)
    with (
        writes_nothing(tiny.root),
        pytest.raises(ValueError, match=r"checkpoint .*last\.ckpt.* cannot be read .*truncated or corrupted"),
    ):
        main(["fit", "--config", str(config), "--ckpt_path", str(checkpoint)])


def test_outputs_of_an_earlier_run_are_never_overwritten_unless_asked(tiny):
    out = tiny.root / "out"
    config = str(write_config(tiny, tiny.root / "run", epochs=1))
    main(["fit", "--config", config, f"--export.dirpath={out}"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(
        FileExistsError, match=r"already holds merged, coefficients\.json, report\.json.*overwrite"
    ):
        main(["fit", "--config", config, f"--export.dirpath={out}", "--trainer.max_epochs=2"])
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    main(
        [
            "fit",
            "--config",
            config,
            f"--export.dirpath={out}",
            "--trainer.max_epochs=2",
            "--export.overwrite=true",
        ]
    )
    assert before != {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_an_interrupted_export_leaves_nothing_that_looks_complete(tiny, monkeypatch):
    from divmerge_pl import export

    saved = []
    real = export.save_model

    def save_then_fail(model, folder, *args, **kwargs):
        if saved:
            raise OSError("disk full")
        saved.append(folder)
        real(model, folder, *args, **kwargs)

    monkeypatch.setattr(export, "save_model", save_then_fail)
    out = tiny.root / "out"
    with pytest.raises(OSError, match="disk full"):
        main(
            [
                "fit",
                "--config",
                str(write_config(tiny, tiny.root / "run", epochs=1)),
                f"--export.dirpath={out}",
            ]
        )
    assert saved  # the first task's model was written, into the temporary folder...
    assert sorted(p.name for p in out.iterdir()) == []  # ...which is gone, and nothing else is there
