"""Time per step of our entropy objective (``adamerging_layer``) against FusionBench's
layer-wise AdaMerging loop, on the same experts, the same batches and the same threads.

    pip install --no-deps fusion-bench==0.2.33 hydra-core omegaconf bidict   # their side
    python benchmarks/peer_adamerging.py [--tasks 2,4,8] [--steps 12] [--length 64]

Their side is driven the way their AdaMerging algorithms drive it (its structure, not their
code): ``fusion_bench.models.wrappers.layer_wise_fusion.LayerWiseMergedModel`` over the base
backbone and the experts' backbones, one coefficient per task per parameter tensor, and per
step one forward, entropy loss and ``backward(retain_graph=True)`` per task on that task's
rows, then Adam and ``merge_weights()``. Each task's classification head is applied to the
merged backbone's pooled output, as their CLIP loop applies its frozen zero-shot heads.
Without fusion-bench installed only our side is timed. Writes results/peer_adamerging.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from common import StepTimer, add_common_args, expert_setups, fastest_step, write_results
from step_cost import datamodule, trainer
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from divmerge_pl import DivMergeModule

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def our_step_seconds(setup: dict, steps: int, length: int) -> float:
    """Fastest step of ``divmerge-pl``'s entropy objective, layer granularity, batch 4 x N."""
    timer = StepTimer()
    module = DivMergeModule(setup["base"], setup["experts"], objective="entropy", granularity="layer",
                            teacher_cache=None)  # fmt: skip
    n = len(setup["experts"])
    trainer(steps, timer).fit(module, datamodule=datamodule(setup, 4 * n, length))
    return timer.fastest()


def task_batches(setup: dict, steps: int, length: int) -> list[list[dict]]:
    """Per step, 4 rows of each task, tokenised as our data module does (64 tokens here)."""
    tokenizer = AutoTokenizer.from_pretrained(setup["base"])
    per_task = []
    for files in setup["data"].values():
        texts = [line for line in Path(files["train"]).read_text().splitlines() if line]
        texts = [json.loads(t)["text"] for t in texts]
        rows = [texts[(4 * s) % len(texts) : (4 * s) % len(texts) + 4] for s in range(steps)]
        per_task.append([tokenizer(r, truncation=True, max_length=length, padding=True,
                                   return_tensors="pt") for r in rows])  # fmt: skip
    return [[task[s] for task in per_task] for s in range(steps)]


def peer_step_seconds(setup: dict, steps: int, length: int) -> float | None:
    """Fastest step of FusionBench's layer-wise merged model driven as their AdaMerging loop is."""
    try:
        from fusion_bench.models.wrappers.layer_wise_fusion import (
            LayerWiseMergedModel,
            get_layer_wise_weights,
        )
    except ImportError:
        return None
    base = BertModel.from_pretrained(setup["base"])
    experts = [AutoModelForSequenceClassification.from_pretrained(p) for p in setup["experts"].values()]
    heads = [e.classifier.eval().requires_grad_(False) for e in experts]
    n_tensors = len([p for p in base.parameters() if p.requires_grad])
    weights = get_layer_wise_weights(len(experts), n_tensors, init_values=1.0 / len(experts))
    merged = LayerWiseMergedModel(
        weights, base, [e.bert for e in experts], clamp_weights=False, strict=False
    ).eval()  # transformers 5: position ids are not in state_dict
    optimizer = torch.optim.Adam([merged.merge_weight], lr=1e-2)
    merged.merge_weights()
    times = []
    for step in task_batches(setup, steps, length):
        start = time.perf_counter()
        for head, batch in zip(heads, step, strict=True):
            pooled = merged(**batch).pooler_output
            logprobs = torch.log_softmax(head(pooled), -1)
            entropy = -(logprobs.exp() * logprobs).sum(-1).mean()
            entropy.backward(retain_graph=True)
        optimizer.step()
        optimizer.zero_grad()
        merged.merge_weights()
        times.append(time.perf_counter() - start)
    return fastest_step(times)


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=12)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()

    results = []
    for n, setup in expert_setups(args):
        ours = our_step_seconds(setup, args.steps, args.length)
        theirs = peer_step_seconds(setup, args.steps, args.length)
        ratio = ours / theirs if theirs else None
        results.append({"tasks": n, "batch": 4 * n, "ours_step_s": ours, "fusionbench_step_s": theirs,
                        "ratio": ratio, "target": 0.7})  # fmt: skip
        print(f"N={n} ours {ours:.3f}s fusionbench {theirs if theirs is None else f'{theirs:.3f}s'}")

    print("\n| N | batch | ours (s/step) | FusionBench (s/step) | ours / theirs | target |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        theirs = "not installed" if r["fusionbench_step_s"] is None else f"{r['fusionbench_step_s']:.3f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"| {r['tasks']} | {r['batch']} | {r['ours_step_s']:.3f} | {theirs} | {ratio} | <= 0.7 |")
    try:
        from importlib.metadata import version

        peer = version("fusion-bench")
    except Exception:
        peer = None
    out = write_results(
        "peer_adamerging", {"steps": args.steps, "fusion_bench": peer, "results": results}, args.results
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
