"""Greedy decoding and scoring for evaluation.

`greedy_generate` wraps transformers' `generate` with left padding, length
bucketing and a generation config that pins plain greedy search, so a
checkpoint's `generation_config.json` (temperature, repetition penalty, ...)
cannot change what is measured. `lm_loss_choice` scores multiple-choice
options by language-model loss.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import GenerationConfig

from fedmole.data.types import Example
from fedmole.evaluation.metrics import score

log = logging.getLogger(__name__)


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

        batches = tqdm(batches, desc="generate", unit="batch", leave=False)

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
            log.debug("generated batch %d/%d (%d prompts)", start // batch_size + 1,
                      -(-len(order) // batch_size), len(idx))
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


def evaluate_generation(
    model: torch.nn.Module,
    tokenizer,
    examples: list[Example],
    encode_prompt_fn: Callable[[Example], list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Generate for every example and score against its references (`progress`: a bar per batch).

    Returns {"rouge_l", "exact_match", "n", "predictions"}, predictions in
    the order of `examples`.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = greedy_generate(
        model,
        [encode_prompt_fn(ex) for ex in examples],
        pad_id=pad_id,
        eos_ids=stop_token_ids(model, tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        progress=progress,
    )
    predictions = [tokenizer.decode(toks, skip_special_tokens=True).strip() for toks in outputs]
    result = score(predictions, [ex.outputs for ex in examples])
    result["predictions"] = predictions
    return result


def lm_loss_choice(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[int],
    options: list[list[int]],
) -> int:
    """Index of the option whose tokens have the lowest mean LM loss after the prompt.

    All options run as one right-padded batch (B = len(options)).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; the first option token needs a context to be predicted from")
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("options must be a non-empty list of non-empty token-id lists")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [prompt_ids + opt for opt in options]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (seq, opt) in enumerate(zip(seqs, options)):
        input_ids[row, : len(seq)] = torch.tensor(seq)
        attention_mask[row, : len(seq)] = 1
        labels[row, len(prompt_ids) : len(seq)] = torch.tensor(opt)
    device = _device(model)
    with _eval_mode(model), torch.inference_mode():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    targets = labels[:, 1:].to(device)  # (B, T-1)
    token_loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    mask = targets != -100
    mean_loss = (token_loss * mask).sum(dim=1) / mask.sum(dim=1)  # (B,)
    return int(mean_loss.argmin().item())
