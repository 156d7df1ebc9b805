"""Tiny random causal LMs (GPT-2 or Llama), a word-level tokenizer and prompt data, in tmp_path."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from .conftest import WORDS

LM_SPECIAL = ["<pad>", "<eos>", "<unk>"]
LM_WORDS = [*WORDS, "answer", "yes", "no", "?", ":", "business", "sport"]
LABEL_WORDS = {"alpha": ["good", "bad"], "beta": ["yes", "no"]}


def save_lm_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(LM_SPECIAL + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def lm_config(arch: str, vocab_size: int):
    if arch == "gpt2":  # ties lm_head to the input embeddings
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=64,
            bos_token_id=1, eos_token_id=1, pad_token_id=0,
        )  # fmt: skip
    return LlamaConfig(  # an untied head, as in larger Llamas
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip


def make_lm(folder: Path, arch: str, seed: int, base: Path | None = None, task: str | None = None):
    """A random base; or an expert: the base plus a random task vector on every tensor, then a
    few steps of training to answer ``<label word> <eos>`` (so answers have an end)."""
    tokenizer = save_lm_tokenizer(folder)
    torch.manual_seed(seed)
    cls = GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM
    if base is None:
        model = cls(lm_config(arch, len(tokenizer)))
        model.save_pretrained(folder)
        return model
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * (param.std() + 0.1) * torch.randn_like(param))
    rows = prompt_rows(32, task, seed)
    words = LABEL_WORDS[task]
    texts = [f"{r['text']} answer : {words[r['label']]} <eos>" for r in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    model.eval().save_pretrained(folder)
    return model


def prompt_rows(n: int, task: str, seed: int) -> list[dict]:
    """Texts whose label follows a rule an expert can learn (first word, or text length)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
        label = WORDS.index(words[0]) % 2 if task == "alpha" else int(len(words) > 5)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_prompt_rows(path: Path, n: int, task: str, seed: int) -> Path:
    with path.open("w") as handle:
        for row in prompt_rows(n, task, seed):
            handle.write(json.dumps(row) + "\n")
    return path


@dataclass
class TinyLM:
    root: Path
    base: Path
    experts: dict[str, Path]
    train: dict[str, Path]
    eval: dict[str, Path]

    def model_args(self, **extra) -> dict:
        return {
            "base": str(self.base),
            "experts": {t: str(p) for t, p in self.experts.items()},
            "teacher_cache": str(self.root / "teacher_cache"),
            "max_new_tokens": 4,
        } | extra

    def task_specs(self, num_samples: int = 16, metric: str = "accuracy") -> list[dict]:
        return [
            {
                "name": t,
                "train_files": str(self.train[t]),
                "eval_files": str(self.eval[t]),
                "prompt": "{text} answer :",
                "label_words": LABEL_WORDS[t],
                "label_field": "label",
                "num_samples": num_samples,
                "metric": metric,
            }
            for t in self.experts
        ]


def build_lm_setup(root: Path, arch: str = "gpt2", tasks: tuple[str, ...] = ("alpha", "beta")) -> TinyLM:
    base = root / "base"
    make_lm(base, arch, seed=0)
    experts, train, evals = {}, {}, {}
    for i, task in enumerate(tasks):
        experts[task] = root / "experts" / task
        make_lm(experts[task], arch, seed=100 + i, base=base, task=task)
        data = root / "data" / task
        data.mkdir(parents=True)
        train[task] = write_prompt_rows(data / "train.jsonl", 24, task, seed=10 + i)
        evals[task] = write_prompt_rows(data / "eval.jsonl", 8, task, seed=20 + i)
    return TinyLM(root, base, experts, train, evals)
