"""End to end: ``divmerge-pl fit`` on tiny random experts, outputs checked against the maths."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl.cli import main
from divmerge_pl.coefficients import DEFAULT_BLOCK_PATTERN
from divmerge_pl.divergences import js_divergence

from .conftest import build_setup, per_task_logits


def write_config(tiny, folder: Path, granularity: str = "layer", epochs: int = 2, **model) -> Path:
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "divmerge_pl.DivMergeModule",
            "init_args": tiny.model_args(granularity=granularity, **model),
        },
        "data": {
            "class_path": "divmerge_pl.MergeDataModule",
            "init_args": {"tasks": tiny.task_specs(), "batch_size": 8, "max_length": 16},
        },
        "trainer": {
            "max_epochs": epochs,
            "default_root_dir": str(folder),
            "enable_progress_bar": False,
            "accelerator": "cpu",
            "devices": 1,
        },
    }
    path = folder / "merge.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_dir(folder: Path) -> Path:
    (found,) = sorted((folder / "lightning_logs").iterdir())
    return found


def tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def group_of(name: str, granularity: str, groups: list[str]) -> int:
    if granularity == "task":
        return 0
    if granularity == "layer":
        return groups.index(name)
    match = re.search(DEFAULT_BLOCK_PATTERN, name)
    return groups.index(match.group(1) if match else "other")


@pytest.mark.parametrize("granularity", ["task", "layer", "block", "channel"])
def test_fit_writes_outputs_whose_weights_are_base_plus_gamma_tau(tiny, granularity):
    before = {p: tree_digest(p) for p in [tiny.base, *tiny.experts.values()]}
    out = tiny.root / "run"
    main(["fit", "--config", str(write_config(tiny, out, granularity))])
    run = run_dir(out)

    coefficients = json.loads((run / "coefficients.json").read_text())
    assert coefficients["objective"] == "js"
    assert coefficients["granularity"] == granularity
    assert coefficients["tasks"] == ["alpha", "beta"]
    gamma = torch.tensor(coefficients["values"])
    assert gamma.shape == (2, len(coefficients["groups"]))
    assert not torch.allclose(gamma, torch.full_like(gamma, 0.5))  # it learned something
    expected_groups = {"task": 1, "layer": 38, "block": 3, "channel": 38}[granularity]
    assert len(coefficients["groups"]) == expected_groups
    rows = None  # channel: every row's coefficients, [tasks x rows] per tensor
    if granularity == "channel":
        rows = load_file(run / "coefficients.safetensors")
        assert list(rows) == sorted(coefficients["groups"])
        means = torch.stack([rows[name].mean(1) for name in coefficients["groups"]], 1)
        torch.testing.assert_close(gamma, means, atol=1e-6, rtol=0)
        assert any(float(r.std(1).max()) > 1e-4 for r in rows.values())  # rows learned apart
    else:
        assert not (run / "coefficients.safetensors").exists()

    base = load_file(tiny.base / "model.safetensors")
    experts = {t: load_file(p / "model.safetensors") for t, p in tiny.experts.items()}
    for task in ["alpha", "beta"]:
        merged = load_file(run / "merged" / task / "model.safetensors")
        for name, value in merged.items():
            if not name.startswith("bert."):
                assert torch.equal(value, experts[task][name])  # heads are kept, not merged
                continue
            theta0 = base[name.removeprefix("bert.")]
            taus = [experts[other][name] - theta0 for other in ["alpha", "beta"]]
            if not any(tau.any() for tau in taus):  # equal everywhere: not merged, stays base
                assert torch.equal(value, theta0), name
                continue
            if rows is not None:
                own = rows[name].reshape(2, -1, *[1] * (theta0.dim() - 1))
                expected = theta0 + sum(own[s] * tau for s, tau in enumerate(taus))
                assert torch.allclose(value, expected, atol=1e-5), name
                continue
            g = group_of(name, granularity, coefficients["groups"])
            expected = theta0 + sum(gamma[s, g] * tau for s, tau in enumerate(taus))
            assert torch.allclose(value, expected, atol=1e-5), name
        model = AutoModelForSequenceClassification.from_pretrained(run / "merged" / task)
        assert model.config.num_labels == tiny.labels[task]

    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"alpha", "beta"}
    for row in report["tasks"].values():
        assert 0 <= row["merged"] <= 1 and 0 <= row["expert"] <= 1
        assert row["normalized"] == pytest.approx(row["merged"] / row["expert"])
    assert (run / "config.yaml").is_file()
    # gradients reached only the coefficients: base and experts are byte-for-byte unchanged
    assert before == {p: tree_digest(p) for p in before}


def fit_module(
    tiny, tasks: dict, max_steps: int, precision: str = "32-true", **kwargs
) -> tuple[DivMergeModule, L.Trainer]:
    module = DivMergeModule(
        base=str(tiny.base),
        experts={t: str(tiny.experts[t]) for t in tasks},
        teacher_cache=None,
        **kwargs,
    )
    specs = [TaskSpec(**s) for s in tiny.task_specs(num_samples=32) if s["name"] in tasks]
    data = MergeDataModule(specs, tokenizer=str(tiny.base), batch_size=8, max_length=16)
    trainer = L.Trainer(
        max_steps=max_steps,
        precision=precision,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return module, trainer


def js_to_expert(module: DivMergeModule, trainer: L.Trainer) -> float:
    """Mean JS between the merged model and the expert on the expert's own inputs."""
    data = trainer.datamodule
    with torch.no_grad():
        merged = module.merged_tensors()
        values = []
        for batch in data.ordered_dataloader(data.train_rows):
            for t, rows in module.task_rows(batch):
                logq = torch.log_softmax(per_task_logits(module, t, merged, batch, rows), -1)
                logp = module.teachers.logprobs[batch["row_id"][rows], : logq.shape[-1]]
                values.append(js_divergence(logp, logq))
    return torch.cat(values).mean().item()


def test_one_expert_pulls_its_coefficient_to_one_and_js_to_zero(tmp_path):
    tiny = build_setup(tmp_path, {"alpha": 3}, scale=0.1)
    module, trainer = fit_module(tiny, {"alpha": 3}, max_steps=0, granularity="task", init=0.0)
    start = js_to_expert(module, trainer)
    module, trainer = fit_module(tiny, {"alpha": 3}, max_steps=80, granularity="task", init=0.0, lr=0.05)
    end = js_to_expert(module, trainer)
    assert start > 1e-2
    assert end < 0.01 * start
    assert module.coefficients.item() == pytest.approx(1.0, abs=0.1)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["coefficients"]


def test_teacher_outputs_are_cached_and_invalidated_by_new_weights(tiny, monkeypatch):
    from divmerge_pl import kinds

    calls = []
    real = kinds.compute_logprobs
    monkeypatch.setattr(kinds, "compute_logprobs", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    main(["fit", "--config", str(write_config(tiny, tiny.root / "first", epochs=1))])
    assert len(calls) == 4  # inputs and eval rows, for each of the two experts
    main(["fit", "--config", str(write_config(tiny, tiny.root / "second", epochs=1))])
    assert len(calls) == 4  # second run: every expert output came from the cache
    first = json.loads((run_dir(tiny.root / "first") / "report.json").read_text())
    second = json.loads((run_dir(tiny.root / "second") / "report.json").read_text())
    assert first["tasks"]["alpha"]["expert"] == second["tasks"]["alpha"]["expert"]

    expert = AutoModelForSequenceClassification.from_pretrained(tiny.experts["beta"])
    with torch.no_grad():
        expert.classifier.bias.add_(1.0)
    expert.save_pretrained(tiny.experts["beta"])
    main(["fit", "--config", str(write_config(tiny, tiny.root / "third", epochs=1))])
    assert calls[4:] == ["expert beta: inputs", "expert beta: eval"]


def test_task_without_expert_fails_before_models_load(tiny, monkeypatch):
    from divmerge_pl import module as module_file

    monkeypatch.setattr(module_file, "load_experts", lambda *a: pytest.fail("models loaded"))
    config = write_config(tiny, tiny.root / "run")
    text = config.read_text().replace("name: beta", "name: gamma")
    config.write_text(text)
    with pytest.raises(ValueError, match=r"experts without a task \['beta'\].*without an expert \['gamma'\]"):
        main(["fit", "--config", str(config)])


def test_same_config_gives_same_coefficients_whatever_ran_before(tiny):
    """Batch order is a function of (seed, epoch) only: a global RNG disturbed by earlier work
    (expert fine-tuning in the demo, another fit) does not change the result."""
    torch.manual_seed(1)
    first, _ = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=10, granularity="task")
    torch.manual_seed(2)
    torch.rand(1000)
    second, _ = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=10, granularity="task")
    assert torch.equal(first.coefficients.detach(), second.coefficients.detach())


def test_each_epoch_visits_every_row_once_in_a_new_order(tiny):
    specs = [TaskSpec(**s) for s in tiny.task_specs(num_samples=32)]
    data = MergeDataModule(specs, tokenizer=str(tiny.base), batch_size=8, max_length=16)
    data.setup("fit")
    loader = data.train_dataloader()
    orders = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        orders.append(torch.cat([b["row_id"] for b in loader]).tolist())
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(64))
    assert orders[0] != orders[1]


def test_scoring_reads_rows_shortest_first_and_scores_as_in_file_order(tiny):
    module, trainer = fit_module(tiny, {"alpha": 2, "beta": 3}, max_steps=2, granularity="task")
    data = trainer.datamodule
    data.eval_batch_size = 4  # several batches of the 40 eval rows
    batches = list(data.ordered_dataloader(data.eval_rows, shortest_first=True))
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(-1)]
    assert lengths == sorted(lengths)
    assert sorted(torch.cat([b["row_id"] for b in batches]).tolist()) == list(range(len(data.eval_rows)))
    padded = sum(b["input_ids"].numel() for b in batches)
    in_file_order = sum(b["input_ids"].numel() for b in data.ordered_dataloader(data.eval_rows))
    assert padded < in_file_order

    correct, total = {}, {}
    with torch.no_grad():
        merged = module.merged_tensors()
        for batch in data.ordered_dataloader(data.eval_rows):
            for t, rows in module.task_rows(batch):
                hits = per_task_logits(module, t, merged, batch, rows).argmax(-1) == batch["labels"][rows]
                correct[t] = correct.get(t, 0) + int(hits.sum())
                total[t] = total.get(t, 0) + len(rows)
    report = module.evaluate()
    for t, task in enumerate(module.tasks):
        assert report["tasks"][task]["merged"] == pytest.approx(correct[t] / total[t])


def test_without_weights_a_run_writes_report_and_coefficients_only(tiny):
    out = tiny.root / "run"
    config = write_config(tiny, out, "task", epochs=1)
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(out / "full")])
    lean_args = ["--export.save_weights=false", "--export.dirpath", str(out / "lean")]
    main(["fit", "--config", str(config), *lean_args])
    assert (run_dir(out / "full") / "merged" / "alpha" / "model.safetensors").is_file()
    assert not (out / "lean" / "merged").exists()
    full, lean = run_dir(out / "full"), out / "lean"
    for name in ("report.json", "coefficients.json"):
        assert json.loads((lean / name).read_text()) == json.loads((full / name).read_text())
    # overwriting a run that kept weights leaves none of them beside the new report
    (lean / "merged").mkdir()
    main(["fit", "--config", str(config), "--export.save_weights=false", "--export.dirpath", str(lean),
          "--export.overwrite=true"])  # fmt: skip
    assert not (lean / "merged").exists() and (lean / "report.json").is_file()
