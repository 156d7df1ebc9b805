"""The model card (README.md) of a merged model: what it was merged from, how, how well it
scores, how to load it, and the recipe that makes it again. Without it a ``merged/<task>/``
folder, once copied or published, says nothing of where its weights came from."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

HUB_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")
PAPER_URL = "https://arxiv.org/abs/2509.02108"


def divmerge_version() -> str:
    try:
        return version("divmerge-pl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def hub_id(path: str) -> str | None:
    """The Hub repo id of a model folder, when it is a Hub cache snapshot
    (``.../models--org--name/snapshots/<sha>``); local folders have none."""
    match = HUB_CACHE_SNAPSHOT.search(str(Path(path).expanduser()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


@dataclass(frozen=True)
class MergeFacts:
    """Everything a card says about one merge (shared by its task folders)."""

    base: str  # as the run names it: a folder or a Hub id
    experts: dict[str, str]  # task -> expert, likewise
    report: dict  # report.json's content
    recipe: str  # YAML: the run's resolved config
    model_class: str  # the transformers Auto class that loads the folder
    dtype: str
    is_causal_lm: bool
    hub_ids: tuple[str, ...] = ()  # Hub repo ids of the models merged (the card's base_model)
    adapters: dict[str, str] = field(default_factory=dict)  # task ("": causal LM) -> merged adapter folder


def _score(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def score_table(report: dict, highlight: str | None = None) -> str:
    """Markdown: expert, merged and normalised score per task and their means."""
    lines = [
        "| task | metric | expert | merged | normalised (merged / expert) |",
        "|---|---|---:|---:|---:|",
    ]
    for task, row in report["tasks"].items():
        name = f"**{task}** (this model)" if task == highlight else task
        metric = row.get("metric", report.get("metric", ""))
        lines.append(
            f"| {name} | {metric} | {_score(row['expert'])} | {_score(row['merged'])} "
            f"| {_score(row['normalized'])} |"
        )
    avg = report["average"]
    means = f"{_score(avg['expert'])} | {_score(avg['merged'])} | **{_score(avg['normalized'])}**"
    lines.append(f"| **average** | | {means} |")
    return "\n".join(lines)


def rerun_command(report: dict) -> str:
    """The command that makes this merge again from ``recipe.yaml``."""
    settings = report.get("settings", {})
    if settings.get("kind") == "static":
        params = json.dumps(report.get("params", settings.get("params", {})))
        return f"divmerge-pl merge --config recipe.yaml --method {report['method']} --method_args '{params}'"
    return "divmerge-pl fit --config recipe.yaml"


def card_metadata(facts: MergeFacts) -> ModelCardData:
    parents = list(dict.fromkeys(facts.hub_ids))
    extra = {"base_model_relation": "merge"} if len(parents) > 1 else {}
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation" if facts.is_causal_lm else "text-classification",
        tags=["merge", "divmerge", "divmerge-pl", "task-arithmetic"],
        base_model=parents or None,
        **extra,
    )


def models_table(facts: MergeFacts) -> str:
    return "\n".join(
        ["| role | model |", "|---|---|", f"| base (theta0) | `{facts.base}` |"]
        + [f"| expert `{t}` | `{p}` |" for t, p in facts.experts.items()]
    )


def model_card(facts: MergeFacts, task: str | None, location: str) -> ModelCard:
    """The card of the folder holding ``task``'s head (None: the one merged causal LM), loadable
    from ``location`` (a Hub repo id or a folder)."""
    report, settings = facts.report, facts.report.get("settings", {})
    what = (
        "one merged causal language model serving every task"
        if task is None
        else f"the merged backbone with the classification head of task `{task}`"
    )
    models = models_table(facts)
    setting_rows = "\n".join(
        ["| setting | value |", "|---|---|"]
        + [f"| {key} | `{json.dumps(value)}` |" for key, value in settings.items()]
    )
    body = f"""
# Merged model ({report["method"]})

This folder holds {what}. It was made by divmerge-pl {divmerge_version()} (DivMerge:
[Touayouch et al., arXiv 2509.02108]({PAPER_URL})) from one base model and {len(facts.experts)}
experts fine-tuned from it, as `theta = theta0 + sum_t Gamma_t * tau_t` (`tau_t` = expert t - base).
Its weights are stored in `{facts.dtype}`.

## Models merged

{models}

## Method

`{report["method"]}`, with these settings:

{setting_rows}

## Scores

{report.get("metric", "score")} of the merged model and of each expert on each task's scored rows
(`eval_files`):

{score_table(report, task)}

## How to load

```python
from transformers import {facts.model_class}, AutoTokenizer

model = {facts.model_class}.from_pretrained("{location}")
tokenizer = AutoTokenizer.from_pretrained("{location}")
```
{adapter_note(facts, task)}

## Recipe

The run's resolved configuration. Saved as `recipe.yaml` (with the same base, experts and data
files), `{rerun_command(report)}` makes this merge again.

```yaml
{facts.recipe.rstrip()}
```
"""
    return ModelCard(f"---\n{card_metadata(facts).to_yaml()}\n---\n{body}")


def adapter_note(facts: MergeFacts, task: str | None) -> str:
    """The main card's pointer to the same merge as a LoRA adapter, when one was written."""
    folder = facts.adapters.get(task or "")
    if folder is None:
        return ""
    return (
        f"\nThe same merge is also a LoRA adapter over the base, in `{folder}` (r (d_in + d_out) "
        "numbers per target instead of a whole model; its README says how to load it).\n"
    )


def adapter_card(
    facts: MergeFacts, task: str | None, location: str, coefficients: dict, labels: int
) -> ModelCard:
    """The card of ``merged_adapter/<task>`` (None: the causal LM's): a LoRA adapter equal to the
    merge, its experts' factors concatenated with the coefficients folded in, and how to load it."""
    gamma = "\n".join(
        ["| expert adapter | Gamma mean | min | max |", "|---|---:|---:|---:|"]
        + [
            f"| `{t}` | {sum(row) / len(row):.4f} | {min(row):.4f} | {max(row):.4f} |"
            for t, row in zip(coefficients["tasks"], coefficients["values"], strict=True)
        ]
    )
    model_class = facts.model_class
    extra = "" if facts.is_causal_lm else f", num_labels={labels}"
    head = "" if task is None else f" and the classification head of task `{task}` (`modules_to_save`)"
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation" if facts.is_causal_lm else "text-classification",
        tags=["merge", "divmerge", "divmerge-pl", "lora", "peft"],
    )
    body = f"""
# Merged LoRA adapter ({facts.report["method"]})

This folder is one LoRA adapter over `{facts.base}` that equals the merge of {len(facts.experts)}
LoRA adapters made by divmerge-pl {divmerge_version()} ([DivMerge]({PAPER_URL})):
`W = W0 + sum_t Gamma_t * s_t * B_t A_t` on every target. Each target's factors are the experts'
concatenated along the rank, `A = [A_1; A_2; ...]`, `B = [Gamma_1 s_1 B_1, Gamma_2 s_2 B_2, ...]`,
at scaling 1 (`lora_alpha = r`, per target by `rank_pattern` / `alpha_pattern`){head}. Its
tensors are stored in `{facts.dtype}`.

## Adapters merged

{models_table(facts)}

Coefficients (`{coefficients["granularity"]}` granularity, {len(coefficients["groups"])} group(s) per
adapter; every value in the run's `coefficients.json`):

{gamma}

## Scores

{score_table(facts.report, task)}

## How to load

```python
from peft import PeftModel
from transformers import {model_class}

base = {model_class}.from_pretrained("{facts.base}"{extra})
model = PeftModel.from_pretrained(base, "{location}")
model = model.merge_and_unload()  # optional: plain weights, as in merged/
```
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")
