"""Cheap checks of the base and the experts, run before anything slow (reading and tokenising
data, loading weights, teachers): folders (or Hub ids, resolved to their cached snapshot),
config.json, architectures, the weights' format, and tensor names and shapes from the
safetensors headers, which are read without the tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
)

from .hub import MODEL_FILES, PICKLE_FILES, local_or_snapshot
from .merged import tied_aliases

TaskKind = Literal["sequence_classification", "causal_lm"]

_KIND_SUFFIX: dict[str, TaskKind] = {
    "ForSequenceClassification": "sequence_classification",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",  # GPT-2's name for its causal LM class
}


class ExpertMismatchError(ValueError):
    """The base and the experts cannot be merged (names the expert and the tensor)."""


def resolve_model_dir(path: str, role: str, allow_pickle: bool = False) -> Path:
    """The local folder of a model given as a folder or a Hub id (``org/name[@revision]``,
    resolved into the user's hub cache), checked to hold a Hugging Face model, naming ``role``
    if not. A folder that exists always wins over an id of the same spelling."""
    patterns = MODEL_FILES + PICKLE_FILES if allow_pickle else MODEL_FILES
    folder = local_or_snapshot(path, role, patterns)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{role}: model folder {str(folder)!r} does not exist (give a folder written by "
            "save_pretrained, or a Hub id such as org/name)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{role}: {str(folder)!r} is not a Hugging Face model folder (no config.json); "
            "give a folder written by save_pretrained"
        )
    return folder


def detect_kind(name: str, config: PretrainedConfig) -> TaskKind:
    """The task kind follows from the expert's ``architectures``, so configs need no extra key."""
    for arch in config.architectures or []:
        for suffix, kind in _KIND_SUFFIX.items():
            if arch.endswith(suffix):
                return kind
    raise ExpertMismatchError(
        f"expert {name!r}: architectures {config.architectures} is not supported; "
        f"expected a model ending in one of {sorted(_KIND_SUFFIX)}"
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAPPINGS = {
    "sequence_classification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    "causal_lm": MODEL_FOR_CAUSAL_LM_MAPPING,
}


@dataclass(frozen=True)
class CheckedModels:
    """What the checks found: the loading that follows needs not find it again."""

    paths: dict[str, Path]  # "base" and every task -> folder
    configs: dict[str, PretrainedConfig]  # every task -> its expert's config
    base_config: PretrainedConfig
    kind: TaskKind


def read_config(folder: Path, role: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise ExpertMismatchError(
            f"{role}: {str(folder / 'config.json')!r} cannot be read as a transformers config "
            f"({type(err).__name__}: {err}); re-save the model with save_pretrained"
        ) from err


def safetensors_in(folder: Path) -> list[Path]:
    """The folder's safetensors weight files (one, or the shards its index names)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as err:
            raise ExpertMismatchError(f"{str(index)!r} is not a safetensors index ({err})") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(index)!r} names shard {missing[0]!r}, which is not in the folder")
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def check_weight_format(folder: Path, role: str, allow_pickle: bool) -> bool:
    """True when the weights are safetensors. Pickled weights can run code when loaded: they are
    refused unless the user opts in for folders they trust."""
    if safetensors_in(folder):
        return True
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise FileNotFoundError(
            f"{role}: {str(folder)!r} holds no weights (no model.safetensors); give the folder "
            "save_pretrained wrote (from a Hub id only safetensors weights are fetched, pickles "
            "too with model.allow_pickle: true for a repository you trust)"
        )
    if not allow_pickle:
        raise ExpertMismatchError(
            f"{role}: {str(folder)!r} holds weights only as pickles ({', '.join(pickles)}), which can run "
            "arbitrary code when loaded; convert them once (from_pretrained, then save_pretrained, which "
            "writes model.safetensors) or, for a folder you trust, set model.allow_pickle: true"
        )
    return False


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes from the safetensors headers (no tensor is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_in(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def backbone(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    """Tensors of the shared backbone, named without the head class's prefix (``bert.`` ...), so
    a base saved as the bare backbone and one saved with a head compare alike."""
    dotted = prefix + "."
    if prefix and any(n.startswith(dotted) for n in shapes):
        return {n[len(dotted) :]: s for n, s in shapes.items() if n.startswith(dotted)}
    return dict(shapes)


def check_models(base: str, experts: dict[str, str], allow_pickle: bool = False) -> CheckedModels:
    """Everything about the models that can be known without reading their weights."""
    if not experts:
        raise ValueError("model.experts is empty: give at least one {task_name: expert_folder}")
    paths = {"base": resolve_model_dir(base, "model.base", allow_pickle)}
    paths.update({t: resolve_model_dir(p, f"expert {t!r}", allow_pickle) for t, p in experts.items()})
    base_config = read_config(paths["base"], "model.base")
    configs = {t: read_config(paths[t], f"expert {t!r}") for t in experts}
    tasks = list(experts)
    first = tasks[0]
    kind = detect_kind(first, configs[first])
    for task in tasks[1:]:
        cfg, ref = configs[task], configs[first]
        if cfg.model_type != ref.model_type or detect_kind(task, cfg) != kind:
            raise ExpertMismatchError(
                f"expert {task!r} is a {cfg.model_type} {cfg.architectures} but expert {first!r} "
                f"is a {ref.model_type} {ref.architectures}: experts must share one architecture"
            )
    if base_config.model_type != configs[first].model_type:
        raise ExpertMismatchError(
            f"model.base is a {base_config.model_type} {base_config.architectures} but the experts are "
            f"{configs[first].model_type} {configs[first].architectures}: give the base they were "
            "fine-tuned from"
        )
    roles = {"base": "model.base", **{t: f"expert {t!r}" for t in tasks}}
    safe = {r: check_weight_format(paths[r], roles[r], allow_pickle) for r in paths}
    if all(safe.values()):
        _check_headers(paths, configs, base_config, kind, roles)
    return CheckedModels(paths=paths, configs=configs, base_config=base_config, kind=kind)


def architecture_shapes(config: PretrainedConfig, kind: TaskKind) -> dict[str, tuple[int, ...]]:
    """The tensors ``save_pretrained`` writes for this architecture, built on the meta device
    (no memory, no weights read)."""
    from_config = _MAPPINGS[kind].get(type(config), None)
    if from_config is None:
        return {}
    with torch.device("meta"):
        model = from_config._from_config(config)
    aliases = tied_aliases(model)
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in aliases}


def _check_headers(paths, configs, base_config, kind, roles) -> None:
    tasks = list(configs)
    cls = _MAPPINGS[kind].get(type(configs[tasks[0]]), None)
    prefix = getattr(cls, "base_model_prefix", "")
    architecture = architecture_shapes(configs[tasks[0]], kind)
    base = backbone(tensor_shapes(paths["base"]), prefix)
    lacking = sorted(set(backbone(architecture, prefix)) - set(base))
    if architecture and lacking:
        raise ExpertMismatchError(
            f"model.base {str(paths['base'])!r} lacks {len(lacking)} tensor(s) of the experts' "
            f"backbone, e.g. {lacking[0]!r}. Likely cause: the base was saved with another head class "
            f"({base_config.architectures}), which drops them (a masked-LM head has no pooler). "
            "Fix: give model.base the very folder the experts were fine-tuned from (the pretrained "
            "checkpoint as published, or saved with the experts' class)"
        )
    for task in tasks:
        shapes = tensor_shapes(paths[task])
        if set(shapes) != set(architecture):
            continue  # another file layout: from_pretrained reads it, and names what is off
        mine = backbone(shapes, prefix)
        for name in sorted(set(mine) & set(base)):
            if mine[name] != base[name]:
                raise ExpertMismatchError(
                    f"expert {task!r}: tensor {name!r} has shape {mine[name]} but the base has "
                    f"{base[name]}; experts must be fine-tuned from this very base (same sizes)"
                )
