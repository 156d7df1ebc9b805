"""The quality benchmark's --quick mode end to end, offline (stand-in archives, a tiny base)."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from .test_demo import fake_archives


def load_benchmark():
    spec = importlib.util.spec_from_file_location("quality_run", Path("benchmarks/quality/run.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_tabulates_anp_per_method_and_k(tmp_path: Path):
    bench = load_benchmark()
    root, out = tmp_path / "cache", tmp_path / "out"
    fake_archives(root / "archives")
    methods = ["average", "ties", "divmerge_layer"]
    argv = [
        "--quick", "--tasks", "bbc_news,amazon_reviews", "--root", str(root), "--out", str(out),
        "--methods", ",".join(methods), "--train_size", "50", "--eval_size", "20", "--inputs", "16",
        "--max_length", "16", "--epochs", "1", "--finetune_epochs", "1", "--sweep", "",
    ]  # fmt: skip
    results = bench.main(argv)
    (run,) = results["runs"]
    assert run["k"] == 2 and set(run["tasks"]) == {"bbc_news", "amazon_reviews"}
    for method in methods:
        report = run["reports"][method]
        normalised = statistics.fmean(row["normalized"] for row in report["tasks"].values())
        assert run["anp"][method] == pytest.approx(100 * normalised)
        cell = results["summary"]["anp"][method]["2"]
        assert cell == {"anp": pytest.approx(run["anp"][method]), "ci95": None, "subsets": 1}
        assert run["seconds"][method] > 0
        for task, row in report["tasks"].items():  # expert scores are the fine-tuning's own
            assert row["expert"] == pytest.approx(results["experts"][task]["eval_accuracy"])
    (similarity,) = results["cosine_similarity"].values()
    assert -1 <= similarity <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert "| divmerge_layer |" in (out / "results.md").read_text()
    assert (out / "anp_vs_k.png").stat().st_size > 1000

    # an interrupted or repeated benchmark reuses finished comparisons made with the same config;
    # the inputs sweep reuses the comparison's own layer-level run at its number of inputs
    bench.compare_main = lambda *a, **k: pytest.fail("a finished comparison was recomputed")
    swept = [a for a in argv if a != "--quick"] + ["--subsets", "1", "--sweep", "8,16"]
    again = bench.main(swept)
    assert again["runs"][0]["anp"] == run["anp"]
    assert again["inputs_sweep"]["anp"]["16"] == run["anp"]["divmerge_layer"]
    assert not (root / "runs" / "sweep_16").exists()
    assert (root / "runs" / "sweep_8").is_dir() and 0 <= again["inputs_sweep"]["anp"]["8"] <= 200


def test_subsets_are_all_pairs_then_a_seeded_sample():
    bench = load_benchmark()
    tasks = ["a", "b", "c", "d", "e"]
    assert len(bench.task_subsets(tasks, 2, 1, 0)) == 10
    three = bench.task_subsets(tasks, 3, 3, 0)
    assert len(three) == 3 == len(set(three)) and three == bench.task_subsets(tasks, 3, 3, 0)
    assert bench.task_subsets(tasks, 5, 3, 0) == [tuple(tasks)]
    assert bench.summarise([90.0, 94.0])["ci95"] == pytest.approx(12.706 * 2.8284271 / 1.4142136, rel=1e-6)
