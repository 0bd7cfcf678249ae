"""Predict and score every example of a test set: one record per example.

Examples with `options` are classified by lowest LM loss over the options
(`evaluation.choice`); the others are generated greedily (batched, stopping at
EOS, `evaluation.generate`). Either way the prediction is scored with ROUGE-L
and exact match, and chosen predictions also with accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from statistics import fmean

import torch

from fedmole.data.tokenize import answer_ids
from fedmole.data.types import Example
from fedmole.evaluation.choice import choose, option_losses
from fedmole.evaluation.generate import greedy_generate, stop_token_ids
from fedmole.evaluation.metrics import example_scores

METRICS = ("rouge_l", "exact_match", "accuracy")


def predict(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    encode_prompt_fn: Callable[[Example], list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[dict]:
    """Records {"example_id", "prediction", "references", "scores"}, in the order of `examples`
    (`progress`: a bar per generation batch)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = [encode_prompt_fn(ex) for ex in examples]
    predictions = [""] * len(examples)

    generate = [i for i, ex in enumerate(examples) if not ex.options]
    if generate:
        outputs = greedy_generate(
            model, [prompts[i] for i in generate], pad_id=pad_id, eos_ids=stop_token_ids(model, tokenizer),
            max_new_tokens=max_new_tokens, batch_size=batch_size, autocast_dtype=autocast_dtype, progress=progress,
        )
        for i, toks in zip(generate, outputs):
            predictions[i] = tokenizer.decode(toks, skip_special_tokens=True).strip()

    classify = [i for i, ex in enumerate(examples) if ex.options]
    if classify:
        losses = option_losses(
            model, [prompts[i] for i in classify],
            [[answer_ids(tokenizer, opt) for opt in examples[i].options] for i in classify],
            pad_id=pad_id, batch_size=batch_size, autocast_dtype=autocast_dtype,
        )
        for i, per_option in zip(classify, losses):
            predictions[i] = examples[i].options[choose(per_option)]

    return [
        {"example_id": ex.id, "prediction": pred, "references": list(ex.outputs),
         "scores": example_scores(pred, ex.outputs, bool(ex.options))}
        for ex, pred in zip(examples, predictions)
    ]


def mean_scores(records: Sequence[dict]) -> dict:
    """Mean of each metric over the records that have it, and "n" (records); "accuracy" only
    when some record has it. With no records, rouge_l and exact_match are 0.0 and n is 0."""
    out: dict = {}
    for m in METRICS:
        values = [r["scores"][m] for r in records if m in r["scores"]]
        if values or m != "accuracy":
            out[m] = fmean(values) if values else 0.0
    out["n"] = len(records)
    return out
