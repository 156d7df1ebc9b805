"""Tiny random ``transformers`` models and data files, built in ``tmp_path`` for each test."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "movie",
    "food",
    "game",
    "team",
    "vote",
    "party",
    "market",
    "price",
    "goal",
    "match",
    "film",
    "actor",
    "tasty",
    "bland",
    "win",
    "loss",
    "stock",
    "bank",
    "rain",
    "sun",
    "cold",
    "warm",
    "happy",
    "sad",
    "fast",
    "slow",
    "red",
    "blue",
    "big",
    "small",
]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_config(num_labels: int = 2, **overrides) -> BertConfig:
    settings = dict(
        vocab_size=len(SPECIAL) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=num_labels,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def save_tokenizer(folder: Path) -> BertTokenizerFast:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(SPECIAL + WORDS)}, do_lower_case=True)
    assert tokenizer("good movie")["input_ids"] == [2, 5, 9, 3], "tiny tokenizer lost its vocabulary"
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_base(folder: Path, seed: int = 0, **overrides) -> BertModel:
    torch.manual_seed(seed)
    model = BertModel(tiny_config(**overrides))
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model


def make_expert(
    base: Path, folder: Path, num_labels: int, seed: int, scale: float = 0.05, **overrides
) -> BertForSequenceClassification:
    """The base plus a random task vector (``scale`` x N(0,1)) and a new random head."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_labels, **overrides))
    base_model = BertModel.from_pretrained(base)
    with torch.no_grad():
        model.bert.load_state_dict(base_model.state_dict())
        for name, param in model.bert.named_parameters():
            if "word_embeddings" not in name:  # frozen in fine-tuning, as in the demo
                param.add_(scale * torch.randn_like(param))
        model.classifier.weight.mul_(20.0)  # confident heads: distributions worth matching
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model


def write_rows(path: Path, n: int, num_labels: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            handle.write(json.dumps({"text": text, "label": rng.randrange(num_labels)}) + "\n")
    return path


@dataclass
class TinySetup:
    root: Path
    base: Path
    experts: dict[str, Path]
    train: dict[str, Path]
    eval: dict[str, Path]
    labels: dict[str, int]

    def model_args(self, **extra) -> dict:
        return {
            "base": str(self.base),
            "experts": {t: str(p) for t, p in self.experts.items()},
            "teacher_cache": str(self.root / "teacher_cache"),
            **extra,
        }

    def task_specs(self, num_samples: int = 24, eval_samples: int | None = None) -> list[dict]:
        return [
            {
                "name": t,
                "train_files": str(self.train[t]),
                "eval_files": str(self.eval[t]),
                "text_fields": ["text"],
                "label_field": "label",
                "num_samples": num_samples,
                "eval_samples": eval_samples,
            }
            for t in self.experts
        ]


def build_setup(root: Path, labels: dict[str, int], scale: float = 0.05) -> TinySetup:
    base = root / "base"
    make_base(base)
    experts, train, evals = {}, {}, {}
    for i, (task, k) in enumerate(labels.items()):
        experts[task] = root / "experts" / task
        make_expert(base, experts[task], k, seed=100 + i, scale=scale)
        data = root / "data" / task
        data.mkdir(parents=True)
        train[task] = write_rows(data / "train.jsonl", 40, k, seed=10 + i)
        evals[task] = write_rows(data / "eval.jsonl", 20, k, seed=20 + i)
    return TinySetup(root, base, experts, train, evals, labels)


@pytest.fixture
def tiny(tmp_path: Path) -> TinySetup:
    """Two tiny experts with different label counts (2 and 3), their data files."""
    return build_setup(tmp_path, {"alpha": 2, "beta": 3})


def per_task_logits(module, t: int, merged: dict, batch: dict, rows) -> torch.Tensor:
    """Task ``t``'s logits from its own full forward on its rows: the reference path."""
    from divmerge_pl.data import MODEL_INPUTS
    from divmerge_pl.merged import forward_logits

    inputs = {k: batch[k][rows] for k in MODEL_INPUTS if k in batch}
    return forward_logits(module.frozen.base_model, {**merged, **module.frozen.head(t)}, inputs)
