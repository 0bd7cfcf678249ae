"""HetLoRA: heterogeneous LoRA ranks, zero-padded and norm-weighted aggregation.

Cho, Liu, Manoel, Joshi, Ruan, Wang, Joshi. "Heterogeneous LoRA for Federated
Fine-tuning of On-Device Foundation Models", EMNLP 2024 (arXiv:2401.06432).

The server holds rank r_max; a client of rank r_i gets A[:r_i], B[:, :r_i].
The server zero-pads every reply back to r_max and averages per module with
weights w_i = ||B_i A_i||_F (larger updates count more), normalised over all
replying clients, so rows only high-rank clients train are averaged with the
low-rank clients' zeros, as in the paper. If every weight of a module is zero
(no client moved B), the module falls back to FedAvg by |D_i|. The paper's
optional rank self-pruning is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmole.adapters.lora import lora_pairs, pad_lora
from fedmole.algorithms.aggregate import State, weighted_average
from fedmole.algorithms.lora_common import LoRAMethod
from fedmole.messages import Reply


@dataclass
class HetLoRAOptions:
    """Options of HetLoRA (`[hetlora]` table); it has none beyond [adapter] and [fed]."""


def product_norm(A: torch.Tensor, B: torch.Tensor) -> float:
    """||B A||_F without forming the (d_out, d_in) product: sqrt(sum((B^T B) * (A A^T))).

    A: (r, d_in), B: (d_out, r).
    """
    a, b = A.to(torch.float64), B.to(torch.float64)
    return float(((b.t() @ b) * (a @ a.t())).sum().clamp_min(0.0).sqrt())


def aggregate_hetlora(states: Sequence[State], sizes: Sequence[int], max_rank: int, trim: float = 0.0) -> State:
    """New rank-`max_rank` global state from rank-r_i client states (pure).

    Per module m: A = sum_i w_i pad(A_i) / sum_i w_i, B likewise, w_i = ||B_i A_i||_F
    (weighted trimmed means with trim > 0).
    """
    padded = [pad_lora(s, max_rank) for s in states]
    pairs = [lora_pairs(s) for s in states]
    new: State = {}
    for module in pairs[0]:
        w = [product_norm(*p[module]) for p in pairs]
        if sum(w) <= 0:
            w = [float(n) for n in sizes]
        for name in ("lora_A", "lora_B"):
            key = f"{module}.{name}"
            new[key] = weighted_average([p[key] for p in padded], w, trim)
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
