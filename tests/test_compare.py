"""``divmerge-pl merge`` and ``compare``: training-free and learned methods in one harness."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from divmerge_pl import DivMergeModule
from divmerge_pl.cli import main
from divmerge_pl.divergences import masked_mean
from divmerge_pl.merged import merge_tensors
from divmerge_pl.static_merges import decorrelate_matrix

from .conftest import build_setup, per_task_logits
from .test_fit import fit_module, run_dir, write_config


def test_task_arithmetic_of_one_expert_at_scale_one_is_that_expert(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3})
    config = write_config(tiny, tmp_path / "run")
    main(["merge", "--config", str(config), "--method", "task_arithmetic", "--method_args", '{"scale": 1.0}'])
    run = run_dir(tmp_path / "run")
    merged = load_file(run / "merged" / "alpha" / "model.safetensors")
    expert = load_file(tiny.experts["alpha"] / "model.safetensors")
    assert merged.keys() == expert.keys()
    for name, value in merged.items():
        torch.testing.assert_close(value, expert[name], atol=1e-6, rtol=0)
    report = json.loads((run / "report.json").read_text())
    assert report["method"] == "task_arithmetic"
    assert report["tasks"]["alpha"]["normalized"] == pytest.approx(1.0)
    assert not (run / "coefficients.json").exists()  # a training-free method has no coefficients


def test_compare_runs_every_method_and_tabulates_them(tiny):
    config = write_config(tiny, tiny.root / "unused", epochs=1)
    out = tiny.root / "compare"
    methods = ["average", "task_arithmetic", "ties", "dare", "adamerging", "divmerge_task", "divmerge_layer"]
    main(["compare", "--config", str(config), "--methods", ",".join(methods), "--output_dir", str(out)])

    comparison = json.loads((out / "comparison.json").read_text())
    assert list(comparison["methods"]) == methods
    assert list(comparison["seconds"]) == methods and all(s > 0 for s in comparison["seconds"].values())
    table = (out / "comparison.md").read_text()
    for method in methods:
        assert f"| {method} |" in table
        report = comparison["methods"][method]
        assert set(report["tasks"]) == {"alpha", "beta"}
        for row in report["tasks"].values():
            assert row["normalized"] == pytest.approx(row["merged"] / row["expert"])
    assert (out / "comparison.png").stat().st_size > 1000
    # every method scored the same experts on the same rows
    assert (
        len(
            {
                json.dumps({t: r["expert"] for t, r in rep["tasks"].items()})
                for rep in comparison["methods"].values()
            }
        )
        == 1
    )

    # the average's merged weights are theta0 + mean(tau), through the same export
    base = load_file(tiny.base / "model.safetensors")
    experts = {t: load_file(p / "model.safetensors") for t, p in tiny.experts.items()}
    average = load_file(run_dir(out / "average") / "merged" / "beta" / "model.safetensors")
    for name, value in average.items():
        if name.startswith("bert."):
            theta0 = base[name.removeprefix("bert.")]
            expected = theta0 + sum(e[name] - theta0 for e in experts.values()) / 2
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)

    learned = run_dir(out / "divmerge_layer")
    coefficients = json.loads((learned / "coefficients.json").read_text())
    assert coefficients["objective"] == "js" and coefficients["granularity"] == "layer"
    assert (
        json.loads((run_dir(out / "adamerging") / "coefficients.json").read_text())["objective"] == "entropy"
    )
    assert (learned / "coefficients.png").is_file() and (learned / "divergence.png").is_file()
    saved = yaml.safe_load((run_dir(out / "divmerge_task") / "config.yaml").read_text())
    assert saved["model"]["init_args"]["granularity"] == "task"

    with pytest.raises(FileExistsError, match="comparison.json"):
        main(["compare", "--config", str(config), "--methods", "average", "--output_dir", str(out)])


def test_unknown_method_is_refused_before_any_run(tiny):
    config = write_config(tiny, tiny.root / "run")
    with pytest.raises(ValueError, match=r"unknown method 'tie'.*average, task_arithmetic, ties, dare"):
        main(
            [
                "compare",
                "--config",
                str(config),
                "--methods",
                "average,tie",
                "--output_dir",
                str(tiny.root / "c"),
            ]
        )
    assert not (tiny.root / "c").exists()


def test_entropy_gradient_matches_finite_differences(tiny):
    module, trainer = fit_module(
        tiny, {"alpha": 2, "beta": 3}, max_steps=0, objective="entropy", granularity="block"
    )
    module.double()
    batch = next(iter(trainer.datamodule.train_dataloader()))

    def objective(gamma: torch.Tensor) -> torch.Tensor:
        frozen = module.frozen
        merged = merge_tensors(frozen.base_tensors(), frozen.merge_vectors(), gamma, module.layout)
        total = 0.0
        for t, rows in module.task_rows(batch):
            logq = torch.log_softmax(per_task_logits(module, t, merged, batch, rows), dim=-1)
            total = total + masked_mean(module.objective(logq, logq))
        return total

    gamma = torch.full_like(module.coefficients, 0.4, dtype=torch.float64)
    gamma += 0.1 * torch.randn_like(gamma)
    assert torch.autograd.gradcheck(objective, (gamma.requires_grad_(),), eps=1e-6, atol=1e-5)


def test_learned_merge_over_ties_vectors_uses_them(tiny):
    raw = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0)[0]
    ties = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0, task_vector_transform="ties", density=0.2)[
        0
    ]
    assert isinstance(ties, DivMergeModule)
    kept_per_task, total = torch.zeros(2), 0
    for name, stacked in ties.frozen.merge_vectors().items():
        original = raw.frozen.task_vectors()[name]
        kept = stacked != 0
        kept_per_task += kept.flatten(1).sum(1)
        total += stacked[0].numel()
        torch.testing.assert_close(stacked[kept], original[kept])  # kept entries are unchanged
    # at most the top 20% of each task's whole vector (trimmed over all tensors, as TIES does)
    assert (kept_per_task <= 0.2 * total + 1).all()
    # teachers are still the real experts
    torch.testing.assert_close(ties.teachers.logprobs, raw.teachers.logprobs)


def test_learned_merge_over_tsv_vectors_uses_each_tasks_decorrelated_part(tiny):
    raw = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0)[0]
    tsv = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=0, task_vector_transform="tsv")[0]
    original = raw.frozen.task_vectors()
    matrices = 0
    for name, stacked in tsv.frozen.merge_vectors().items():
        expected = original[name].double()
        if expected.dim() == 3:  # [tasks, rows, cols]: its decorrelated parts; others as they are
            expected, matrices = decorrelate_matrix(expected), matrices + 1
        torch.testing.assert_close(stacked.double(), expected, atol=1e-5, rtol=1e-4)
    assert matrices > 0
    torch.testing.assert_close(tsv.teachers.logprobs, raw.teachers.logprobs)  # still the real experts


def test_f1_is_macro_f1(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3}, scale=1.0)
    reports = {}
    for name, args in {"1": ["--method_args", '{"scale": 1.0}']}.items():
        config = write_config(tiny, tmp_path / name)
        config.write_text(
            config.read_text().replace("label_field: label", "label_field: label\n      metric: f1")
        )
        main(["merge", "--config", str(config), "--method", "task_arithmetic", *args])
        reports[name] = json.loads((run_dir(tmp_path / name) / "report.json").read_text())
    row = reports["1"]["tasks"]["alpha"]
    assert reports["1"]["metric"] == row["metric"] == "f1"
    assert row["merged"] == pytest.approx(row["expert"])  # scale 1 with one expert: the expert

    # macro F1 of the expert's predictions on the eval rows, by hand
    model = AutoModelForSequenceClassification.from_pretrained(tiny.experts["alpha"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny.base)
    rows = [json.loads(line) for line in tiny.eval["alpha"].read_text().splitlines()]
    with torch.no_grad():
        inputs = tokenizer(
            [r["text"] for r in rows], truncation=True, max_length=16, padding=True, return_tensors="pt"
        )
        predicted = model(**inputs).logits.argmax(-1).tolist()
    labels = [r["label"] for r in rows]
    f1s = []
    for k in range(3):
        tp = sum(p == k and y == k for p, y in zip(predicted, labels, strict=True))
        fp = sum(p == k and y != k for p, y in zip(predicted, labels, strict=True))
        fn = sum(p != k and y == k for p, y in zip(predicted, labels, strict=True))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    assert row["expert"] == pytest.approx(sum(f1s) / 3, abs=1e-6)


def test_compare_reads_the_rows_once_and_learns_what_a_lone_run_learns(tiny, monkeypatch):
    from divmerge_pl import data as data_file

    reads = []
    real = data_file.read_rows
    monkeypatch.setattr(data_file, "read_rows", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    config = write_config(tiny, tiny.root / "unused", epochs=1)
    out = tiny.root / "compare"
    main(["compare", "--config", str(config), "--methods", "ties,divmerge_layer", "--output_dir", str(out)])
    assert sorted(reads) == ["alpha", "alpha", "beta", "beta"]  # train and eval files, once each

    lone = tiny.root / "lone"
    main(["merge", "--config", str(config), "--method", "divmerge_layer",
          "--trainer.default_root_dir", str(lone)])  # fmt: skip
    shared, alone = run_dir(out / "divmerge_layer"), run_dir(lone)
    for name in ("coefficients.json", "report.json"):
        assert json.loads((shared / name).read_text()) == json.loads((alone / name).read_text())
