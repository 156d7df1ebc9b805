"""Load a base model and its experts from Hugging Face folders, check they fit, fingerprint them.

Everything here runs before any optimisation, so a wrong path or an expert of another
architecture fails in seconds with the expert and the tensor named, not after an hour.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)
from transformers import logging as hf_logging

from .fingerprints import digest_tensor, fingerprint
from .lora import adapter_folders, check_with_adapters, read_lora_experts
from .low_rank import LowRankStack
from .merged import tied_aliases
from .preflight import ExpertMismatchError, TaskKind

log = logging.getLogger(__name__)

KIND_CLASS = {
    "sequence_classification": AutoModelForSequenceClassification,
    "causal_lm": AutoModelForCausalLM,
}


def safetensors_files(folder: Path, names: set[str]) -> dict[str, Path] | None:
    """Which safetensors file (one, or shards) holds each tensor of ``folder``, or None when the
    files do not hold exactly ``names`` (other layouts then take a full ``from_pretrained``,
    which also reports what is missing or extra)."""
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        return None
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), path))
    return where if set(where) == names else None


def read_safetensor(path: Path, name: str) -> Tensor:
    """One tensor, its file mapped only while the tensor lives: a handle kept open for a whole
    expert would keep every page read so far resident, a second copy of the model in RSS."""
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name).to(torch.float32)


@dataclass
class LoadedExperts:
    """What merging needs, with each expert kept as a task vector rather than a model copy."""

    kind: TaskKind
    base_model: torch.nn.Module  # the base weights (theta0) in the experts' architecture
    tasks: tuple[str, ...]
    task_vectors: dict[str, Tensor]  # tensor name -> [num_tasks, *shape]; only tensors that differ
    heads: dict[str, dict[str, Tensor]]  # task -> its own head tensors (kept, never merged)
    configs: dict[str, PretrainedConfig]  # task -> its expert's config (labels, head size)
    paths: dict[str, Path]  # "base" and every task -> folder
    fingerprints: dict[str, str]  # "base" and every task -> content hash
    low_rank: dict[str, LowRankStack] = field(default_factory=dict)  # LoRA experts' factors per target


def head_names(model: torch.nn.Module, kind: TaskKind) -> set[str]:
    """Per-task head tensors: everything outside the shared backbone (``base_model_prefix``).
    A causal LM has none: its LM head is shared by every task, so it is merged too (once, when
    tied to the input embeddings)."""
    if kind != "sequence_classification":
        return set()
    prefix = getattr(model, "base_model_prefix", "") + "."
    return {name for name, _ in model.named_parameters() if not name.startswith(prefix)}


def _load(cls, folder: Path, role: str, **kwargs):
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # we report missing tensors ourselves, precisely
    try:
        model, info = cls.from_pretrained(folder, dtype=torch.float32, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise ExpertMismatchError(f"{role}: cannot load {str(folder)!r}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    return model.eval(), info


def _check_dtypes(configs: dict[str, PretrainedConfig]) -> None:
    stored = {
        name: str(getattr(cfg, "dtype", None) or "float32").removeprefix("torch.")
        for name, cfg in configs.items()
    }
    if len(set(stored.values())) > 1:
        warnings.warn(
            f"experts were saved in different dtypes ({stored}); all are upcast to float32 for merging",
            stacklevel=3,
        )


def load_experts(
    base: str,
    experts: dict[str, str],
    vector_dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
    keep: Callable[[Tensor], Tensor] | None = None,
) -> LoadedExperts:
    """Load ``base`` and ``experts`` and check, before any training, that they can be merged.

    Experts are read one tensor at a time (safetensors) straight into task-vector stacks stored
    in ``vector_dtype``: the peak is the base plus the stacks plus one tensor, never a whole
    expert model (a checkpoint in another layout falls back to loading that one expert whole).
    Pickled weights (``.bin``) are refused unless ``allow_pickle``: loading them can run code.
    ``keep`` (sharded mode) gives the part of a tensor this process holds: task vectors are then
    stored as that part only, from the first expert on.
    """
    checked = check_with_adapters(base, experts, allow_pickle)
    adapters = adapter_folders(experts)  # LoRA experts: read below, kept as their factors
    paths, configs, kind = dict(checked.paths), checked.configs, checked.kind
    tasks = tuple(experts)
    first = tasks[0]
    _check_dtypes({"base": checked.base_config, **configs})
    cls = KIND_CLASS[kind]

    # The base in the experts' architecture: its backbone is theta0, its own head is unused.
    safe = {"use_safetensors": None if allow_pickle else True}
    base_config = configs.get(first, checked.base_config)  # an adapter's: the base's own
    base_model, info = _load(cls, paths["base"], "model.base", config=base_config, **safe)
    heads = head_names(base_model, kind)
    base_state = {n: p.detach() for n, p in base_model.named_parameters()}
    missing = sorted(n for n in info["missing_keys"] if n not in heads)
    if missing:
        raise ExpertMismatchError(
            f"model.base {str(paths['base'])!r} lacks tensor {missing[0]!r} "
            f"({len(missing)} missing in all) that the experts' architecture needs"
        )
    for param in base_model.parameters():
        param.requires_grad_(False)
    _check_finite("model.base", {n: t for n, t in base_state.items() if n not in heads})

    merged_names = [n for n in base_state if n not in heads]
    # a tensor equal to the base in every expert (e.g. frozen word embeddings) gets no stack at all
    task_vectors: dict[str, Tensor] = {}
    task_heads: dict[str, dict[str, Tensor]] = {}
    fingerprints = {"base": fingerprint({n: base_state[n] for n in merged_names})}
    on_disk = set(base_model.state_dict()) - set(tied_aliases(base_model))
    for t, task in enumerate(tasks):
        _check_tokenizer(task, paths[task], paths["base"])
        if task in adapters:
            continue
        files = safetensors_files(paths[task], on_disk)
        if files is None:
            read = _load_expert_whole(cls, paths[task], task, **safe).__getitem__
        else:
            read = lambda name, files=files: read_safetensor(files[name], name)  # noqa: E731
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(base_state):  # the order `fingerprint` hashes in
            tensor = read(name)
            _check_tensor(task, name, tensor, base_state[name], name in heads)
            digest_tensor(digest, name, tensor)
            if name in heads:  # a copy: a view would keep the whole mapped file alive
                task_heads.setdefault(task, {})[name] = tensor.clone()
                continue
            _add_task_vector(task_vectors, name, t, tensor, base_state[name], len(tasks), vector_dtype, keep)
        fingerprints[task] = digest.hexdigest()
        task_heads.setdefault(task, {})
    lora = read_lora_experts(base_model, kind, tasks, adapters, heads, allow_pickle)
    for task in adapters:  # tensors an adapter saves whole (modules_to_save) merge as dense vectors
        t = tasks.index(task)
        for name, tensor in lora.full[task].items():
            _add_task_vector(task_vectors, name, t, tensor, base_state[name], len(tasks), vector_dtype, keep)
    task_heads.update(lora.heads)
    configs.update(lora.configs)
    fingerprints.update(lora.fingerprints)
    task_vectors = {n: task_vectors[n] for n in merged_names if n in task_vectors}  # model order
    return LoadedExperts(
        kind=kind,
        base_model=base_model,
        tasks=tasks,
        task_vectors=task_vectors,
        heads={task: task_heads[task] for task in tasks},
        configs=configs,
        paths=paths,
        fingerprints=fingerprints,
        low_rank=lora.stacks,
    )


def _add_task_vector(task_vectors, name, t, tensor, base, num_tasks, dtype, keep=None) -> None:
    """Task ``t``'s ``tensor - base`` (``keep``'s part of it) into the stack of ``name`` (created
    when first needed)."""
    if not torch.equal(tensor, base):  # no temporary difference tensor
        if keep is not None:
            tensor, base = keep(tensor), keep(base)
        if name not in task_vectors:
            task_vectors[name] = torch.zeros((num_tasks, *tensor.shape), dtype=dtype)
        torch.sub(tensor, base, out=task_vectors[name][t])


def _check_finite(role: str, state: dict[str, Tensor]) -> None:
    for name, tensor in state.items():
        # in chunks: isfinite makes a temporary |x| as large as the tensor (an embedding matrix)
        bad = sum(int((~torch.isfinite(part)).sum()) for part in tensor.reshape(-1).split(1 << 20))
        if bad:
            raise ExpertMismatchError(
                f"{role}: tensor {name!r} holds {bad} NaN/inf value(s); "
                "the model is corrupted (re-export it, or check its fine-tuning for divergence)"
            )


def _tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _check_tokenizer(task: str, folder: Path, base: Path) -> None:
    """An expert saved with its own tokenizer must use the base's vocabulary: token ids must mean
    the same thing in every model that is merged."""
    mine, reference = _tokenizer_vocab(folder), _tokenizer_vocab(base)
    if mine is None or reference is None or mine == reference:
        return
    differing = sorted(set(mine.items()) ^ set(reference.items()))[0][0]
    raise ExpertMismatchError(
        f"expert {task!r}: its tokenizer's vocabulary differs from the base's ({len(mine)} vs "
        f"{len(reference)} tokens; e.g. {differing!r}); experts must be fine-tuned with the base's tokenizer"
    )


def _load_expert_whole(cls, folder: Path, task: str, **kwargs) -> dict[str, Tensor]:
    """An expert whose files are not plain safetensors of the architecture's names: loaded by
    ``from_pretrained``, which knows every layout, and checked for missing or extra tensors."""
    model, info = _load(cls, folder, f"expert {task!r}", **kwargs)
    if info["missing_keys"]:
        raise ExpertMismatchError(
            f"expert {task!r}: tensor {sorted(info['missing_keys'])[0]!r} is missing from "
            f"{str(folder)!r} (it would be randomly initialised)"
        )
    if info["unexpected_keys"]:
        raise ExpertMismatchError(
            f"expert {task!r}: tensor {sorted(info['unexpected_keys'])[0]!r} in {str(folder)!r} "
            f"is not part of the {cls.__name__} architecture ({len(info['unexpected_keys'])} such); "
            "was it saved from another model class?"
        )
    return {n: p.detach() for n, p in model.named_parameters()}


def _check_tensor(task: str, name: str, tensor: Tensor, ref: Tensor, is_head: bool) -> None:
    if not is_head and tensor.shape != ref.shape:
        raise ExpertMismatchError(
            f"expert {task!r}: tensor {name!r} has shape {tuple(tensor.shape)} "
            f"but the base has {tuple(ref.shape)}"
        )
    _check_finite(f"expert {task!r}", {name: tensor})
