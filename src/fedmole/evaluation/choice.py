"""Multiple choice by language-model loss: the option whose tokens the model finds
most likely after the prompt.

Each option is scored as it would be trained: its tokens followed by EOS, after
the same prompt encoding (and chat template) that generation uses. The score is
the mean next-token cross-entropy over those tokens; the lowest wins (ties go
to the earlier option). Every (example, option) pair of an evaluation runs in
length-sorted, right-padded batches, and only the option positions go through
the vocabulary head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _token_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """(B, T-1) next-token losses, zero where labels[:, 1:] is IGNORE."""
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = targets != IGNORE
    cfg = model.config
    head = model.get_output_embeddings()
    out = torch.zeros(targets.shape, dtype=torch.float32, device=input_ids.device)
    if head is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][keep]
    else:  # project only the option positions: (n, H) -> (n, V)
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state  # (B, T, H)
        logits = head(hidden[:, :-1][keep])
    out[keep] = F.cross_entropy(logits.float(), targets[keep], reduction="none")
    return out


def option_losses(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[float]]:
    """Mean LM loss of every option of every prompt: result[i][j] for options[i][j].

    `prompts[i]` are token ids (non-empty); `options[i]` is a list of non-empty token-id
    lists (include EOS in them if it should count). Batches hold `batch_size` sequences.
    """
    if len(prompts) != len(options):
        raise ValueError(f"got {len(prompts)} prompts but {len(options)} option lists; they must pair up")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pairs = []  # (example, option, prompt ids, option ids)
    for i, (prompt, opts) in enumerate(zip(prompts, options)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; the first option token needs a context to be predicted from")
        if not opts or any(len(o) == 0 for o in opts):
            raise ValueError(f"example {i}: options must be a non-empty list of non-empty token-id lists")
        pairs += [(i, j, list(prompt), list(o)) for j, o in enumerate(opts)]
    device = next(model.parameters()).device
    result = [[0.0] * len(opts) for opts in options]
    pairs.sort(key=lambda p: len(p[2]) + len(p[3]), reverse=True)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                width = max(len(p) + len(o) for _, _, p, o in chunk)
                input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros_like(input_ids)
                labels = torch.full_like(input_ids, IGNORE)
                for row, (_, _, p, o) in enumerate(chunk):
                    input_ids[row, : len(p) + len(o)] = torch.tensor(p + o)
                    attention_mask[row, : len(p) + len(o)] = 1
                    labels[row, len(p) : len(p) + len(o)] = torch.tensor(o)
                losses = _token_losses(model, input_ids.to(device), attention_mask.to(device), labels.to(device))
                means = losses.sum(1) / (labels[:, 1:] != IGNORE).sum(1).to(device)  # (B,)
                for (i, j, _, _), m in zip(chunk, means.tolist()):
                    result[i][j] = m
    finally:
        model.train(was_training)
    return result


def choose(losses: Sequence[float]) -> int:
    """Index of the lowest loss (the first one on ties)."""
    return min(range(len(losses)), key=lambda j: (losses[j], j))
