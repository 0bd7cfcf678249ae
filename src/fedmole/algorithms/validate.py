"""Reply checks run before any aggregation: a bad reply is rejected with a reason.

`check_types` makes sure every field of a `Reply` has the type the server
reads it as (so later checks and the aggregation cannot raise on it);
`check_reply` checks the contents against what the method expects (key sets,
shapes, dtypes, finite values, expert token counts).
"""

from __future__ import annotations

import math

import torch

from fedmole.messages import Reply

MAX_EXAMPLES = 10**9  # larger example counts are implausible for one client
COUNT_SLACK = 0.5  # counts and token totals are whole numbers carried as floats


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _tensor_dict(name: str, value) -> str | None:
    if not isinstance(value, dict):
        return f"{name} is a {type(value).__name__}, not a dict of tensors"
    for key, t in value.items():
        if not isinstance(key, str):
            return f"{name} has a non-string key {key!r}"
        if not isinstance(t, torch.Tensor):
            return f"{name}[{key!r}] is a {type(t).__name__}, not a tensor"
    return None


def _number_dict(name: str, value) -> str | None:
    if not isinstance(value, dict):
        return f"{name} is a {type(value).__name__}, not a dict of numbers"
    for key, x in value.items():
        if not isinstance(key, str):
            return f"{name} has a non-string key {key!r}"
        if not is_number(x):
            return f"{name}[{key!r}] = {x!r} is not a finite number"
    return None


def check_types(reply: object) -> str | None:
    """Why `reply` is not a well-typed Reply, or None.

    round, client_id, tier, num_examples: int; train_loss: finite number; state,
    extra, expert_counts: dicts of str -> tensor; tokens, metrics: dicts of str ->
    finite number (metrics["seconds"], when present, >= 0).
    """
    if not isinstance(reply, Reply):
        return f"not a Reply but a {type(reply).__name__}"
    for name in ("round", "client_id", "tier", "num_examples"):
        value = getattr(reply, name)
        if not is_int(value):
            return f"{name} = {value!r} is not an integer"
    if not is_number(reply.train_loss):
        return f"train loss {reply.train_loss!r} is not a finite number"
    for name in ("state", "extra", "expert_counts"):
        why = _tensor_dict(name, getattr(reply, name))
        if why:
            return why
    for name in ("tokens", "metrics"):
        why = _number_dict(name, getattr(reply, name))
        if why:
            return why
    if reply.metrics.get("seconds", 0) < 0:
        return f"metrics['seconds'] = {reply.metrics['seconds']!r} is negative"
    return None


def check_counts(counts: dict[str, torch.Tensor], tokens: dict[str, float], num_experts: dict[str, int],
                 k: int) -> str | None:
    """Expert token counts (a reply's `expert_counts` and `tokens`): one (E,) tensor per module in
    `num_experts` (no more, no fewer), each entry in [0, tokens], summing to tokens * k; a token
    total per counted module."""
    if set(counts) != set(num_experts):
        missing, extra = sorted(set(num_experts) - set(counts)), sorted(set(counts) - set(num_experts))
        return f"expert counts for the wrong modules: missing {missing[:3]}, unexpected {extra[:3]}"
    if set(tokens) != set(counts):
        return f"token totals for {sorted(tokens)[:3]} do not match the counted modules {sorted(counts)[:3]}"
    for module, c in counts.items():
        seen = tokens[module]
        if tuple(c.shape) != (num_experts[module],) or c.is_complex() or c.dtype == torch.bool:
            return f"{module}: expert counts of shape {tuple(c.shape)} and dtype {c.dtype}, " \
                   f"expected ({num_experts[module]},) numbers"
        c = c.to(torch.float64)
        if not torch.isfinite(c).all() or (c < 0).any():
            return f"{module}: expert counts must be finite and >= 0"
        if seen < 0:
            return f"{module}: {seen} tokens seen"
        if (c > seen + COUNT_SLACK).any():  # an expert serves each token at most once
            return f"{module}: an expert count of {float(c.max()):.0f} exceeds the {seen:.0f} tokens seen"
        if abs(float(c.sum()) - seen * k) > COUNT_SLACK:
            return f"{module}: expert counts sum to {float(c.sum()):.0f}, expected tokens*k = {seen * k:.0f}"
    return None


def check_reply(
    reply: Reply,
    expected_shapes: dict[str, tuple[int, ...]],
    *,
    exact_keys: bool = True,
    num_experts: dict[str, int] | None = None,
    allow_extra: bool = False,
) -> str | None:
    """Return why a well-typed `reply` (see `check_types`) must be rejected, or None.

    expected_shapes: key -> shape the server expects for every key it may receive.
    exact_keys: the reply must carry exactly those keys (otherwise a subset).
    num_experts: module -> E, to check the expert token counts (`check_counts` with k = tier);
        {} = the method expects no counts; None = the caller checks them itself.
    allow_extra: the method reads `reply.extra` (and checks it itself); otherwise it must be empty.
    """
    keys = set(reply.state)
    expected = set(expected_shapes)
    if exact_keys and keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        return f"wrong key set: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    if not exact_keys and not keys <= expected:
        return f"unexpected keys {sorted(keys - expected)[:3]}"
    for key, tensor in reply.state.items():
        if tuple(tensor.shape) != tuple(expected_shapes[key]):
            return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected_shapes[key])}"
        if not tensor.is_floating_point():
            return f"{key}: dtype {tensor.dtype} is not floating point"
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    if not 0 < reply.num_examples <= MAX_EXAMPLES:
        return f"implausible example count {reply.num_examples!r}"
    if not allow_extra and reply.extra:
        return f"unexpected extra tensors {sorted(reply.extra)[:3]}"
    if num_experts is not None:
        return check_counts(reply.expert_counts, reply.tokens, num_experts, reply.tier)
    return None
