"""Reply checks run before any aggregation: a bad reply is rejected with a reason."""

from __future__ import annotations

import math

import torch

from fedmole.messages import Reply

MAX_EXAMPLES = 10**9  # larger example counts are implausible for one client


def check_reply(
    reply: Reply,
    expected_shapes: dict[str, tuple[int, ...]],
    *,
    exact_keys: bool = True,
    num_experts: dict[str, int] | None = None,
) -> str | None:
    """Return why `reply` must be rejected, or None when it is acceptable.

    expected_shapes: key -> shape the server expects for every key it may receive.
    exact_keys: the reply must carry exactly those keys (otherwise a subset).
    num_experts: module -> E, to check the expert token counts.
    """
    keys = set(reply.state)
    expected = set(expected_shapes)
    if exact_keys and keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        return f"wrong key set: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
    if not exact_keys and not keys <= expected:
        return f"unexpected keys {sorted(keys - expected)[:3]}"
    for key, tensor in reply.state.items():
        if not isinstance(tensor, torch.Tensor):
            return f"{key}: not a tensor ({type(tensor).__name__})"
        if tuple(tensor.shape) != tuple(expected_shapes[key]):
            return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected_shapes[key])}"
        if not tensor.is_floating_point():
            return f"{key}: dtype {tensor.dtype} is not floating point"
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    if not isinstance(reply.num_examples, int) or not 0 < reply.num_examples <= MAX_EXAMPLES:
        return f"implausible example count {reply.num_examples!r}"
    if not math.isfinite(reply.train_loss):
        return f"non-finite train loss {reply.train_loss}"
    if num_experts is not None:
        for module, counts in reply.expert_counts.items():
            if module not in num_experts:
                return f"counts for unknown module {module!r}"
            if counts.shape != (num_experts[module],) or not torch.isfinite(counts).all() or (counts < 0).any():
                return f"{module}: bad expert counts {counts.tolist()}"
            seen = reply.tokens.get(module, -1.0)
            # each token is routed to exactly `tier` experts
            if abs(float(counts.sum()) - seen * reply.tier) > 0.5:
                return f"{module}: expert counts sum to {float(counts.sum()):.0f}, expected tokens*k = {seen * reply.tier:.0f}"
    return None
