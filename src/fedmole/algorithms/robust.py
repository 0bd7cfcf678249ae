"""Robust aggregation helpers: pure functions over name -> tensor dicts (`fed.robust`).

An *update* is a client's returned state minus the state it was sent, over the keys
both hold; its length is the L2 norm over all those tensors together (float64, so a
1e30-scaled state still gives a finite length).

- `clip_update` / `clip_to_median`: norm clipping (Sun et al., "Can You Really Backdoor
  Federated Learning?", arXiv:1911.07963): updates longer than a bound are scaled down
  to it, keeping their direction; the method's own aggregation then runs unchanged.
- `weighted_trimmed_mean`: coordinate-wise trimmed mean (Yin et al., "Byzantine-Robust
  Distributed Learning", ICML 2018), generalised to weights: per coordinate, the values
  are sorted and `beta` of the total weight is cut from each end; the rest is averaged
  by weight. Equal weights and an integer beta*C give the classic trimmed mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]


def update_norms(states: Sequence[State], starts: Sequence[State]) -> list[float]:
    """||state_i - start_i|| over the keys both hold, one float per client."""
    out = []
    for state, start in zip(states, starts, strict=True):
        total = torch.zeros((), dtype=torch.float64)
        for key, t in state.items():
            if key in start and start[key].shape == t.shape:
                total += (t.to(torch.float64) - start[key].to(torch.float64)).pow(2).sum()
        out.append(float(total.sqrt()))
    return out


def leave_one_out_medians(norms: Sequence[float], fallback: float | None = None) -> list[float | None]:
    """For each i, the (lower) median of the other norms; `fallback` when there are none."""
    out: list[float | None] = []
    for i in range(len(norms)):
        others = sorted(n for j, n in enumerate(norms) if j != i)
        out.append(others[(len(others) - 1) // 2] if others else fallback)
    return out


def clip_update(state: State, start: State, max_norm: float) -> State:
    """`state` with its update scaled to length <= max_norm (keys without a same-shape start kept)."""
    (norm,) = update_norms([state], [start])
    if norm <= max_norm or norm == 0:
        return dict(state)
    scale = max_norm / norm
    out = {}
    for key, t in state.items():
        s = start.get(key)
        if s is not None and s.shape == t.shape:
            delta = t.to(torch.float64) - s.to(torch.float64)
            out[key] = (s.to(torch.float64) + scale * delta).to(t.dtype)
        else:
            out[key] = t
    return out


def clip_to_median(states: Sequence[State], starts: Sequence[State]) -> list[State]:
    """Every update clipped to the median update length of the round (`fed.robust = "clip"`)."""
    norms = update_norms(states, starts)
    if not norms:
        return []
    bound = sorted(norms)[(len(norms) - 1) // 2]
    return [clip_update(s, st, bound) for s, st in zip(states, starts)]


def weighted_trimmed_mean(values: torch.Tensor, weights: torch.Tensor, beta: float) -> torch.Tensor:
    """Coordinate-wise weighted trimmed mean over dim 0.

    values: (C, ...); weights: (C,) or broadcastable to values (e.g. (C, E, 1, 1) for
    per-row weights), >= 0 with a positive sum per coordinate; beta in [0, 0.5): the
    share of each coordinate's total weight cut from the low and from the high end.
    Returns (...) in float64.
    """
    if not 0 <= beta < 0.5:
        raise ValueError(f"trim fraction {beta} outside [0, 0.5)")
    v = values.to(torch.float64)
    w = weights.to(torch.float64)
    w = w.reshape(*w.shape, *([1] * (v.dim() - w.dim()))).expand_as(v)
    v_sorted, order = v.sort(dim=0)
    w_sorted = w.gather(0, order)
    hi_cum = w_sorted.cumsum(0)  # weight up to and including each sorted value
    lo_cum = hi_cum - w_sorted
    total = hi_cum[-1:]
    lo, hi = beta * total, (1 - beta) * total
    kept = (torch.minimum(hi_cum, hi) - torch.maximum(lo_cum, lo)).clamp_min(0)  # weight inside [lo, hi]
    return (kept * v_sorted).sum(0) / kept.sum(0)
