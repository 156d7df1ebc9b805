"""Fine-tune one demo expert per task from the base model (once; the result is cached).

Word embeddings are frozen, as is common when fine-tuning small encoders: they are half of
MiniLM's parameters, and keeping them equal to the base means no task vector is kept for them.
The same loop trains a LoRA expert (a peft adapter folder) when given LoRA settings
(benchmarks/lora.py); without them it is the demo's full fine-tuning, unchanged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup
from transformers import logging as hf_logging

from ..atomic import atomic_folder


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a ``.jsonl`` file written by ``tasks.prepare_task``."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _batches(tokenizer, rows: list[dict], batch_size: int, max_length: int, shuffle: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)

    def collate(chunk: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [r["text"] for r in chunk],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        batch["labels"] = torch.tensor([r["label"] for r in chunk])
        return batch

    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


@torch.no_grad()
def class_probabilities(model, tokenizer, rows: list[dict], max_length: int) -> torch.Tensor:
    """The model's class probabilities on ``rows`` ``[rows, classes]``."""
    model.eval()
    parts = []
    for batch in _batches(tokenizer, rows, 64, max_length, False, 0):
        batch.pop("labels")
        parts.append(torch.softmax(model(**batch).logits.float(), dim=-1))
    return torch.cat(parts)


def expert_quality(probs: torch.Tensor, labels: list[int]) -> dict[str, float]:
    """Accuracy, the majority-class rate and the mean top probability (how sure the expert is):
    a task enters a benchmark only if its expert is clearly above its majority class."""
    target = torch.tensor(labels)
    majority = torch.bincount(target).max().item() / len(labels)
    return {
        "accuracy": float((probs.argmax(-1) == target).float().mean()),
        "majority_rate": majority,
        "mean_top_probability": float(probs.max(-1).values.mean()),
    }


def optimizer_step(loss: torch.Tensor, optimizer, schedule, bar: tqdm) -> None:
    """One step of a demo fine-tuning (the encoder's and the LM's): backward, update, learning
    rate, and the loss on the progress bar."""
    loss.backward()
    optimizer.step()
    schedule.step()
    optimizer.zero_grad()
    bar.update(1)
    bar.set_postfix(loss=f"{loss.item():.3f}")


def finetune_expert(
    base: Path,
    task_dir: Path,
    out_dir: Path,
    *,
    epochs: int = 1,
    patience: int | None = None,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
    show_progress: bool = True,
    lora: dict | None = None,
) -> dict:
    """Fully fine-tune ``base`` (embeddings frozen) on ``task_dir/train.jsonl``; save to ``out_dir``.

    With ``lora`` (``peft.LoraConfig``'s settings, JSON values), train a LoRA adapter instead
    (and the classification head whole, in ``modules_to_save``): ``out_dir`` is then the adapter
    folder that ``PeftModel.save_pretrained`` writes.

    With ``patience``, as a user would train to convergence: up to ``epochs`` epochs, scored on
    the held-out ``val.jsonl`` after each, stopping once ``patience`` epochs bring no gain, and
    keeping the best epoch's weights. The summary scores the kept model on ``test.jsonl``.
    Reused when ``out_dir`` holds an expert trained with the same settings.
    """
    settings = {
        "epochs": epochs,
        "patience": patience,
        "batch_size": batch_size,
        "lr": lr,
        "max_length": max_length,
        "seed": seed,
        "splits": json.loads((task_dir / "splits.json").read_text())["rows"],
    }
    if lora is not None:  # only then: a full expert's settings, and so its cache key, are unchanged
        settings["lora"] = lora
    done = out_dir / "finetune.json"
    if done.is_file():
        summary = json.loads(done.read_text())
        if summary.get("settings") == settings:
            return summary
    labels = json.loads((task_dir / "labels.json").read_text())
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier": expected, it is the new head
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        dtype=torch.float32,
    )
    hf_logging.set_verbosity(verbosity)
    model.get_input_embeddings().weight.requires_grad_(False)
    if lora is not None:
        model = with_lora(model, lora)
    train = jsonl_rows(task_dir / "train.jsonl")
    val = jsonl_rows(task_dir / "val.jsonl")
    loader = _batches(tokenizer, train, batch_size, max_length, True, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = epochs * len(loader)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    start = time.perf_counter()
    history: list[float] = []
    best_state, best_epoch = None, None
    with tqdm(total=steps, desc=f"fine-tuning expert {out_dir.name}", disable=not show_progress) as bar:
        for epoch in range(epochs):
            model.train()
            for batch in loader:
                optimizer_step(model(**batch).loss, optimizer, schedule, bar)
            if patience is None:
                continue
            probs = class_probabilities(model, tokenizer, val, max_length)
            history.append(expert_quality(probs, [r["label"] for r in val])["accuracy"])
            if best_epoch is None or history[-1] > history[best_epoch]:
                best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best_epoch >= patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    seconds = time.perf_counter() - start
    test = jsonl_rows(task_dir / "test.jsonl")
    quality = expert_quality(
        class_probabilities(model, tokenizer, test, max_length), [r["label"] for r in test]
    )
    summary = {
        "task": out_dir.name,
        "eval_accuracy": quality["accuracy"],
        "majority_rate": quality["majority_rate"],
        "mean_top_probability": quality["mean_top_probability"],
        "val_accuracy_per_epoch": history,
        "epochs_run": len(history) if patience is not None else epochs,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "train_rows": len(train),
        "settings": settings,
        "seconds": round(seconds, 1),
    }
    save_expert(model, tokenizer, summary, out_dir)
    return summary


def with_lora(model, lora: dict):
    """``model`` wrapped in a peft LoRA of ``lora``'s settings; ``task_type="SEQ_CLS"`` makes
    peft train the classification head whole and save it with the adapter (a merge needs each
    expert's own head). Everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **lora))


def save_expert(model, tokenizer, summary: dict, out_dir: Path) -> None:
    """Model, tokenizer and ``finetune.json`` written beside ``out_dir`` then renamed into place:
    a run killed while saving leaves no folder that a later run would take for a finished expert."""
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
