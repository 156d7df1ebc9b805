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
it as large blocks are freed, and each step's activations then fragment the heap.

Then LoRA experts against the same experts as dense models: N adapters (peft, r = 8 on every
linear of the encoder and the pooler, random factors, a head each in ``modules_to_save``) and
each one merged into a full model (``merge_and_unload``), both loaded by ``load_experts`` in a
fresh process: the task-vector bytes held (LoRA: the stacked factors; dense: the stacked
``d_out x d_in`` differences) and the load's peak added RSS. ``--lora_only`` measures only this
and keeps the dense results already in memory.json. Writes benchmarks/results/memory.json.
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
from common import add_common_args, build_experts, machine, minilm_config, write_results  # noqa: E402

LORA_RANK = 8

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


LORA_CHILD = r"""
import json, sys
import torch
from divmerge_pl.experts import load_experts
import peft, peft.utils.other  # imported before the reset: the LoRA load would count their modules

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.set_num_threads(2)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
start = status("VmRSS")
loaded = load_experts({base!r}, {experts!r}, torch.float32)
peak = status("VmHWM") - start
dense = sum(v.numel() * v.element_size() for v in loaded.task_vectors.values())
low_rank = sum(
    t.numel() * t.element_size()
    for s in loaded.low_rank.values()
    for t in (s.down, s.up, s.task_of_rank, s.scale_of_rank)
)
print("RESULT", json.dumps({{"peak_added": peak, "dense_bytes": dense, "low_rank_bytes": low_rank}}))
"""


def build_lora_experts(root: Path, num_tasks: int, tiny: bool) -> tuple[str, dict[str, str], dict[str, str]]:
    """The benchmarks' base, and ``num_tasks`` LoRA adapters over it (r = 8 on every linear of
    the encoder and the pooler, random factors, a random head of 2-4 labels saved whole) with the
    same experts merged into full models; built once, reused."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification, BertModel

    base = build_experts(root, 0, tiny=tiny)["base"]
    folder = (root / "tiny" if tiny else root) / "lora"
    adapters, dense = {}, {}
    for t in range(num_tasks):
        name = f"task{t}"
        adapters[name], dense[name] = str(folder / "adapters" / name), str(folder / "dense" / name)
        if (Path(dense[name]) / "model.safetensors").is_file():
            continue
        torch.manual_seed(200 + t)
        model = BertForSequenceClassification(minilm_config(num_labels=2 + t % 3, tiny=tiny))
        model.bert.load_state_dict(BertModel.from_pretrained(base).state_dict())
        config = LoraConfig(
            task_type="SEQ_CLS", r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules="all-linear"
        )
        peft_model = get_peft_model(model, config)
        with torch.no_grad():
            for param_name, param in peft_model.named_parameters():
                if "lora_" in param_name:  # B is zero at peft's initialisation: no task vector at all
                    param.normal_(0.0, 0.02)
        peft_model.save_pretrained(adapters[name])
        peft_model.merge_and_unload().save_pretrained(dense[name])  # the head: its trained copy
    return base, adapters, dense


def lora_rows(args: argparse.Namespace) -> list[dict]:
    """Per N: task-vector bytes held and the load's peak added RSS, LoRA experts against the same
    experts as dense models, each load in a fresh process."""
    counts = [int(x) for x in args.tasks.split(",")]
    base, adapters, dense = build_lora_experts(Path(args.root), max(counts), args.tiny)
    rows = []
    for n in counts:
        row = {"tasks": n, "rank": LORA_RANK}
        for form, folders in (("lora", adapters), ("dense", dense)):
            experts = dict(list(folders.items())[:n])
            measured = run_child(LORA_CHILD.format(base=base, experts=experts), {})
            row[f"{form}_task_vector_bytes"] = measured["dense_bytes"] + measured["low_rank_bytes"]
            row[f"{form}_low_rank_bytes"] = measured["low_rank_bytes"]
            row[f"{form}_load_peak_added"] = measured["peak_added"]
        row["dense_over_lora"] = row["dense_task_vector_bytes"] / row["lora_task_vector_bytes"]
        rows.append(row)
        mib = 2**20
        print(
            f"N={n} LoRA r={LORA_RANK}: task vectors {row['lora_task_vector_bytes'] / mib:.1f} MiB "
            f"(load peak +{row['lora_load_peak_added'] / mib:.0f} MiB); as dense models "
            f"{row['dense_task_vector_bytes'] / mib:.1f} MiB (+{row['dense_load_peak_added'] / mib:.0f} MiB)"
        )
    return rows


def run_child(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a fresh Python process; its ``RESULT {json}`` line."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env}
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if not line:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(line[0].removeprefix("RESULT "))


def print_lora_table(rows: list[dict]) -> None:
    mib = 2**20
    print(
        "\n| N | LoRA task vectors (MiB) | LoRA load peak (MiB) | dense task vectors (MiB) "
        "| dense load peak (MiB) | dense / LoRA bytes |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tasks']} | {r['lora_task_vector_bytes'] / mib:.2f} "
            f"| {r['lora_load_peak_added'] / mib:.0f} | {r['dense_task_vector_bytes'] / mib:.1f} "
            f"| {r['dense_load_peak_added'] / mib:.0f} "
            f"| {r['dense_over_lora']:.1f} |"
        )


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
    parser.add_argument("--lora_only", action="store_true", help="measure LoRA against dense experts only")
    args = parser.parse_args()

    lora = {"rank": LORA_RANK, "targets": "all-linear", "machine": machine(), "results": lora_rows(args)}
    print_lora_table(lora["results"])
    if args.lora_only:  # the dense results already written stay, with the machine they were measured on
        found = Path(args.results) / "memory.json"
        kept = json.loads(found.read_text()) if found.is_file() else {"machine": machine()}
        found.parent.mkdir(parents=True, exist_ok=True)
        found.write_text(json.dumps({**kept, "lora_vs_dense": lora}, indent=2) + "\n")
        print(f"wrote {found}")
        return
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
                measured = run_child(code, env)
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
    payload = {"steps": args.steps, "results": rows, "lora_vs_dense": lora}
    print(f"wrote {write_results('memory', payload, args.results)}")


if __name__ == "__main__":
    main()
