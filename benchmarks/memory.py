"""Peak memory of a DivMerge fit for N = 2, 4, 8 MiniLM-sized experts, with float32 and
bfloat16 task vectors, against what must be held: the base plus N task vectors. Measured
twice, each in a fresh process: loading the experts alone (``load_experts``), and the whole fit.

    python benchmarks/memory.py [--tasks 2,4,8] [--steps 4] [--lora_only | --sharded]

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
and keeps the dense results already in memory.json.

Then sharded mode (``trainer.strategy: task_vector_sharding``): N = 4 and 8 MiniLM-sized
experts in which every tensor differs from the base (the word embeddings too), fitted by W = 1,
2, 4 gloo CPU processes through Lightning (W = 1: a plain single-process fit). Per rank: the
bytes ``FrozenExperts.held_bytes()`` reports after setup against (N + 1) / W x the bytes of the
tensors that are cut, plus the heads (held whole); the peak RSS a few training steps add on top
of that; and the largest module's merged weight, the one gathered whole at a time. From the
measured per-rank formula, a projection to 7B / 13B models on 80 GB GPUs (``projection``).
``--sharded`` measures only this and keeps the other results in memory.json. Writes
benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = str(Path(__file__).parent)
sys.path.insert(0, BENCH)
from common import add_common_args, build_experts, machine, minilm_config, write_results  # noqa: E402

LORA_RANK = 8

CHILD = r"""
import json, os, sys
import lightning as L, torch
sys.path.insert(0, {bench!r})
from common import build_experts, proc_status as status
from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec

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


SHARDED_CHILD = r"""
import json, sys
from pathlib import Path
import lightning as L, torch
sys.path.insert(0, {bench!r})
from common import build_experts, proc_status as status
from divmerge_pl import DivMergeModule, MergeDataModule, TaskSpec
from divmerge_pl.sharding import TaskVectorSharding

def frozen_side(frozen, world):
    # what is cut (every base tensor but the heads, at its whole shape), the heads (held whole)
    heads = {{n for names in frozen.head_names for n in names}}
    params = dict(frozen.base_model.named_parameters())
    head_bytes = sum(t.nbytes for n, t in frozen.named_buffers() if n.startswith("head_"))
    head_bytes += sum(params[n].nbytes for n in heads if n in params)
    shapes = frozen.shapes or {{n: p.shape for n, p in params.items() if n not in heads}}
    size = {{n: torch.Size(shape).numel() * params[n].element_size() for n, shape in shapes.items()}}
    modules = {{}}
    for name, nbytes in size.items():
        modules[name.rpartition(".")[0]] = modules.get(name.rpartition(".")[0], 0) + nbytes
    largest = max(modules, key=modules.get)
    return {{
        "held_bytes": frozen.held_bytes(),
        "cut_bytes": sum(size.values()),
        "task_vector_fraction": sum(size[n] for n in frozen.names if n in size) / sum(size.values()),
        "head_bytes": head_bytes,
        "largest_module": largest,
        "largest_module_bytes": modules[largest],
        "sharded": frozen.sharding is not None,
    }}

class Measure(L.Callback):
    def on_train_start(self, trainer, module):
        self.found = frozen_side(module.frozen, trainer.world_size)
        self.found["setup_peak_added"] = status("VmHWM") - start
        open("/proc/self/clear_refs", "w").write("5")  # the steps' peak, from here
        self.start = status("VmRSS")

    def on_train_end(self, trainer, module):
        self.found["steps_peak_added"] = status("VmHWM") - self.start
        found = {{"rank": trainer.global_rank, **self.found}}
        Path({out!r}, f"rank{{trainer.global_rank}}.json").write_text(json.dumps(found))

setup = build_experts(Path({root!r}), {n}, tiny={tiny}, every_tensor=True)
torch.set_num_threads(1)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
start = status("VmRSS")
module = DivMergeModule(setup["base"], setup["experts"], granularity="layer", teacher_cache=None)
specs = [TaskSpec(name=t, train_files=f["train"], num_samples=8 * {world}) for t, f in setup["data"].items()]
dm = MergeDataModule(specs, tokenizer=setup["base"], batch_size={n}, max_length=32)
strategy = TaskVectorSharding(process_group_backend="gloo") if {world} > 1 else "auto"
L.Trainer(accelerator="cpu", devices={world}, strategy=strategy, max_steps={steps}, logger=False,
          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
          limit_val_batches=0, callbacks=[Measure()]).fit(module, datamodule=dm)
"""


def sharded_formula(tasks: int, world: int, cut_bytes: int, head_bytes: int) -> float:
    """What a rank should hold: 1/W of the base and of N task vectors (of the cut tensors, all in
    one dtype here), plus every task's head whole."""
    return (tasks + 1) / world * cut_bytes + head_bytes


def sharded_rows(args: argparse.Namespace) -> list[dict]:
    """Per N and W: each rank's frozen-side bytes against ``sharded_formula`` and the peak RSS
    the training steps add; the W processes are Lightning's own (a script file it relaunches)."""
    rows = []
    for n in [int(x) for x in args.sharded_tasks.split(",")]:
        build_experts(Path(args.root), n, tiny=args.tiny, every_tensor=True)  # once, not per rank
        for world in [int(x) for x in args.processes.split(",")]:
            settings = {"root": args.root, "n": n, "steps": args.steps, "tiny": args.tiny}
            for found in run_ranks(SHARDED_CHILD, world, **settings):
                expected = sharded_formula(n, world, found["cut_bytes"], found["head_bytes"])
                row = {"tasks": n, "processes": world, **found, "formula_bytes": expected}
                row["held_over_formula"] = found["held_bytes"] / expected
                rows.append(row)
            mib = 2**20
            held = [r["held_bytes"] / mib for r in rows[-world:]]
            print(f"N={n} W={world}: held per rank {', '.join(f'{h:.0f}' for h in held)} MiB")
    return rows


def run_ranks(template: str, world: int, **settings) -> list[dict]:
    """Run ``template`` as a script file (Lightning's DDP relaunches the script it was started
    from, once per extra process) with ``OMP_NUM_THREADS=1``; each rank's result file, by rank
    (files: the ranks' lines on one stdout pipe can interleave)."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "sharded_fit.py"
        script.write_text(template.format(bench=BENCH, out=folder, world=world, **settings))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
        found = [Path(folder, f"rank{r}.json") for r in range(world)]
        if done.returncode != 0 or not all(f.is_file() for f in found):
            raise RuntimeError(done.stderr[-3000:])
        return [json.loads(f.read_text()) for f in found]


def print_sharded_table(rows: list[dict]) -> None:
    mib = 2**20
    print(
        "\n| N | W | rank | held (MiB) | (N + 1) / W x cut + heads (MiB) | held / formula "
        "| setup's peak added (MiB) | steps' peak added (MiB) | largest module's merged weight (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['tasks']} | {r['processes']} | {r['rank']} | {r['held_bytes'] / mib:.1f} "
            f"| {r['formula_bytes'] / mib:.1f} | {r['held_over_formula']:.3f} "
            f"| {r['setup_peak_added'] / mib:.0f} | {r['steps_peak_added'] / mib:.0f} "
            f"| {r['largest_module_bytes'] / mib:.1f} |"
        )


# Llama-2's shapes: parameters, layers, hidden size, vocabulary (embedding and LM head, untied)
LLAMA_SHAPES = {
    "7B": {"params": 6_738_415_616, "layers": 32, "hidden": 4096, "vocab": 32000},
    "13B": {"params": 13_015_864_320, "layers": 40, "hidden": 5120, "vocab": 32000},
}
PROJECTION_ASSUMPTIONS = {
    "gpu_bytes": 80e9,
    "base_bytes_per_param": 4,  # the base is loaded in float32 (experts.py), whatever the precision
    "task_vector_bytes_per_param": 2,  # model.task_vector_dtype: bfloat16
    "tokens_per_gpu": 2048,  # e.g. 4 sequences of 512 tokens per process
    # saved for backward per token and layer, in bf16 (bf16-mixed): about 24 hidden-sized values
    # (norm inputs and outputs, q / k / v, attention output, the MLP's gate / up / product at 2.7 h)
    "hidden_sized_values_per_token_layer": 24,
    # the loss: logits, their log-softmax and the teacher's, float32, per token
    "logit_copies": 3,
    # the largest module (embedding or LM head, vocab x hidden) in float32, four times: its
    # gathered merge in forward, its re-gather in backward, its whole gradient before the
    # reduce-scatter, and the gather's buffer (measured on MiniLM: the steps' peak at W = 2, 4 is
    # 1-2 embeddings above W = 1's, which already holds a merged weight and its gradient); the
    # same term for DDP, where the merge is also built one module at a time
    "largest_module_copies": 4,
}


def projection(held_over_formula: float, assumptions: dict = PROJECTION_ASSUMPTIONS) -> list[dict]:
    """Bytes per GPU for Llama-2 7B / 13B x 4 / 8 experts on 4 / 8 GPUs, sharded, against DDP
    (base + N task vectors on every GPU): the frozen side from the measured per-rank formula
    (times its worst measured ratio), plus activations and the largest gathered module, both
    assumed (``assumptions``); and the sharded export's, which gathers the whole merged model
    on every process once the steps are done."""
    a = assumptions
    rows = []
    for model, shape in LLAMA_SHAPES.items():
        tokens, hidden = a["tokens_per_gpu"], shape["hidden"]
        values = a["hidden_sized_values_per_token_layer"] * hidden  # bf16 each
        activations = tokens * shape["layers"] * values * 2
        activations += tokens * shape["vocab"] * 4 * a["logit_copies"]
        gathered = a["largest_module_copies"] * shape["vocab"] * hidden * 4
        for tasks in (4, 8):
            frozen = shape["params"] * (a["base_bytes_per_param"] + tasks * a["task_vector_bytes_per_param"])
            whole = frozen + activations + gathered
            for gpus in (4, 8):
                sharded = held_over_formula * frozen / gpus + activations + gathered
                # the export gathers the whole merged model (the base's dtype) on every process
                export = held_over_formula * frozen / gpus + shape["params"] * a["base_bytes_per_param"]
                rows.append(
                    {
                        "model": model,
                        "tasks": tasks,
                        "gpus": gpus,
                        "frozen_per_gpu_sharded": held_over_formula * frozen / gpus,
                        "frozen_per_gpu_ddp": frozen,
                        "activations": activations,
                        "largest_module_gathered": gathered,
                        "per_gpu_sharded": sharded,
                        "per_gpu_ddp": whole,
                        "sharded_fits": sharded <= a["gpu_bytes"],
                        "export_per_gpu_sharded": export,
                        "export_fits": export <= a["gpu_bytes"],
                        "ddp_fits": whole <= a["gpu_bytes"],
                    }
                )
    return rows


def print_projection(rows: list[dict]) -> None:
    gb = 1e9
    print(
        "\n| model | N | GPUs | sharded: frozen / GPU (GB) | + activations + gathered module (GB) "
        "| sharded total / GPU (GB) | fits 80 GB | sharded export / GPU (GB) | fits | DDP total / GPU (GB) "
        "| fits 80 GB |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['tasks']} | {r['gpus']} | {r['frozen_per_gpu_sharded'] / gb:.1f} "
            f"| {(r['activations'] + r['largest_module_gathered']) / gb:.1f} "
            f"| {r['per_gpu_sharded'] / gb:.1f} "
            f"| {'yes' if r['sharded_fits'] else 'no'} | {r['export_per_gpu_sharded'] / gb:.1f} "
            f"| {'yes' if r['export_fits'] else 'no'} | {r['per_gpu_ddp'] / gb:.1f} "
            f"| {'yes' if r['ddp_fits'] else 'no'} |"
        )


def sharded_results(args: argparse.Namespace) -> dict:
    rows = sharded_rows(args)
    print_sharded_table(rows)
    worst = max(r["held_over_formula"] for r in rows)
    projected = projection(worst)
    print_projection(projected)
    return {
        "steps": args.steps,
        "batch_per_process": "N rows of 32 tokens",
        "task_vector_dtype": "float32",
        "results": rows,
        "projection": {"held_over_formula": worst, "assumptions": PROJECTION_ASSUMPTIONS, "rows": projected},
    }


def keep_and_write(key: str, value: dict, folder: str) -> None:
    """Write ``value`` under ``key`` in memory.json, keeping what the other sections wrote (with
    the machine they were measured on)."""
    found = Path(folder) / "memory.json"
    kept = json.loads(found.read_text()) if found.is_file() else {"machine": machine()}
    found.parent.mkdir(parents=True, exist_ok=True)
    found.write_text(json.dumps({**kept, key: value}, indent=2) + "\n")
    print(f"wrote {found}")


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
    parser.add_argument("--sharded", action="store_true", help="measure sharded mode only")
    parser.add_argument("--sharded_tasks", default="4,8", help="sharded mode: numbers of experts")
    parser.add_argument("--processes", default="1,2,4", help="sharded mode: numbers of processes")
    args = parser.parse_args()

    if args.sharded:  # the other results already written stay, with the machine they were measured on
        keep_and_write("sharded", {"machine": machine(), **sharded_results(args)}, args.results)
        return
    lora = {"rank": LORA_RANK, "targets": "all-linear", "machine": machine(), "results": lora_rows(args)}
    print_lora_table(lora["results"])
    if args.lora_only:
        keep_and_write("lora_vs_dense", lora, args.results)
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
    payload = {"steps": args.steps, "results": rows, "lora_vs_dense": lora, "sharded": sharded_results(args)}
    print(f"wrote {write_results('memory', payload, args.results)}")


if __name__ == "__main__":
    main()
