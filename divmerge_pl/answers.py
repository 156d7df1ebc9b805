"""Causal LMs: an expert's greedy answers, and any model's logits at those answer tokens.

The divergence of a generative task is taken on the answer, not the prompt: each expert answers
its own prompts once, greedily (EOS included), and the merged model is then run teacher-forced
on prompt + that answer. Prompts come left-padded, answers right-padded after them, so a batch
is one ``[pads | prompt | answer | pads]`` tensor and the logits that predict answer token ``j``
sit at the same column for every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .divergences import top_k_with_rest
from .merged import swapped_weights


def trim_at_eos(answers: Tensor, eos_id: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Cut each row after its first EOS (kept: the model must learn to stop); ``(ids, lengths)``."""
    steps = answers.shape[1]
    is_eos = answers == eos_id
    lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(answers[:, 0], steps))
    keep = torch.arange(steps, device=answers.device) < lengths[:, None]
    return answers.masked_fill(~keep, pad_id), lengths


@contextmanager
def plain_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Greedy must mean argmax: ``generate`` fills every option we leave unset from the model
    folder's ``generation_config.json`` (repetition_penalty, no_repeat_ngram_size,
    min_new_tokens, suppress_tokens...), which would make the cached answers differ from the
    argmax of the cached distributions. Hide it for the call."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> tuple[Tensor, Tensor]:
    """Plain greedy answers to left-padded prompts, whatever the model's generation_config says:
    ``(ids [rows, max_new_tokens], lengths [rows])``."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_id, pad_token_id=pad_id
    )
    with plain_generation_config(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    answers = F.pad(
        out[:, input_ids.shape[1] :], (0, max_new_tokens - (out.shape[1] - input_ids.shape[1])), value=pad_id
    )
    return trim_at_eos(answers, eos_id, pad_id)


def with_answers(
    input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor, lengths: Tensor
) -> tuple[dict[str, Tensor], Tensor]:
    """Model inputs for prompt + answer, and the mask of real answer tokens ``[rows, width]``."""
    width = answer_ids.shape[1]
    answer_mask = torch.arange(width, device=answer_ids.device) < lengths[:, None]
    mask = torch.cat([attention_mask, answer_mask.to(attention_mask.dtype)], dim=1)
    # explicit positions: left padding must not shift them (generate counts them the same way)
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    ids = torch.cat([input_ids, answer_ids], dim=1)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}, answer_mask


def answer_logits(
    model: torch.nn.Module,
    tensors: dict[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    answer_ids: Tensor,
    lengths: Tensor,
) -> tuple[Tensor, Tensor]:
    """Logits predicting each answer token ``[rows, width, vocab]`` and the answer mask.

    Only the ``width + 1`` last positions go through the LM head (``logits_to_keep``): with a
    large vocabulary the prompt's logits would cost more memory than the whole backbone pass.
    """
    inputs, answer_mask = with_answers(input_ids, attention_mask, answer_ids, lengths)
    kwargs = {**inputs, "logits_to_keep": answer_ids.shape[1] + 1, "use_cache": False}
    logits = functional_call(model, tensors, args=(), kwargs=kwargs, strict=False).logits
    return logits[:, :-1], answer_mask


@torch.no_grad()
def answer_targets(
    model: torch.nn.Module,
    tensors: dict[str, Tensor],
    batches: Iterable[dict[str, Tensor]],
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    desc: str,
    show_progress: bool = True,
    *,
    top_k: int | None = None,
    logprobs: bool = True,
) -> dict[str, Tensor]:
    """What an expert (``model`` holding ``tensors``) teaches on its prompts: its greedy answers
    (``answer_ids``, ``answer_len``) and, with ``logprobs``, its log-probabilities at them, over
    the vocabulary or as top-``k`` + rest (``logprobs``, ``top_ids``)."""
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {"answer_ids": [], "answer_len": [], "logprobs": [], "top_ids": []}
    with swapped_weights(model, tensors):
        for batch in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            answers, lengths = generate_answers(model, ids, mask, max_new_tokens, eos_id, pad_id)
            parts["answer_ids"].append(answers.cpu())
            parts["answer_len"].append(lengths.cpu())
            if not logprobs:
                continue
            logits, _ = answer_logits(model, {}, ids, mask, answers, lengths)
            logp = torch.log_softmax(logits.float(), dim=-1)
            if top_k is not None:
                top_ids, logp = top_k_with_rest(logp, top_k)
                parts["top_ids"].append(top_ids.cpu())
            parts["logprobs"].append(logp.cpu())
    return {key: torch.cat(values) for key, values in parts.items() if values}


# greedy answers only (for scoring an expert on labelled rows)
expert_generations = partial(answer_targets, logprobs=False)
