"""``divmerge-pl``: one LightningCLI whose subcommands include merge and compare, quiet unless the
Trainer's progress bar is on."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from divmerge_pl.cli import main

from .test_fit import run_dir, write_config

REPO = Path(__file__).resolve().parents[1]


def help_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_merge_and_compare_are_subcommands_with_config_and_typed_options(capsys):
    top = help_of([], capsys)
    listed = top[top.index("Available subcommands") :].split()
    for name in ("fit", "validate", "test", "merge", "compare"):
        assert name in listed
    assert "predict" not in listed  # a merge has no prediction step: not offered
    merge = help_of(["merge"], capsys)
    for option in ("--config", "--method METHOD", "--method_args", "--trainer.max_epochs", "--model.help"):
        assert option in merge
    compare = help_of(["compare"], capsys)
    for option in ("--config", "--methods", "--output_dir", "--overwrite {true,false}", "--method_args"):
        assert option in compare
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 2


def test_merge_and_compare_from_the_command_line_warn_nothing_about_args(tiny, monkeypatch):
    """The console's path: arguments in sys.argv, runs built from them, no LightningCLI notice that
    args were given from Python (the inner runs used to warn once each)."""
    config = write_config(tiny, tiny.root / "merge")
    out = tiny.root / "compare"
    commands = [
        ["merge", "--config", str(config), "--method", "task_arithmetic", "--method_args", "{scale: 1.0}"],
        ["compare", f"--config={config}", "--methods=average,task_arithmetic", "--output_dir", str(out)],
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for argv in commands:
            monkeypatch.setattr(sys, "argv", ["divmerge-pl", *argv])
            main()
    assert not [str(w.message) for w in caught if "args parameter" in str(w.message)]
    assert not [str(w.message) for w in caught if "LeafSpec" in str(w.message)]  # filtered, once
    report = json.loads((run_dir(tiny.root / "merge") / "report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["params"]["scale"] == 1.0
    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["methods"]) == ["average", "task_arithmetic"]


def test_compare_options_from_a_list_and_the_runs_options_reach_each_run(tiny):
    config = write_config(tiny, tiny.root / "unused", epochs=3)
    out = tiny.root / "compare"
    comparison = main(["compare", "--config", str(config), "--methods", "[divmerge_task]",
                       "--output_dir", str(out), "--trainer.max_epochs=1"])  # fmt: skip
    assert list(comparison["methods"]) == ["divmerge_task"]
    assert comparison["methods"]["divmerge_task"]["settings"]["epochs"] == 1  # the user's option won
    with pytest.raises(FileExistsError, match="comparison.json"):
        main(["compare", "--config", str(config), "--methods", "divmerge_task", "--output_dir", str(out)])


def test_commands_does_not_import_the_cli():
    """commands.py is a layer under cli.py: importing it loads no CLI module (no import cycle)."""
    code = "import sys, divmerge_pl.commands; print('divmerge_pl.cli' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("bars", [False, True])
def test_every_bar_follows_the_trainers_enable_progress_bar(tiny, capfd, caplog, bars):
    caplog.set_level(logging.INFO)
    config = write_config(tiny, tiny.root / "run", epochs=1)
    capfd.readouterr()  # the fixture's own model writing
    main(["fit", "--config", str(config), f"--trainer.enable_progress_bar={str(bars).lower()}"])
    printed = capfd.readouterr()
    both = printed.out + printed.err
    # Lightning's litlogger advert, filtered (its handler may write to a stream capfd does not see)
    assert not [r for r in caplog.records if "Tip:" in r.getMessage()]
    if bars:
        for bar in ("Epoch 0", "tokenising alpha", "expert alpha: inputs", "Writing model shards"):
            assert bar in both
    else:
        assert "it/s" not in both and "s/it" not in both and "\r" not in both, both[-2000:]
    assert (run_dir(tiny.root / "run") / "report.json").is_file()


def test_merges_own_option_in_a_config_file_is_named(tiny):
    """A method's run is built from fit's options, which have no ``method``: the mistake is
    named, with the way out, before any run."""
    config = write_config(tiny, tiny.root / "run")
    config.write_text(config.read_text() + "method: ties\n")
    with pytest.raises(ValueError, match=r"method came from a config file; give --method on the command"):
        main(["merge", "--config", str(config)])
    assert not (tiny.root / "run" / "lightning_logs").exists()


class Stop(Exception):
    pass


@pytest.mark.parametrize("hook", ["data", "model"])
def test_bars_are_off_before_prepare_data_reads_or_downloads(tiny, monkeypatch, hook):
    """A Hub model or dataset is fetched in prepare_data, before any setup: its download bars
    must already follow the Trainer's."""
    from divmerge_pl import MergeDataModule, module, quiet

    seen = {}

    def sources(self):
        seen["data"] = quiet.bars_enabled()
        quiet.set_progress_bars(True)  # so the model's hook must turn them off itself

    def models(*args):
        seen["model"] = quiet.bars_enabled()
        raise Stop

    monkeypatch.setattr(MergeDataModule, "check_sources", sources)
    monkeypatch.setattr(module, "check_with_adapters", models)
    quiet.set_progress_bars(True)
    config = write_config(tiny, tiny.root / "run")
    with pytest.raises(Stop):
        main(["fit", "--config", str(config), "--trainer.enable_progress_bar=false"])
    assert seen[hook] is False
    quiet.set_progress_bars(True)
