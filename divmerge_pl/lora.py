"""LoRA adapters (peft folders) as experts: reading them and checking them against the base.

A LoRA expert's task vector for a target weight is ``s * B @ A`` (A: r x d_in, B: d_out x r,
s = alpha / r, or alpha / sqrt(r) with rsLoRA), kept as its factors (``low_rank.py`` holds them
and merges through them without forming ``B @ A``).

Reading goes through peft (``PeftConfig.from_pretrained``, ``load_peft_weights``); this module
only checks that what peft read is a plain LoRA over the given base, and refuses the rest with
the adapter and the setting named.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from .fingerprints import fingerprint
from .hub import local_or_snapshot
from .low_rank import LoraFactors, LowRankStack, stack_factors
from .preflight import (
    CheckedModels,
    ExpertMismatchError,
    TaskKind,
    check_models,
    check_weight_format,
    detect_kind,
    read_config,
    resolve_model_dir,
)

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's own names

# LoRA variants whose forward is not ``x W0^T + s (x A^T) B^T`` (or whose base is not ours)
UNSUPPORTED_SETTINGS: dict[str, str] = {
    "use_dora": "DoRA rescales the merged weight's columns",
    "lora_bias": "lora_B has its own bias",
    "use_qalora": "QA-LoRA pools the input",
    "layer_replication": "layers are duplicated",
    "target_parameters": "parameters, not modules, are targeted",
    "trainable_token_indices": "some embedding rows are trained on their own",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between several LoRAs",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA changes the base weights",
    "monteclora_config": "MonteCLoRA samples its factors",
    "lora_ga_config": "LoRA-GA changes the base weights at initialisation",
}
# init_lora_weights values after which the adapter sits on the unchanged base (others, such as
# pissa, olora, corda, loftq, subtract the initial B A from the base)
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


class UnsupportedAdapterError(ExpertMismatchError):
    """A PEFT adapter of a type or LoRA variant that the low-rank merge does not handle."""


@dataclass
class LoraAdapter:
    """What a LoRA expert adds to the base: factors per target weight, full tensors
    (``modules_to_save``, e.g. a classifier head) per name; both keyed by the base's names."""

    folder: Path
    config: object  # peft.LoraConfig
    factors: dict[str, LoraFactors]
    full: dict[str, Tensor]


def is_adapter_folder(path: str | Path) -> bool:
    """A local folder saved by peft's ``save_pretrained`` (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_folders(experts: Mapping[str, str]) -> dict[str, Path]:
    """The experts given as PEFT adapters, as local folders or as Hub ids (``org/name[@rev]``,
    resolved into the user's Hub cache as full models are): task -> folder."""
    folders = {task: local_or_snapshot(str(path), f"expert {task!r}") for task, path in experts.items()}
    return {task: folder for task, folder in folders.items() if is_adapter_folder(folder)}


def check_with_adapters(base: str, experts: Mapping[str, str], allow_pickle: bool = False) -> CheckedModels:
    """``preflight.check_models`` for experts of which some (or all) are LoRA adapters: the full
    experts are checked as ever; each adapter's config is read and checked (type, variant, task
    kind) without its weights, so a wrong adapter fails before any data is read. ``configs``
    holds the full experts' only: an adapter's comes with its head (``read_lora_experts``)."""
    adapters = adapter_folders(experts)
    full = {task: path for task, path in experts.items() if task not in adapters}
    if not adapters:
        return check_models(base, dict(experts), allow_pickle)
    if full:
        checked = check_models(base, full, allow_pickle)
    else:
        base_dir = resolve_model_dir(base, "model.base", allow_pickle)
        config = read_config(base_dir, "model.base")
        check_weight_format(base_dir, "model.base", allow_pickle)
        checked = CheckedModels({"base": base_dir}, {}, config, None)  # kind: from the adapters
    kinds = {}
    for task, folder in adapters.items():
        role = f"expert {task!r}"
        kinds[task] = adapter_kind(_read_lora_config(folder, role), role, folder)
    kind = checked.kind or next((k for k in kinds.values() if k), None)
    if kind is None:  # no adapter says: the base's own architecture does
        kind = detect_kind("model.base", checked.base_config)
    for task, own in kinds.items():
        _check_kind(f"expert {task!r}", adapters[task], own, kind)
    return CheckedModels({**checked.paths, **adapters}, checked.configs, checked.base_config, kind)


def _read_lora_config(folder: Path, role: str):
    try:
        from peft import PeftConfig, PeftType
    except ImportError as err:
        raise ImportError(
            f"{role}: {str(folder)!r} is a PEFT adapter, which needs peft: pip install 'divmerge-pl[peft]'"
        ) from err
    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise ExpertMismatchError(
            f"{role}: cannot read {str(folder / ADAPTER_CONFIG)!r} with peft: {err}"
        ) from err
    if config.peft_type != PeftType.LORA:
        raise UnsupportedAdapterError(
            f"{role}: {str(folder)!r} is a {config.peft_type.value} adapter; only LoRA adapters can be "
            "merged (merge it into its base with peft's merge_and_unload and give that folder instead)"
        )
    _check_plain_lora(config, role, folder)
    return config


def read_adapter(
    folder: str | Path,
    role: str,
    base: nn.Module,
    heads: set[str] | frozenset[str] = frozenset(),
    allow_pickle: bool = False,
) -> LoraAdapter:
    """Read a LoRA adapter with peft and check it against ``base`` (the model it will merge into).

    ``heads``: names whose shape may differ (per-task heads, e.g. a classifier with another
    number of labels). Every factor is checked against its target layer's type and shape, so an
    adapter of another base fails here, naming the tensor.
    """
    folder = Path(folder)
    config = _read_lora_config(folder, role)
    from peft.utils import load_peft_weights

    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        if not (folder / "adapter_model.bin").is_file():
            raise ExpertMismatchError(f"{role}: {str(folder)!r} has no adapter_model.safetensors")
        if not allow_pickle:
            raise ExpertMismatchError(
                f"{role}: {str(folder)!r} holds its weights as a pickle (adapter_model.bin), which can "
                "run code when loaded; re-save it with safetensors, or set model.allow_pickle: true "
                "if you trust it"
            )
    state = load_peft_weights(str(folder), device="cpu")
    corrupted = sorted(key for key, tensor in state.items() if not bool(torch.isfinite(tensor).all()))
    if corrupted:
        raise ExpertMismatchError(
            f"{role}: adapter tensor {corrupted[0]!r} in {str(folder)!r} holds NaN/inf values; the "
            "adapter is corrupted (re-save it, or check its fine-tuning for divergence)"
        )
    factors, full = _split_weights(state, config, role, base, heads)
    return LoraAdapter(folder=folder, config=config, factors=factors, full=full)


def _check_plain_lora(config, role: str, folder: Path) -> None:
    for setting, why in UNSUPPORTED_SETTINGS.items():
        value = getattr(config, setting, None)
        if value:  # None, False, {} and [] all mean "not used"
            raise UnsupportedAdapterError(
                f"{role}: {str(folder)!r} uses LoRA setting {setting}={value!r} ({why}), which the "
                "low-rank merge does not handle; merge it into its base with peft's merge_and_unload "
                "and give that folder as a full expert instead"
            )
    if config.bias != "none":
        raise UnsupportedAdapterError(
            f"{role}: {str(folder)!r} trains biases (bias={config.bias!r}); only bias='none' LoRA "
            "adapters are supported (or give the merged model, from peft's merge_and_unload)"
        )
    if config.init_lora_weights not in PLAIN_INITS:
        raise UnsupportedAdapterError(
            f"{role}: {str(folder)!r} was initialised with init_lora_weights={config.init_lora_weights!r}, "
            "which changes the base weights; convert it to a plain LoRA (peft's "
            "path_initial_model_for_weight_conversion) or give the merged model instead"
        )


def _split_weights(state, config, role, base: nn.Module, heads):
    from peft.utils.other import get_pattern_key

    base_shapes = {name: tuple(p.shape) for name, p in base.named_parameters()}

    downs: dict[str, Tensor] = {}
    ups: dict[str, Tensor] = {}
    full: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        module, found, rest = name.partition(".lora_")
        if found and rest == "A.weight":
            downs[module] = tensor
        elif found and rest == "B.weight":
            ups[module] = tensor
        elif found:
            raise UnsupportedAdapterError(
                f"{role}: adapter tensor {key!r} is not a LoRA A or B matrix of a linear layer "
                "(embedding, convolution or variant LoRA); only LoRA on linear layers is supported"
            )
        else:
            _check_full(role, name, tensor, base_shapes, heads)
            full[name] = tensor.to(torch.float32)
    if set(downs) != set(ups):
        lone = sorted(set(downs) ^ set(ups))[0]
        raise ExpertMismatchError(f"{role}: LoRA target {lone!r} has only one of its A and B matrices")
    factors = {}
    for module in sorted(downs):
        r = int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r))
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha
        )
        down, up = downs[module].to(torch.float32), ups[module].to(torch.float32)
        weight = f"{module}.weight"
        fan_in_fan_out = _target_layout(role, weight, base, base_shapes)
        _check_factors(role, weight, down, up, r, base_shapes[weight], fan_in_fan_out)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        factors[weight] = LoraFactors(down, up, float(scaling), fan_in_fan_out)
    return factors, full


def _check_full(role: str, name: str, tensor: Tensor, base_shapes, heads) -> None:
    if name not in base_shapes:
        raise ExpertMismatchError(
            f"{role}: adapter tensor {name!r} (modules_to_save) is not a tensor of model.base; "
            "was the adapter trained on another architecture?"
        )
    if name not in heads and tuple(tensor.shape) != tuple(base_shapes[name]):
        raise ExpertMismatchError(
            f"{role}: adapter tensor {name!r} has shape {tuple(tensor.shape)} but model.base has "
            f"{tuple(base_shapes[name])}; was the adapter trained on another base?"
        )


def _target_layout(role: str, weight: str, base: nn.Module, base_shapes) -> bool:
    """Whether the target stores its weight d_in x d_out (GPT-2's Conv1D), decided by the layer's
    type as peft does (it overrides the config's fan_in_fan_out the same way)."""
    from transformers.pytorch_utils import Conv1D

    if weight not in base_shapes:
        raise ExpertMismatchError(
            f"{role}: LoRA target {weight!r} is not a tensor of model.base; "
            "was the adapter trained on another architecture?"
        )
    layer = base.get_submodule(weight.rpartition(".")[0])
    if not isinstance(layer, nn.Linear | Conv1D):
        raise UnsupportedAdapterError(
            f"{role}: LoRA target {weight!r} is a {type(layer).__name__} in model.base; only LoRA on "
            "linear layers is supported (merge the adapter with peft's merge_and_unload instead)"
        )
    return isinstance(layer, Conv1D)


def _check_factors(role, weight, down, up, r, shape, fan_in_fan_out) -> None:
    if down.dim() != 2 or up.dim() != 2:
        raise UnsupportedAdapterError(
            f"{role}: LoRA target {weight!r} has A {tuple(down.shape)}, not a matrix; "
            "only LoRA on linear layers is supported"
        )
    d_out, d_in = shape[::-1] if fan_in_fan_out else shape
    if down.shape != (r, d_in) or up.shape != (d_out, r):
        raise ExpertMismatchError(
            f"{role}: LoRA target {weight!r}: A {tuple(down.shape)} and B {tuple(up.shape)} do not fit "
            f"model.base's {shape} at rank {r} (expected A {(r, d_in)}, B {(d_out, r)}); "
            "was the adapter trained on another base?"
        )


# ---------------------------------------------------------------- several adapters, one base
PEFT_TASK_KINDS: dict[str, TaskKind] = {"SEQ_CLS": "sequence_classification", "CAUSAL_LM": "causal_lm"}


def adapter_kind(config, role: str, folder: Path) -> TaskKind | None:
    """The task kind an adapter was trained for (peft's ``task_type``), None when it says none."""
    if config.task_type is None:
        return None
    kind = PEFT_TASK_KINDS.get(str(config.task_type))
    if kind is None:
        raise UnsupportedAdapterError(
            f"{role}: {str(folder)!r} is a LoRA for task_type {str(config.task_type)!r}; "
            f"only {sorted(PEFT_TASK_KINDS)} (classification with heads, causal LM) can be merged"
        )
    return kind


@dataclass
class LoraExperts:
    """The LoRA experts of a merge, over one base: factors stacked per target (tasks that are not
    adapters add no rank), the rest of each adapter (``modules_to_save``) split into per-task heads
    and full backbone tensors (to be merged as dense task vectors), a config per task (the base's,
    with the adapter's number of labels), and content fingerprints."""

    stacks: dict[str, LowRankStack]
    heads: dict[str, dict[str, Tensor]]  # task -> its head tensors
    full: dict[str, dict[str, Tensor]]  # task -> backbone tensors it replaces whole
    configs: dict[str, PretrainedConfig]
    fingerprints: dict[str, str]


def read_lora_experts(
    base: PreTrainedModel,
    kind: TaskKind,
    tasks: Sequence[str],
    folders: Mapping[str, str | Path],
    heads: set[str],
    allow_pickle: bool = False,
) -> LoraExperts:
    """Read the adapters among ``tasks`` (``folders``: task -> adapter folder; the other tasks are
    full experts) and check each against ``base`` and the merge's ``kind``. ``heads``: the base's
    per-task head tensors (a classification adapter must save its own head: a LoRA trained with
    ``task_type="SEQ_CLS"`` does)."""

    per_task: list[dict[str, LoraFactors]] = []
    task_heads, full, configs, fingerprints = {}, {}, {}, {}
    for task in tasks:
        if task not in folders:
            per_task.append({})
            continue
        role = f"expert {task!r}"
        adapter = read_adapter(folders[task], role, base, heads, allow_pickle)
        _check_kind(role, adapter.folder, adapter_kind(adapter.config, role, adapter.folder), kind)
        if set(adapter.factors) & heads:
            raise UnsupportedAdapterError(
                f"{role}: LoRA targets head tensor {sorted(set(adapter.factors) & heads)[0]!r}; a "
                "per-task head must be saved whole (modules_to_save), not as a LoRA"
            )
        task_heads[task] = {n: t for n, t in adapter.full.items() if n in heads}
        full[task] = {n: t for n, t in adapter.full.items() if n not in heads}
        lacking = sorted(heads - set(task_heads[task]))
        if lacking:
            raise ExpertMismatchError(
                f"{role}: {str(adapter.folder)!r} does not save head tensor {lacking[0]!r} "
                "(modules_to_save); a classification expert needs its own trained head: train the "
                "LoRA with task_type='SEQ_CLS' or modules_to_save=[<head module>]"
            )
        configs[task] = _expert_config(base, task_heads[task], kind, role)
        per_task.append(adapter.factors)
        fingerprints[task] = fingerprint({**_factor_tensors(adapter.factors), **adapter.full})
    return LoraExperts(stack_factors(per_task), task_heads, full, configs, fingerprints)


def _check_kind(role: str, folder: Path, own: TaskKind | None, kind: TaskKind) -> None:
    if own is not None and own != kind:
        raise ExpertMismatchError(
            f"{role}: {str(folder)!r} is a {own} LoRA but the merge is {kind} "
            "(from the other experts, or the base's architectures); experts must share one kind"
        )


def _expert_config(base: PreTrainedModel, head: Mapping[str, Tensor], kind: TaskKind, role: str):
    """The base's config with the adapter's number of labels: the rows of the head tensors that
    have one row per label in the base (``classifier.*``, not DistilBERT's ``pre_classifier``)."""
    config = copy.deepcopy(base.config)
    if kind != "sequence_classification":
        return config
    params = dict(base.named_parameters())
    rows = {t.shape[0] for n, t in head.items() if params[n].shape[0] == base.config.num_labels}
    if len(rows) > 1:
        raise ExpertMismatchError(
            f"{role}: its head tensors disagree on the number of labels ({sorted(rows)} rows)"
        )
    if rows:
        config.num_labels = rows.pop()
    return config


def _factor_tensors(factors: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    """Named tensors that change whenever a factor or its scaling does (for fingerprints)."""
    named = {}
    for name, f in factors.items():
        named.update({f"{name}.lora_A": f.down, f"{name}.lora_B": f.up})
        named[f"{name}.scaling"] = torch.tensor([f.scaling], dtype=torch.float64)
    return named
