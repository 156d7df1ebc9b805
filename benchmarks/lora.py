"""LoRA experts of MiniLM, fine-tuned here and merged by DivMerge over their factors: per task,
the expert's test accuracy, the merged model's, and their ratio (normalised score).

    python benchmarks/lora.py [--tasks bbc_news,amazon_reviews,trump_tweets] [--epochs 3]

1. data and base as the embedded demo prepares them (divmerge_pl/demo/tasks.py; configs/demo.yaml's
   sizes: train 1000 / val 200 / test 300 rows per task), in the demo's cache (reused);
2. one LoRA expert per task: peft, r = 8, alpha 16, on every attention and MLP linear of the
   encoder, the classification head trained whole (``modules_to_save``), trained on ``train``
   with AdamW and early stopping on ``val`` by the demo's fine-tuning loop
   (divmerge_pl/demo/training.py), saved by ``PeftModel.save_pretrained``; reused when present;
3. ``divmerge-pl fit`` with those adapter folders as ``model.experts`` and the demo's settings
   (JS, layer granularity, lr 1e-2, init 1/N, 4 epochs, batch 4 x tasks, 200 unlabelled ``val``
   inputs per task), scored on ``test``; then each of ``--methods`` by ``divmerge-pl merge``
   (recorded as refused where this version refuses training-free merges over adapters).

Writes benchmarks/results/lora.json. ``--tiny``: a 2-layer hidden-32 random BERT and a few
synthetic rows per task, so the tests can run the whole script in seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))
from common import RESULTS, WORDS, build_experts, write_results  # noqa: E402

from divmerge_pl.cli import main as divmerge_pl  # noqa: E402
from divmerge_pl.demo.tasks import prepare_base, prepare_task  # noqa: E402
from divmerge_pl.demo.training import finetune_expert  # noqa: E402

DEMO_TASKS = "bbc_news,amazon_reviews,trump_tweets"
# every attention and MLP linear of a BERT encoder layer (not the pooler): peft matches the whole name
ENCODER_LINEARS = r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"  # noqa: E501
SIZES = {"train_size": 1000, "val_size": 200, "test_size": 300}  # configs/demo.yaml's
TINY_SIZES = {"train_size": 24, "val_size": 12, "test_size": 12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=DEMO_TASKS, help="demo task names, comma-separated")
    parser.add_argument("--data_root", default="~/.cache/divmerge_pl/demo", help="the demo's data and base")
    parser.add_argument(
        "--root", default="~/.cache/divmerge_pl/lora_bench", help="LoRA experts, teachers, runs"
    )
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="most epochs of LoRA training")
    parser.add_argument("--patience", type=int, default=1, help="early stopping on val accuracy")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of LoRA training")
    parser.add_argument("--merge_epochs", type=int, default=4, help="DivMerge's epochs (the demo's)")
    parser.add_argument("--inputs", type=int, default=200, help="unlabelled val inputs per task")
    parser.add_argument("--methods", default="task_arithmetic,average", help="training-free methods")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default="", help="what else the cores were doing, for the record")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-32 model (smoke runs)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.data_root = args.root = str(Path(args.root).expanduser() / "tiny")
        args.epochs, args.merge_epochs, args.inputs = 2, 1, TINY_SIZES["val_size"]
    return args


def tiny_base_and_tasks(root: Path, tasks: list[str], seed: int) -> tuple[Path, dict[str, Path]]:
    """The benchmarks' tiny random BERT, and per task a few rows whose label shows in the text
    (a word of its own), split like the demo's (``train`` / ``val`` / ``test`` + labels.json)."""
    base = Path(build_experts(root, 0, tiny=True)["base"])
    rng = random.Random(seed)
    folders = {}
    for t, task in enumerate(tasks):
        folder = root / "data" / task
        labels = [f"{task}_{i}" for i in range(2 + t % 2)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "labels.json").write_text(json.dumps(labels) + "\n")
        rows = {}
        for split in ("train", "val", "test"):
            rows[split] = []
            for _ in range(TINY_SIZES[f"{split}_size"]):
                label = rng.randrange(len(labels))
                words = [WORDS[100 * t + label]] + rng.sample(WORDS, 12)
                rows[split].append({"text": " ".join(words), "label": label})
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
        sizes = {split: len(r) for split, r in rows.items()}
        (folder / "splits.json").write_text(json.dumps({"asked": sizes, "rows": sizes}) + "\n")
        folders[task] = folder
    return base, folders


def lora_settings(args: argparse.Namespace) -> dict:
    """peft.LoraConfig's settings (task type SEQ_CLS is added by the training loop)."""
    return {"r": args.rank, "lora_alpha": args.alpha, "target_modules": ENCODER_LINEARS}


def train_experts(args, base: Path, data: dict[str, Path]) -> tuple[dict[str, Path], dict[str, dict]]:
    root = Path(args.root).expanduser()
    experts, summaries = {}, {}
    for task, folder in data.items():
        experts[task] = root / "experts" / task
        summaries[task] = finetune_expert(
            base, folder, experts[task], epochs=args.epochs, patience=args.patience, lr=args.lr,
            max_length=args.max_length, seed=args.seed, show_progress=False, lora=lora_settings(args),
        )  # fmt: skip
        s = summaries[task]
        print(
            f"LoRA expert {task}: test accuracy {s['eval_accuracy']:.3f} "
            f"(majority {s['majority_rate']:.3f}), "
            f"best epoch {s['best_epoch']} of {s['epochs_run']}, {s['seconds']:.0f} s",
            flush=True,
        )
    return experts, summaries


def write_config(args, base: Path, experts: dict[str, Path], data: dict[str, Path]) -> Path:
    """configs/demo.yaml's merge over the LoRA experts, scored once, at the end, on ``test``."""
    root = Path(args.root).expanduser()
    config = {
        "seed_everything": args.seed,
        "model": {
            "class_path": "divmerge_pl.DivMergeModule",
            "init_args": {
                "base": str(base),
                "experts": {task: str(folder) for task, folder in experts.items()},
                "objective": "js",
                "granularity": "layer",
                "lr": 0.01,
                "init": None,  # 1/N
                "teacher_cache": str(root / "teachers"),
            },
        },
        "data": {
            "class_path": "divmerge_pl.MergeDataModule",
            "init_args": {
                "batch_size": 4 * len(experts),
                "max_length": args.max_length,
                "tasks": [
                    {
                        "name": task,
                        "train_files": str(folder / "val.jsonl"),  # held out from the expert
                        "val_files": str(folder / "val.jsonl"),  # baselines choose their scale here
                        "eval_files": str(folder / "test.jsonl"),  # scored
                        "text_fields": ["text"],
                        "num_samples": args.inputs,
                    }
                    for task, folder in data.items()
                ],
            },
        },
        "export": {"save_weights": False},  # the scores are what is measured
        "trainer": {
            "max_epochs": args.merge_epochs,
            "check_val_every_n_epoch": 1000,  # scored once, at the end, by the export
            "num_sanity_val_steps": 0,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
        },
    }
    path = root / "runs" / "merge.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_merges(args, config: Path) -> dict[str, dict]:
    """DivMerge by ``fit``, then each training-free method by ``merge``: method -> report.json
    and wall time (or why it was refused)."""
    runs = Path(args.root).expanduser() / "runs"
    results = {}
    commands = {"divmerge": ["fit"]}
    commands.update(
        {m.strip(): ["merge", "--method", m.strip()] for m in args.methods.split(",") if m.strip()}
    )
    for method, command in commands.items():
        out = runs / method
        shutil.rmtree(out, ignore_errors=True)  # a run of an earlier call of this script
        start = time.perf_counter()
        try:
            divmerge_pl([*command, "--config", str(config), f"--trainer.default_root_dir={out}"])
        except ValueError as err:  # e.g. training-free merges over adapters, where not supported
            results[method] = {"refused": str(err)}
            print(f"{method}: refused: {err}", flush=True)
            continue
        results[method] = {
            "report": json.loads((out / "report.json").read_text()),
            "seconds": round(time.perf_counter() - start, 1),
        }
    return results


def adapter_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def table(tasks: list[str], merges: dict[str, dict]) -> str:
    ran = [m for m, r in merges.items() if "report" in r]
    head = "| task | LoRA expert | " + " | ".join(f"{m} | normalised" for m in ran) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(ran)]
    for task in [*tasks, "average"]:
        rows = {m: merges[m]["report"]["tasks" if task != "average" else "average"] for m in ran}
        rows = {m: (r[task] if task != "average" else r) for m, r in rows.items()}
        expert = rows[ran[0]]["expert"]
        cells = " | ".join(f"{r['merged']:.3f} | {r['normalized']:.3f}" for r in rows.values())
        lines.append(f"| {task} | {expert:.3f} | {cells} |")
    refused = [f"{m}: refused ({r['refused']})" for m, r in merges.items() if "refused" in r]
    return "\n".join(lines + refused) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    data_root = Path(args.data_root).expanduser()
    if args.tiny:
        base, data = tiny_base_and_tasks(data_root, tasks, args.seed)
    else:
        base = prepare_base(data_root)
        data = {t: prepare_task(data_root, t, **SIZES, seed=args.seed) for t in tasks}
    start = time.perf_counter()
    experts, summaries = train_experts(args, base, data)
    training_s = time.perf_counter() - start
    merges = run_merges(args, write_config(args, base, experts, data))
    print("\n" + table(tasks, merges))
    payload = {
        "date": datetime.date.today().isoformat(),
        "note": args.note,
        "settings": {k: v for k, v in vars(args).items() if k not in ("results", "note")},
        "lora": lora_settings(args),
        "experts": {t: {**s, "adapter_bytes": adapter_bytes(experts[t])} for t, s in summaries.items()},
        "expert_training_s": round(training_s, 1),
        "merges": merges,
    }
    print(f"wrote {write_results('lora', payload, args.results)}")
    return payload


if __name__ == "__main__":
    main()
