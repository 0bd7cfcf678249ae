"""Greedy decoding for evaluation.

`greedy_generate` wraps transformers' `generate` with left padding, length
bucketing and a generation config that pins plain greedy search, so a
checkpoint's `generation_config.json` (temperature, repetition penalty, ...)
cannot change what is measured. Options are scored by `evaluation.choice`;
`evaluation.predict` puts the two together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from transformers import GenerationConfig


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Evaluation must not run dropout, but the caller's mode is theirs to keep.
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _greedy_config(pad_id: int, eos_ids: list[int], max_new_tokens: int) -> GenerationConfig:
    # generate() fills every field left None from model.generation_config, so
    # the fields that could alter greedy search, or warn about sampling flags
    # a checkpoint ships, are set here to their neutral values.
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_length=0,
        pad_token_id=pad_id,
        eos_token_id=eos_ids,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        use_cache=True,
        return_dict_in_generate=False,
    )


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input_ids and attention_mask, prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def _cut_at_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i]
    return tokens


def greedy_generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_ids: set[int] | list[int],
    max_new_tokens: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts, in the order given.

    Prompts are sorted by length and batched (left padded, KV cache), so each
    batch pads little; each result holds only new tokens, cut before the
    first token in `eos_ids`, at most `max_new_tokens` long.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token; got an empty prompt")
    eos = set(eos_ids)
    if not eos:
        raise ValueError("eos_ids is empty; give at least one stop token id")
    config = _greedy_config(pad_id, sorted(eos), max_new_tokens)
    device = _device(model)

    # Longest first: the most memory-hungry batch runs first, and neighbours
    # in the sorted order have similar lengths.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    batches: Iterable[int] = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="generate", unit="batch")

    results: list[list[int]] = [[] for _ in prompts]
    with _eval_mode(model), torch.inference_mode(), _autocast(device, autocast_dtype):
        for start in batches:
            idx = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([prompts[i] for i in idx], pad_id)
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # (B, T + new), new <= max_new_tokens
            new_tokens = out[:, input_ids.shape[1] :].tolist()
            for i, toks in zip(idx, new_tokens):
                results[i] = _cut_at_eos(toks, eos)
    return results


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokenizer's eos plus every eos the model's generation config lists."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(gen_eos, int):
        ids.add(gen_eos)
    elif gen_eos is not None:
        ids.update(gen_eos)
    return ids
