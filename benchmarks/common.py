"""Shared pieces of the benchmarks: MiniLM-sized experts, data files, a step timer, the
machine's description, the arguments every script takes. Experts are random (MiniLM's shapes,
no download): cost does not depend on what the weights have learned. ``--tiny`` swaps in a
2-layer, hidden-32 model so the tests can smoke-run every script in seconds."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

WORDS = [f"w{i}" for i in range(2000)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
RESULTS = Path(__file__).parent / "results"


def proc_status(key: str) -> int:
    """Bytes of a ``/proc/self/status`` field (``VmRSS``, ``VmHWM``): the memory benchmarks' child
    processes read their own resident and peak sizes."""
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def add_common_args(parser: argparse.ArgumentParser, steps: int) -> argparse.ArgumentParser:
    parser.add_argument("--tasks", default="2,4,8", help="numbers of experts, comma-separated")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "divmerge_bench"),
                        help="where the random experts and data are built (reused)")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-32 model (smoke runs)")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the JSON results")
    return parser


def expert_setups(args: argparse.Namespace) -> Iterator[tuple[int, dict]]:
    """For each N of ``--tasks``: the first N experts and their data (built once, reused)."""
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    for n in [int(x) for x in args.tasks.split(",")]:
        setup = build_experts(Path(args.root), n, length=args.length, tiny=args.tiny)
        setup["experts"] = dict(list(setup["experts"].items())[:n])
        setup["data"] = dict(list(setup["data"].items())[:n])
        yield n, setup


def minilm_config(num_labels: int = 2, tiny: bool = False) -> BertConfig:
    """all-MiniLM-L6-v2's shapes: 6 layers, hidden 384, 12 heads, 22.7M parameters."""
    if tiny:
        return BertConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                          num_labels=num_labels)  # fmt: skip
    return BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=num_labels,
    )


def build_experts(
    root: Path,
    num_tasks: int,
    rows: int = 200,
    length: int = 48,
    tiny: bool = False,
    every_tensor: bool = False,
) -> dict:
    """A base, ``num_tasks`` experts (base + noise on every tensor but the word embeddings, a new
    head each) and ``rows`` unlabelled + 64 labelled rows per task; reused when present.
    ``every_tensor``: the word embeddings get noise too (other experts, in their own folder), so
    every tensor is a task vector, as after a full fine-tune."""
    root = root / "tiny" if tiny else root
    root.mkdir(parents=True, exist_ok=True)
    base = root / "base"
    if not (base / "model.safetensors").is_file():
        torch.manual_seed(0)
        BertModel(minilm_config(tiny=tiny)).save_pretrained(base)
        vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
        BertTokenizerFast(vocab=vocab).save_pretrained(base)
    experts, data = {}, {}
    rng = random.Random(0)
    for t in range(num_tasks):
        name = f"task{t}"
        folder = root / ("experts_every_tensor" if every_tensor else "experts") / name
        if not (folder / "model.safetensors").is_file():
            torch.manual_seed(100 + t)
            model = BertForSequenceClassification(minilm_config(num_labels=2 + t % 3, tiny=tiny))
            model.bert.load_state_dict(BertModel.from_pretrained(base).state_dict())
            with torch.no_grad():
                for param_name, param in model.bert.named_parameters():
                    if every_tensor or "word_embeddings" not in param_name:
                        param.add_(0.01 * torch.randn_like(param))
            model.save_pretrained(folder)
        experts[name] = str(folder)
        files = root / "data" / name
        files.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("eval", 64)):
            path = files / f"{split}.jsonl"
            if not path.is_file():
                lines = [
                    json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(length)), "label": 0})
                    for _ in range(n)
                ]
                path.write_text("\n".join(lines) + "\n")
        data[name] = {"train": str(files / "train.jsonl"), "eval": str(files / "eval.jsonl")}
    return {"base": str(base), "experts": experts, "data": data}


class StepTimer(L.Callback):
    """Wall time of each training step (batch start to batch end, optimizer step included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args) -> None:
        _wait_for_device()
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        _wait_for_device()
        self.times.append(time.perf_counter() - self._start)

    def fastest(self) -> float:
        return fastest_step(self.times)


def _wait_for_device() -> None:
    """CUDA kernels run asynchronously: without a wait, a step's time is only its launches."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def gpu_peak() -> Iterator[dict]:
    """Peak GPU memory allocated inside the block, in MiB (``{}`` without a GPU)."""
    found: dict = {}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield found
    if torch.cuda.is_available():
        found["mib"] = torch.cuda.max_memory_allocated() / 2**20


def fastest_step(times: list[float], skip: int = 2) -> float:
    """The fastest step after ``skip`` warm-ups: on a shared VM, interference only adds time
    (a median over 10 steps still moved a ratio by 0.5 between runs)."""
    return min(times[skip:])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def write_results(name: str, payload: dict, folder: str | Path = RESULTS) -> Path:
    out = Path(folder) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    return out
