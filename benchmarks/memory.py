"""Peak memory of a DivMerge fit for N = 2, 4, 8 MiniLM-sized experts, with float32 and
bfloat16 task vectors, against what must be held: the base plus N task vectors. Measured
twice, each in a fresh process: loading the experts alone (``load_experts``), and the whole fit.

    python benchmarks/memory.py [--tasks 2,4,8] [--steps 4]

Each case runs in its own process; Linux's peak-RSS counter (VmHWM) is reset after the imports
(``/proc/self/clear_refs``), so the figure is what the fit itself added: loading and checking
the experts, teacher outputs, the merge's activations. The issue's reference is base + N task
vectors + activations: the activations are measured on their own, in a third process, as the
peak a forward+backward of one expert adds on one batch of the fit's shape (gradients flow
through every layer to the input embeddings, none to the weights). The fit is measured again
with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``): by default glibc raises
it as large blocks are freed, and each step's activations then fragment the heap. Writes
benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = str(Path(__file__).parent)
sys.path.insert(0, BENCH)
from common import add_common_args, write_results  # noqa: E402

CHILD = r"""
import json, os, sys
import lightning as L, torch
sys.path.insert(0, {bench!r})
from common import build_experts
from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

setup = build_experts(__import__("pathlib").Path({root!r}), {n}, tiny={tiny})
experts = dict(list(setup["experts"].items())[:{n}])
data = dict(list(setup["data"].items())[:{n}])
torch.set_num_threads(2)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
start = status("VmRSS")
if {phase!r} == "load":
    from divmerge_pl.experts import load_experts
    loaded = load_experts(setup["base"], experts, getattr(torch, {dtype!r}))
    peak = status("VmHWM") - start
    base = sum(p.numel() * p.element_size() for p in loaded.base_model.parameters())
    tau = sum(v.numel() * v.element_size() for v in loaded.task_vectors.values())
    print("RESULT", json.dumps({{"peak_added": peak, "base_bytes": base, "task_vector_bytes": tau}}))
    sys.exit(0)
if {phase!r} == "activations":
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(next(iter(experts.values())))
    model.requires_grad_(False)
    lines = [x for f in data.values() for x in open(f["train"]).read().split("\n")[:4] if x]
    texts = [json.loads(x)["text"] for x in lines]
    batch = AutoTokenizer.from_pretrained(setup["base"])(texts, truncation=True, max_length=64,
                                                         padding=True, return_tensors="pt")
    open("/proc/self/clear_refs", "w").write("5")
    start = status("VmRSS")
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    torch.log_softmax(logits, -1).mean().backward()
    print("RESULT", json.dumps({{"peak_added": status("VmHWM") - start}}))
    sys.exit(0)
module = DivMergeModule(setup["base"], experts, granularity="layer", teacher_cache=None,
                        task_vector_dtype={dtype!r})
specs = [TaskSpec(name=t, train_files=f["train"], num_samples=200) for t, f in data.items()]
dm = MergeDataModule(specs, tokenizer=setup["base"], batch_size=4 * {n}, max_length=64)
L.Trainer(max_steps={steps}, logger=False, enable_checkpointing=False, enable_progress_bar=False,
          enable_model_summary=False, limit_val_batches=0).fit(module, datamodule=dm)
base = sum(p.numel() * p.element_size() for p in module.frozen.base_model.parameters())
tau = sum(v.numel() * v.element_size() for v in module.frozen.task_vectors().values())
peak = status("VmHWM") - start
print("RESULT", json.dumps({{"peak_added": peak, "base_bytes": base, "task_vector_bytes": tau}}))
"""


# (phase, extra environment, key of its peak): the fit is measured with glibc's default and with
# a fixed mmap threshold
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}
PHASES = [
    ("load", {}, "load_peak_added"),
    ("activations", {}, "activations_peak_added"),
    ("fit", {}, "peak_added"),
    ("fit", FIXED_THRESHOLD, "fixed_threshold_peak_added"),
]


def main() -> None:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]), steps=4)
    args = parser.parse_args()

    rows = []
    for n in [int(x) for x in args.tasks.split(",")]:
        for dtype in ("float32", "bfloat16"):
            result = {}
            for phase, env, key in PHASES:
                code = CHILD.format(
                    bench=BENCH,
                    root=args.root,
                    n=n,
                    dtype=dtype,
                    steps=args.steps,
                    phase=phase,
                    tiny=args.tiny,
                )
                done = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
                )
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    raise RuntimeError(done.stderr[-3000:])
                measured = json.loads(line[0].removeprefix("RESULT "))
                result[key] = measured.pop("peak_added")
                result.update(measured)  # base and task-vector bytes, from the load and fit phases
            held = result["base_bytes"] + result["task_vector_bytes"]
            held_active = held + result["activations_peak_added"]
            rows.append(
                {
                    "tasks": n,
                    "task_vector_dtype": dtype,
                    **result,
                    "load_ratio_to_base_plus_vectors": result["load_peak_added"] / held,
                    "ratio_to_base_plus_vectors": result["peak_added"] / held,
                    "ratio_to_base_vectors_activations": result["peak_added"] / held_active,
                    "fixed_threshold_ratio_to_base_vectors_activations": (
                        result["fixed_threshold_peak_added"] / held_active
                    ),
                }
            )
            print(
                f"N={n} {dtype}: load peak +{result['load_peak_added'] / 2**20:.0f} MiB, fit peak "
                f"+{result['peak_added'] / 2**20:.0f} MiB (fixed mmap threshold: "
                f"+{result['fixed_threshold_peak_added'] / 2**20:.0f}), base + vectors {held / 2**20:.0f} MiB"
            )
    mib = 2**20
    print(
        "\n| N | task vectors | base (MiB) | task vectors (MiB) | load peak (MiB) | load / held "
        "| activations (MiB) | fit peak (MiB) | fit / held | fit / (held + activations) "
        "| fixed mmap threshold: fit peak (MiB) | ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tasks']} | {r['task_vector_dtype']} | {r['base_bytes'] / mib:.0f} | "
            f"{r['task_vector_bytes'] / mib:.0f} | {r['load_peak_added'] / mib:.0f} | "
            f"{r['load_ratio_to_base_plus_vectors']:.2f} | {r['activations_peak_added'] / mib:.0f} | "
            f"{r['peak_added'] / mib:.0f} | {r['ratio_to_base_plus_vectors']:.2f} | "
            f"{r['ratio_to_base_vectors_activations']:.2f} | {r['fixed_threshold_peak_added'] / mib:.0f} | "
            f"{r['fixed_threshold_ratio_to_base_vectors_activations']:.2f} |"
        )
    print(f"wrote {write_results('memory', {'steps': args.steps, 'results': rows}, args.results)}")


if __name__ == "__main__":
    main()
