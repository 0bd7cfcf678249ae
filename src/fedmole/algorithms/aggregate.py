"""Averaging helpers shared by the aggregation rules (pure functions over tensors)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmole.algorithms.robust import weighted_trimmed_mean

State = dict[str, torch.Tensor]


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float], trim: float = 0.0) -> torch.Tensor:
    """sum_i w_i x_i / sum_i w_i, accumulated in float64 and returned in the inputs' dtype.

    trim > 0: the coordinate-wise weighted trimmed mean instead (`robust.weighted_trimmed_mean`).
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor and at least one tensor (got {len(tensors)}, {len(weights)})")
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    total = w.sum()
    if total <= 0:
        raise ValueError(f"weights must sum to a positive value, got {w.tolist()}")
    stacked = torch.stack([t.to(torch.float64) for t in tensors])  # (C, ...)
    if trim > 0:
        return weighted_trimmed_mean(stacked, w, trim).to(tensors[0].dtype)
    out = torch.tensordot(w / total, stacked, dims=1)
    return out.to(tensors[0].dtype)


def fedavg(states: Sequence[State], weights: Sequence[float], keys: Sequence[str] | None = None,
           trim: float = 0.0) -> State:
    """Weighted FedAvg of the given keys (all keys of the first state by default)."""
    keys = list(states[0]) if keys is None else list(keys)
    return {k: weighted_average([s[k] for s in states], weights, trim) for k in keys}


def per_row_average(
    rows: Sequence[torch.Tensor], weights: torch.Tensor, previous: torch.Tensor, trim: float = 0.0
) -> torch.Tensor:
    """Average along dim 0 with a separate weight per (client, row).

    rows: C tensors of shape (E, ...); weights: (C, E). Row j of the result is
    sum_i w[i, j] x_i[j] / sum_i w[i, j], or previous[j] where sum_i w[i, j] = 0;
    with trim > 0, row j is the weighted trimmed mean of the x_i[j] by w[i, j].
    """
    stacked = torch.stack([r.to(torch.float64) for r in rows])  # (C, E, ...)
    w = weights.to(torch.float64)  # (C, E)
    w_b = w.reshape(*w.shape, *([1] * (stacked.dim() - 2)))  # (C, E, 1, ...)
    den = w.sum(0)  # (E,)
    den_b = den.reshape(-1, *([1] * (stacked.dim() - 2)))
    if trim > 0:
        safe = torch.where(den.reshape(1, -1) > 0, w, torch.ones_like(w))  # rows nobody used: any weights
        mixed = weighted_trimmed_mean(stacked, safe.reshape(w_b.shape), trim)
    else:
        mixed = (stacked * w_b).sum(0) / den_b.clamp_min(1e-300)  # (E, ...)
    out = torch.where(den_b > 0, mixed, previous.to(torch.float64))
    return out.to(previous.dtype)
