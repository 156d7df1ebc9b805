"""The merge as a PEFT LoRA adapter, ``merged_adapter/``, beside ``merged/``.

When every merged tensor is a LoRA target of some adapter expert, ``W0 + sum_t Gamma_t s_t B_t A_t``
is itself one LoRA of rank R = sum_t r_t per target (``low_rank.folded_factors``: A the stacked
A_t, B the B_t times Gamma_t s_t, scaling 1), so ``PeftModel.from_pretrained(base, folder)``
gives the merged model from r (d_in + d_out) numbers per target instead of a whole model. A
full expert, a dense transform (TIES/DARE) or a backbone tensor an adapter saves whole breaks
that: then no adapter is written, and the log says why.

peft writes the folder: a ``LoraConfig``, a PeftModel over a skeleton of the base on the meta
device (no copy of its weights; only the adapter's own tensors are made real), the tensors set
with ``set_peft_model_state_dict`` and saved with ``save_pretrained``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import ModelCard
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import PretrainedConfig

from .atomic import atomic_folder, follow_umask
from .experts import KIND_CLASS
from .lora import PEFT_PREFIX, PEFT_TASK_KINDS, is_adapter_folder
from .low_rank import folded_factors
from .model_card import MergeFacts, adapter_card

if TYPE_CHECKING:
    from .module import DivMergeModule

ADAPTER_FOLDER = "merged_adapter"
PEFT_TASK_TYPES = {kind: task_type for task_type, kind in PEFT_TASK_KINDS.items()}


@dataclass(frozen=True)
class MergedAdapter:
    """One merged adapter: its ``LoraConfig``, its tensors named as peft saves them, and the
    model it goes over (the base's class and config, with that task's number of labels)."""

    config: Any  # peft.LoraConfig
    state: dict[str, Tensor]
    model_config: PretrainedConfig
    model_class: type


def adapter_obstacle(module: DivMergeModule) -> str | None:
    """Why ``module``'s merge is not a linear combination of its LoRA adapters (None: it is)."""
    frozen = module.frozen
    full = [task for task in module.tasks if not is_adapter_folder(frozen.paths[task])]
    if full:
        return f"expert {full[0]!r} is a full model, whose task vector is dense"
    if module.fixed_delta is not None:
        return "a training-free method's result is held as dense deltas"
    if frozen.has_merge_vectors:
        return f"task_vector_transform {module.hparams.task_vector_transform!r} makes dense task vectors"
    if frozen.names:
        return (
            f"tensor {frozen.names[0]!r} is merged as a dense task vector (an adapter saves it whole, "
            "modules_to_save); only a classification head may be saved whole"
        )
    return None


def adapters_to_write(module: DivMergeModule, wanted: bool) -> dict[str, MergedAdapter]:
    """The merged adapters of ``module``'s merge, by folder inside ``merged_adapter/`` (``""``:
    the one causal LM); none when not ``wanted``, without LoRA experts, or when the merge is
    not a linear combination of adapters (logged, with the reason)."""
    if not wanted or not module.frozen.low_rank.names:
        return {}
    why = adapter_obstacle(module)
    if why is not None:
        rank_zero_info(
            f"export: no {ADAPTER_FOLDER}/ (the merge is not a linear combination of adapters: {why})"
        )
        return {}
    return merged_adapters(module)


@torch.no_grad()
def merged_adapters(module: DivMergeModule) -> dict[str, MergedAdapter]:
    """Gamma folded into the adapters' stacked factors; a classification task's adapter also
    saves that task's head (``modules_to_save``), as each expert's adapter did."""
    frozen, gamma, group = module.frozen, module.merge_coefficients().detach(), module.layout.group_of
    stacks = frozen.low_rank.stacks()
    state, ranks = {}, {}
    for name, stack in stacks.items():
        target = name.rpartition(".")[0]
        down, up = folded_factors(stack, gamma[:, group[name]])
        state[f"{PEFT_PREFIX}{target}.lora_A.weight"] = down.cpu()
        state[f"{PEFT_PREFIX}{target}.lora_B.weight"] = up.cpu()
        ranks[target] = down.shape[0]
    fan_in_fan_out = any(stack.fan_in_fan_out for stack in stacks.values())
    base = str(module.hparams.base)

    def adapter(task: str, head: Mapping[str, Tensor]) -> MergedAdapter:
        saved = sorted({name.split(".", 1)[0] for name in head})  # the head's top-level modules
        config = merged_lora_config(ranks, PEFT_TASK_TYPES[frozen.kind], base, fan_in_fan_out, saved)
        tensors = {**state, **{f"{PEFT_PREFIX}{name}": t.detach().cpu() for name, t in head.items()}}
        return MergedAdapter(config, tensors, frozen.configs[task], KIND_CLASS[frozen.kind])

    if module.is_causal_lm:  # one model serves every task
        return {"": adapter(module.tasks[0], {})}
    return {task: adapter(task, frozen.head(t)) for t, task in enumerate(module.tasks)}


def merged_lora_config(
    ranks: Mapping[str, int], task_type: str, base: str, fan_in_fan_out: bool, modules_to_save: list[str]
):
    """A plain LoRA of scaling 1 on exactly the ``ranks`` targets: ``r`` is the most common total
    rank and ``lora_alpha = r``; targets of another rank get it, and the same alpha, by pattern."""
    from peft import LoraConfig

    r = Counter(ranks.values()).most_common(1)[0][0]
    other = {target: rank for target, rank in sorted(ranks.items()) if rank != r}
    return LoraConfig(
        task_type=task_type,
        r=r,
        lora_alpha=r,
        rank_pattern=other,
        alpha_pattern=dict(other),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=modules_to_save or None,
        base_model_name_or_path=base,
    )


def adapter_folders(adapters: Mapping[str, MergedAdapter]) -> dict[str, str]:
    """Where each adapter goes, relative to the run's folder (for the report and the cards)."""
    return {task: str(Path(ADAPTER_FOLDER) / task) for task in adapters}


def adapter_cards(
    facts: MergeFacts, adapters: Mapping[str, MergedAdapter], coefficients: dict | None
) -> Callable[[str], ModelCard]:
    """The model card of each adapter folder, by task."""
    folders = adapter_folders(adapters)

    def card(task: str) -> ModelCard:
        labels = adapters[task].model_config.num_labels
        return adapter_card(facts, task or None, folders[task], coefficients, labels)

    return card


def save_adapter(adapter: MergedAdapter, folder: Path, dtype: torch.dtype) -> None:
    """``adapter`` saved by peft's ``save_pretrained`` into ``folder``, its tensors in ``dtype``."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    with torch.device("meta"):  # the base's architecture without its weights
        skeleton = adapter.model_class.from_config(adapter.model_config, dtype=dtype)
    skeleton.name_or_path = adapter.config.base_model_name_or_path  # get_peft_model records it
    peft_model = get_peft_model(skeleton, adapter.config, autocast_adapter_dtype=False)
    for part in peft_model.modules():  # the adapter's tensors (the only trainable ones) made real
        own = list(part.parameters(recurse=False))
        if own and all(p.requires_grad for p in own):
            part.to_empty(device="cpu", recurse=False)
    expected = set(get_peft_model_state_dict(peft_model))
    if expected != set(adapter.state):
        raise RuntimeError(
            f"merged adapter: peft expects tensors {sorted(expected ^ set(adapter.state))[:3]} "
            "otherwise than they were named"
        )
    set_peft_model_state_dict(peft_model, adapter.state)
    peft_model.save_pretrained(folder)


def write_adapters(
    folder: Path, adapters: Mapping[str, MergedAdapter], dtype: str, card: Callable[[str], ModelCard]
) -> dict[str, Path]:
    """``folder/merged_adapter/<task>/`` (``""``: the folder itself), each with its model card."""
    with atomic_folder(folder / ADAPTER_FOLDER) as tmp:
        for task, adapter in adapters.items():
            save_adapter(adapter, tmp / task, getattr(torch, dtype))
            card(task).save(tmp / task / "README.md")  # replaces peft's template
        follow_umask(tmp)
    return {task: folder / ADAPTER_FOLDER / task for task in adapters}
