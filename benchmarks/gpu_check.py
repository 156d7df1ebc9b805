"""What only a GPU can show: ``divmerge-pl fit`` on CUDA against the same fit on the CPU.

    python benchmarks/gpu_check.py [--device cuda] [--tiny]

Every run is the real command (``divmerge_pl.cli.main``) on the same random experts, data and
seed; each one's learned coefficients are compared with the CPU float32 run's, and the float32
GPU run's exported weights with theta0 + sum Gamma tau computed on the CPU in float64. The
variants are the ones no CPU session could check: float32 on CUDA, merge on demand against the
whole merged copy, bf16-mixed, bfloat16 task vectors, and the DDP, FSDP and task-vector-sharding strategies
on one device. A run that fails is recorded with its error, not hidden. ``--device cpu`` runs the same
code with the CPU standing in for the GPU (the smoke test). Prints a table and writes
``results/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from pathlib import Path

import torch
import yaml
from common import add_common_args, build_experts, write_results
from safetensors.torch import load_file

from divmerge_pl.cli import main as divmerge_main

# name -> (trainer settings, model settings, largest coefficient difference from the CPU run
# that counts as agreement): float32 paths should agree to rounding; bf16 paths are reported
# against a looser bound, since each step's rounding moves the optimiser's path
VARIANTS: dict[str, tuple[dict, dict, float]] = {
    "fp32": ({}, {}, 1e-4),
    "fp32, whole merged copy": ({}, {"merge_on_demand": False}, 1e-4),
    "bf16-mixed": ({"precision": "bf16-mixed"}, {}, 5e-2),
    "bfloat16 task vectors": ({}, {"task_vector_dtype": "bfloat16"}, 5e-2),
    "ddp, 1 device": ({"strategy": "ddp"}, {}, 1e-4),
    "fsdp, 1 device": ({"strategy": "fsdp"}, {}, 1e-4),
    # the sharded mode's gather (DTensor, Shard -> Replicate) and its reduce-scatter in backward
    # on CUDA; W > 1 needs several GPUs: tests/test_sharding.py checks W = 2 with gloo on CPUs
    "task_vector_sharding, 1 device": ({"strategy": "task_vector_sharding"}, {}, 1e-4),
}


def write_config(setup: dict, folder: Path, steps: int, accelerator: str, trainer: dict, model: dict) -> Path:
    specs = [
        {"name": t, "train_files": f["train"], "eval_files": f["eval"], "num_samples": 64}
        for t, f in setup["data"].items()
    ]
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "divmerge_pl.DivMergeModule",
            "init_args": {
                "base": setup["base"],
                "experts": setup["experts"],
                "granularity": "layer",
                "teacher_cache": None,
                **model,
            },
        },
        "data": {
            "class_path": "divmerge_pl.MergeDataModule",
            "init_args": {"tasks": specs, "batch_size": 4 * len(specs), "max_length": 32},
        },
        "trainer": {
            "max_steps": steps,
            "default_root_dir": str(folder),
            "enable_progress_bar": False,
            "accelerator": accelerator,
            "devices": 1,
            **trainer,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(setup: dict, folder: Path, steps: int, accelerator: str, trainer: dict, model: dict) -> dict:
    """One ``divmerge-pl fit``: its coefficients and wall time, or the error it ended with."""
    config = write_config(setup, folder, steps, accelerator, trainer, model)
    start = time.perf_counter()
    try:
        divmerge_main(["fit", "--config", str(config)])
    except Exception as error:  # a variant that fails is a finding: record it and go on
        return {"error": f"{type(error).__name__}: {error}"[:600], "trace": traceback.format_exc()[-3000:]}
    (run,) = sorted((folder / "lightning_logs").iterdir())
    coefficients = json.loads((run / "coefficients.json").read_text())
    return {"run": str(run), "seconds": time.perf_counter() - start, "coefficients": coefficients}


def merge_error(setup: dict, run: Path, coefficients: dict) -> float:
    """Largest |exported weight - (theta0 + sum_t Gamma_t tau_t)|, the reference in float64."""
    base = {k: v.double() for k, v in load_file(Path(setup["base"]) / "model.safetensors").items()}
    experts = {t: load_file(Path(p) / "model.safetensors") for t, p in setup["experts"].items()}
    gamma = torch.tensor(coefficients["values"], dtype=torch.float64)
    groups = coefficients["groups"]
    worst = 0.0
    for task in coefficients["tasks"]:
        for name, value in load_file(run / "merged" / task / "model.safetensors").items():
            key = name.removeprefix("bert.")
            if key not in base:  # the task's own head: kept, not merged
                continue
            if name in groups:
                g = groups.index(name)
                taus = [experts[other][name].double() - base[key] for other in coefficients["tasks"]]
                expected = base[key] + sum(gamma[s, g] * tau for s, tau in enumerate(taus))
            else:  # equal in the base and every expert: stays the base's
                expected = base[key]
            worst = max(worst, (value.double() - expected).abs().max().item())
    return worst


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=32)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: the CPU stands in for the GPU (smoke test)")  # fmt: skip
    parser.set_defaults(tasks="3")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run it on a GPU machine, or with --device cpu")
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    # its own folder: build_experts reuses data files, and other scripts use 200 rows per task
    own = Path(args.root) / "gpu_check"
    setup = build_experts(own, int(args.tasks), rows=64, length=24, tiny=args.tiny)
    root = own / ("tiny" if args.tiny else "") / f"runs_{args.device}"
    if root.exists():  # this script's own scratch runs, never results
        shutil.rmtree(root)

    reference = fit(setup, root / "cpu", args.steps, "cpu", {}, {})
    if "error" in reference:
        raise SystemExit(f"the CPU reference run failed: {reference['error']}\n{reference['trace']}")
    ref = torch.tensor(reference["coefficients"]["values"])
    rows = [{"variant": "cpu fp32 (reference)", "seconds": reference["seconds"], "max_coef_diff": 0.0}]
    for name, (trainer, model, bound) in VARIANTS.items():
        slug = name.replace(",", "").replace(" ", "_")
        done = fit(setup, root / slug, args.steps, accelerator, trainer, model)
        row: dict = {"variant": f"{args.device} {name}", "bound": bound}
        if "error" in done:
            row.update(error=done["error"], trace=done["trace"])
        else:
            values = torch.tensor(done["coefficients"]["values"])
            row.update(seconds=done["seconds"], max_coef_diff=(values - ref).abs().max().item())
            row["agrees"] = row["max_coef_diff"] <= bound
            if name == "fp32":
                row["max_merge_error"] = merge_error(setup, Path(done["run"]), done["coefficients"])
        rows.append(row)

    print("\n| variant | wall (s) | max |Gamma - Gamma_cpu| | bound | merged weights vs float64 |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed | {r['error'][:120]} | | |")
            continue
        merge = f"{r['max_merge_error']:.1e}" if "max_merge_error" in r else ""
        bound = f"{r['bound']:.0e}" if "bound" in r else ""
        print(f"| {r['variant']} | {r['seconds']:.1f} | {r['max_coef_diff']:.2e} | {bound} | {merge} |")
    coefficients = reference["coefficients"]
    payload = {"device": args.device, "tasks": coefficients["tasks"], "groups": len(coefficients["groups"]),
               "reference_coefficient_spread": (ref.max() - ref.min()).item(), "results": rows}  # fmt: skip
    print(f"wrote {write_results('gpu_check', payload, args.results)}")


if __name__ == "__main__":
    main()
