"""HetLoRA: heterogeneous LoRA ranks, zero-padded and norm-weighted aggregation.

Cho, Liu, Manoel, Joshi, Ruan, Wang, Joshi. "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024 (arXiv:2401.06432).

The server holds rank r_max; a client of rank r_i gets A[:r_i], B[:, :r_i].
The server zero-pads every reply back to r_max and averages per module with
weights w_i = ||B_i A_i||_F (larger updates count more), normalised over all
replying clients, so rows only high-rank clients train are averaged with the
low-rank clients' zeros, as in the paper. If every weight of a module is zero
(no client moved B), the module falls back to FedAvg by |D_i|. On a sparse MoE
base every expert's LoRA is its own module: its weights are the per-expert
norms ||B_ie A_ie||_F. The paper's optional rank self-pruning is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmole.adapters.lora import lora_pairs, pad_lora, pair_keys
from fedmole.algorithms.aggregate import State, per_row_average, weighted_average
from fedmole.algorithms.lora_common import LoRAMethod
from fedmole.messages import Reply


@dataclass
class HetLoRAOptions:
    """Options of HetLoRA (`[hetlora]` table); it has none beyond [adapter] and [fed]."""


def product_norm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||B A||_F without forming the (d_out, d_in) product: sqrt(sum((B^T B) * (A A^T))), float64.

    A: (..., r, d_in), B: (..., d_out, r); returns a tensor of the leading shape (a scalar for one pair).
    """
    a, b = A.to(torch.float64), B.to(torch.float64)
    gram = (b.transpose(-2, -1) @ b) * (a @ a.transpose(-2, -1))  # (..., r, r)
    return gram.sum((-2, -1)).clamp_min(0.0).sqrt()


def aggregate_hetlora(states: Sequence[State], sizes: Sequence[int], max_rank: int, trim: float = 0.0) -> State:
    """New rank-`max_rank` global state from rank-r_i client states (pure).

    Per LoRA pair: A = sum_i w_i pad(A_i) / sum_i w_i, B likewise, w_i = ||B_i A_i||_F
    (per expert for stacked MoE pairs; weighted trimmed means with trim > 0).
    """
    padded = [pad_lora(s, max_rank) for s in states]
    pairs = [lora_pairs(s) for s in states]
    new: State = {}
    for pid, keys in pair_keys(states[0]).items():
        w = torch.stack([product_norm(*p[pid]) for p in pairs])  # (C,) or (C, E)
        fallback = torch.as_tensor([float(n) for n in sizes], dtype=torch.float64)
        if w.dim() == 1:
            weights = (w if w.sum() > 0 else fallback).tolist()
            for key in keys:
                new[key] = weighted_average([p[key] for p in padded], weights, trim)
        else:  # one LoRA per expert: an expert nobody moved falls back to FedAvg by size
            w = torch.where(w.sum(0, keepdim=True) > 0, w, fallback[:, None])
            for key in keys:
                new[key] = per_row_average([p[key] for p in padded], w, padded[0][key], trim)
    return new


class HetLoRA(LoRAMethod):
    """HetLoRA (Cho et al., EMNLP 2024, arXiv:2401.06432): rank r_i = adapter.rank * tier per
    client, truncated views down, zero-padding and ||B_i A_i||_F-weighted averaging up."""

    name = "hetlora"
    Options = HetLoRAOptions
    robust_averaging = True

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        if not replies:
            return {k: v.clone() for k, v in previous.items()}
        return aggregate_hetlora([r.state for r in replies], [r.num_examples for r in replies], self.max_rank,
                                 self.trim)
