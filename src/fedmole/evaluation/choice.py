"""Multiple choice by language-model loss: the option whose tokens the model finds
most likely after the prompt.

Each option is scored as it would be trained: its tokens followed by EOS, after
the same prompt encoding (and chat template) that generation uses. The score is
the mean next-token cross-entropy over those tokens; the lowest wins (ties go
to the earlier option).

The prompt is computed once for all its options: a batch of left-padded
prompts runs with a KV cache, the cache is repeated for each option, and only
the option tokens run again. Only the option positions go through the
vocabulary head. An example with o options thus costs one prompt pass plus o
short continuations instead of o full sequences.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE = -100


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits (float32) of hidden states (n, H), with the head's own soft-capping or scale."""
    cfg = model.config
    logits = model.get_output_embeddings()(hidden).float()
    if getattr(cfg, "logit_scale", None):
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _check(prompts, options, batch_size) -> None:
    if len(prompts) != len(options):
        raise ValueError(f"got {len(prompts)} prompts but {len(options)} option lists; they must pair up")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (prompt, opts) in enumerate(zip(prompts, options)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty; the first option token needs a context to be predicted from")
        if not opts or any(len(o) == 0 for o in opts):
            raise ValueError(f"example {i}: options must be a non-empty list of non-empty token-id lists")


@torch.no_grad()
def _score_batch(model: torch.nn.Module, prompts: list[list[int]], options: list[list[list[int]]], pad_id: int,
                 device: torch.device) -> list[list[float]]:
    """Mean option losses of one batch of examples (prompt pass with a cache, then the options)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every prompt ends in the last column
        ids[row, P - len(p):] = torch.tensor(p)
        mask[row, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens at 0..len-1, as without padding
    out = model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    last = out.last_hidden_state[:, -1]  # (B, H): predicts each option's first token
    cache = out.past_key_values

    owner = [i for i, opts in enumerate(options) for _ in opts]  # row -> example
    opts = [o for group in options for o in group]
    R, W = len(opts), max(len(o) for o in opts)
    cont = torch.full((R, W), pad_id, dtype=torch.long)
    cont_mask = torch.zeros((R, W), dtype=torch.long)
    for row, o in enumerate(opts):
        cont[row, : len(o)] = torch.tensor(o)
        cont_mask[row, : len(o)] = 1
    index = torch.tensor(owner, device=device)
    cache.reorder_cache(index)  # (R, ...): each example's prompt cache once per option
    full_mask = torch.cat([mask[index], cont_mask.to(device)], dim=1)
    cont_pos = positions[index, -1:] + 1 + torch.arange(W, device=device)
    hidden = model.base_model(input_ids=cont.to(device), attention_mask=full_mask, position_ids=cont_pos,
                              past_key_values=cache, use_cache=False).last_hidden_state  # (R, W, H)
    # token t of an option is predicted from the position before it: the prompt's last one for t = 0
    states = torch.cat([last[index].unsqueeze(1), hidden[:, :-1]], dim=1)  # (R, W, H)
    keep = cont_mask.bool().to(device)
    losses = torch.zeros((R, W), dtype=torch.float32, device=device)
    losses[keep] = F.cross_entropy(_logits(model, states[keep]), cont.to(device)[keep], reduction="none")
    means = (losses.sum(1) / keep.sum(1)).tolist()
    result = [[0.0] * len(group) for group in options]
    row = 0
    for i, group in enumerate(options):
        for j in range(len(group)):
            result[i][j] = means[row]
            row += 1
    return result


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
    lists (include EOS in them if it should count). A batch holds `batch_size` prompts
    (and all of their options).
    """
    _check(prompts, options, batch_size)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)  # similar lengths together
    result: list[list[float]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, autocast_dtype):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                scored = _score_batch(model, [list(prompts[i]) for i in chunk],
                                      [[list(o) for o in options[i]] for i in chunk], pad_id, device)
                for i, losses in zip(chunk, scored):
                    result[i] = losses
    finally:
        model.train(was_training)
    return result


def choose(losses: Sequence[float]) -> int:
    """Index of the lowest loss (the first one on ties)."""
    return min(range(len(losses)), key=lambda j: (losses[j], j))
