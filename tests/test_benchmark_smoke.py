"""Smoke runs of the speed and memory benchmarks on a 2-layer hidden-32 model: each script
runs end to end and writes JSON whose numbers hold together (timings themselves are not
asserted: they are only meaningful on idle cores, in benchmarks/results)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_script(name: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results"
    argv = [sys.executable, str(BENCH / f"{name}.py"), "--tiny", "--tasks", "2", "--steps", "3",
            "--root", str(tmp_path / "experts"), "--results", str(out), *extra]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=BENCH, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / f"{name}.json").read_text())


def test_step_cost_counts_one_expert_forward_per_input_then_none(tmp_path: Path):
    result = run_script("step_cost", tmp_path)
    variants = [(r["granularity"], r["merge_on_demand"], r["options"]) for r in result["results"]]
    assert variants == [
        ("task", True, {}),
        ("layer", True, {}),
        ("layer", False, {}),
        ("layer", True, {"task_weighting": "relative"}),
        ("layer", True, {"teacher_temperature": 0.5}),
        ("channel", True, {}),
        ("layer", True, {"task_vector_transform": "tsv"}),
        ("channel", True, {"task_vector_transform": "tsv"}),
    ]
    for row in result["results"]:
        assert row["ratio"] == pytest.approx(row["divmerge_step_s"] / row["plain_step_s"])
    teacher = result["teacher_cache"]
    assert teacher["expert_forward_rows_run1"] == teacher["inputs"] == 400
    assert teacher["expert_forward_rows_run2"] == 0
    assert result["machine"]["torch"].startswith("2.13.0")


def test_peer_benchmark_times_our_side_without_fusion_bench(tmp_path: Path):
    result = run_script("peer_adamerging", tmp_path)
    (row,) = result["results"]
    assert row["tasks"] == 2 and row["batch"] == 8 and row["ours_step_s"] > 0
    if result["fusion_bench"] is None:
        assert row["fusionbench_step_s"] is None and row["ratio"] is None
    else:
        assert row["ratio"] == pytest.approx(row["ours_step_s"] / row["fusionbench_step_s"])


SMALL_SHARDED = ("--sharded_tasks", "2", "--processes", "1,2")


def test_memory_bfloat16_vectors_take_half_the_bytes(tmp_path: Path):
    result = run_script("memory", tmp_path, *SMALL_SHARDED)
    fp32, bf16 = result["results"]
    assert (fp32["task_vector_dtype"], bf16["task_vector_dtype"]) == ("float32", "bfloat16")
    assert bf16["task_vector_bytes"] * 2 == fp32["task_vector_bytes"] > 0
    assert fp32["base_bytes"] == bf16["base_bytes"] > 0
    for row in (fp32, bf16):
        held = row["base_bytes"] + row["task_vector_bytes"]
        assert row["ratio_to_base_plus_vectors"] == pytest.approx(row["peak_added"] / held)
        assert row["activations_peak_added"] > 0


def linear_weights(tiny_model) -> list[tuple[int, int]]:
    """(d_out, d_in) of every linear that peft's ``all-linear`` targets (all but the head)."""
    return [
        tuple(m.weight.shape)
        for name, m in tiny_model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.startswith("classifier")
    ]


def test_memory_lora_experts_hold_their_factors_not_dense_vectors(tmp_path: Path):
    """The LoRA rows: the adapters' task vectors are exactly their stacked factors (r per target,
    plus a task index and a scaling per rank), the same experts as dense models hold one
    d_out x d_in difference per linear, and nothing else differs from the base."""
    sys.path.insert(0, str(BENCH))
    from common import minilm_config
    from transformers import BertForSequenceClassification

    result = run_script("memory", tmp_path, *SMALL_SHARDED)
    shapes = linear_weights(BertForSequenceClassification(minilm_config(tiny=True)))
    lora = result["lora_vs_dense"]
    (row,) = lora["results"]
    n, r = row["tasks"], lora["rank"]
    assert (n, r) == (2, 8)
    factors = sum(r * (d_out + d_in) * 4 + r * (8 + 4) for d_out, d_in in shapes)  # float32; long + float
    assert row["lora_task_vector_bytes"] == row["lora_low_rank_bytes"] == n * factors
    assert row["dense_task_vector_bytes"] == n * sum(d_out * d_in * 4 for d_out, d_in in shapes)
    assert row["dense_low_rank_bytes"] == 0
    assert row["dense_over_lora"] == pytest.approx(
        row["dense_task_vector_bytes"] / row["lora_task_vector_bytes"]
    )
    assert row["lora_load_peak_added"] > 0 and row["dense_load_peak_added"] > 0


def test_memory_sharded_ranks_hold_their_share_and_the_projection_adds_up(tmp_path: Path):
    """--sharded alone: 1 and 2 gloo processes fit through Lightning; every tensor is a task
    vector, each of 2 ranks holds (N + 1) / 2 of the cut tensors + the heads (within 1.15x),
    half of what 1 process holds; the projection is the per-rank formula plus its assumptions,
    and the other sections already in memory.json stay."""
    out = tmp_path / "results"
    out.mkdir()
    (out / "memory.json").write_text(json.dumps({"machine": {}, "results": ["kept"]}))
    result = run_script("memory", tmp_path, "--sharded", *SMALL_SHARDED)
    assert result["results"] == ["kept"]
    rows = result["sharded"]["results"]
    ranks = [(r["processes"], r["rank"], r["sharded"]) for r in rows]
    assert ranks == [(1, 0, False), (2, 0, True), (2, 1, True)]
    single = rows[0]
    for row in rows:
        assert row["task_vector_fraction"] == 1.0 and row["tasks"] == 2
        expected = 3 / row["processes"] * row["cut_bytes"] + row["head_bytes"]
        assert row["formula_bytes"] == pytest.approx(expected)
        assert 0.95 < row["held_over_formula"] < 1.15  # the last rank holds a row fewer
        assert row["steps_peak_added"] > 0 and 0 < row["largest_module_bytes"] < row["cut_bytes"]
    for row in rows[1:]:
        assert row["held_bytes"] < 0.55 * single["held_bytes"]
    projection = result["sharded"]["projection"]
    assert projection["held_over_formula"] == max(r["held_over_formula"] for r in rows)
    a = projection["assumptions"]
    (seven_8_8,) = [r for r in projection["rows"] if (r["model"], r["tasks"], r["gpus"]) == ("7B", 8, 8)]
    frozen = 6_738_415_616 * (a["base_bytes_per_param"] + 8 * a["task_vector_bytes_per_param"])
    assert seven_8_8["frozen_per_gpu_ddp"] == frozen
    assert seven_8_8["frozen_per_gpu_sharded"] == pytest.approx(projection["held_over_formula"] * frozen / 8)
    assert seven_8_8["largest_module_gathered"] == a["largest_module_copies"] * 32000 * 4096 * 4
    assert seven_8_8["export_per_gpu_sharded"] == pytest.approx(
        seven_8_8["frozen_per_gpu_sharded"] + 6_738_415_616 * a["base_bytes_per_param"]
    )
    assert seven_8_8["sharded_fits"] and not seven_8_8["ddp_fits"]


def test_lora_benchmark_trains_adapters_and_merges_them(tmp_path: Path):
    """benchmarks/lora.py end to end on the tiny BERT: LoRA experts written as peft adapter
    folders (with their head), merged by fit, scored per task; training-free methods either
    scored or refused with the reason."""
    out = tmp_path / "results"
    argv = [sys.executable, str(BENCH / "lora.py"), "--tiny", "--tasks", "alpha,beta",
            "--root", str(tmp_path / "work"), "--results", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, cwd=BENCH, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "lora.json").read_text())
    assert result["lora"]["r"] == 8 and result["lora"]["lora_alpha"] == 16
    for task, expert in result["experts"].items():
        folder = tmp_path / "work" / "tiny" / "experts" / task
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["peft_type"], config["task_type"], config["r"]) == ("LORA", "SEQ_CLS", 8)
        assert not (folder / "model.safetensors").exists()  # an adapter, not a full model
        assert expert["adapter_bytes"] == (folder / "adapter_model.safetensors").stat().st_size
        assert expert["settings"]["lora"] == result["lora"]
    report = result["merges"]["divmerge"]["report"]
    assert set(report["tasks"]) == {"alpha", "beta"}
    for task, row in report["tasks"].items():  # the merge's expert (its factors) is the peft model
        assert row["expert"] == pytest.approx(result["experts"][task]["eval_accuracy"])
        assert 0 <= row["merged"] <= 1
    for method in ("task_arithmetic", "average"):
        assert "report" in result["merges"][method] or "LoRA" in result["merges"][method]["refused"]
    assert "| alpha |" in done.stdout and "| average |" in done.stdout


def test_gpu_check_with_the_cpu_standing_in(tmp_path: Path):
    """The GPU check's own code path: on the CPU every float32 variant must equal the CPU run,
    and the bf16 ones must differ from it, within their bound."""
    result = run_script("gpu_check", tmp_path, "--device", "cpu")
    rows = {row["variant"].removeprefix("cpu "): row for row in result["results"]}
    assert result["reference_coefficient_spread"] > 0  # the coefficients moved from their start
    assert rows["fp32"]["max_coef_diff"] == 0.0 and rows["fp32"]["max_merge_error"] < 1e-6
    assert rows["fp32, whole merged copy"]["max_coef_diff"] <= 1e-6
    assert rows["ddp, 1 device"]["max_coef_diff"] <= 1e-6
    for name in ("bf16-mixed", "bfloat16 task vectors"):
        assert 0 < rows[name]["max_coef_diff"] <= rows[name]["bound"]
    assert "error" in rows["fsdp, 1 device"]  # refused: Lightning's FSDP needs a GPU, ours refuses it
