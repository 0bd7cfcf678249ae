"""FLAME: federated fine-tuning through an adaptive sparse mixture of LoRA experts.

Le, Tran, Hua, Chawla. "FLAME: Towards Federated Fine-Tuning Large Language
Models Through Adaptive SMoE", arXiv:2506.16600, 2025.

The server keeps every expert at full rank; a client of tier k activates the
top-k experts per token, trains with a per-tier rescaler, and reports how many
tokens each expert served. Expert tensors are aggregated activation-aware:

    f_i^{m,j} = a_i^{m,j} / T_i^m,   gamma_i^{m,j} = (f_i^{m,j})^t * |D_i|
    theta^{m,j} = sum_i gamma_i^{m,j} theta_i^{m,j} / sum_i gamma_i^{m,j}

(previous value kept where no client used expert j). Router and shared
tensors are FedAvg by |D_i|; rescaler entry k-1 is FedAvg over tier-k clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedmole.adapters.inject import split_key
from fedmole.config import opt
from fedmole.algorithms.aggregate import State, per_row_average, weighted_average
from fedmole.algorithms.base import Method
from fedmole.messages import Reply

@dataclass
class FlameOptions:
    """Options of the FLAME aggregation (`[flame]` table)."""

    t: float = opt(2.0, "activation exponent of the expert weights (0 = data-size FedAvg)", range=(0.0, 16.0))


def activation_weights(
    counts: Sequence[torch.Tensor], tokens: Sequence[float], sizes: Sequence[int], t: float
) -> torch.Tensor:
    """gamma (C, E) for one module: (a_ij / T_i)^t * |D_i|; f = 0 when a client saw no tokens."""
    rows = []
    for a, seen, n in zip(counts, tokens, sizes):
        f = a.to(torch.float64) / seen if seen > 0 else torch.zeros_like(a, dtype=torch.float64)
        rows.append(f.pow(t) * float(n))
    return torch.stack(rows)


def tier_weight_shares(replies: Sequence[Reply], t: float) -> dict[str, float]:
    """Each tier's share of the expert aggregation weight: sum over its clients of gamma_i^{m,j} over
    sum_i gamma_i^{m,j}, averaged over the (module, expert) pairs that some client used."""
    if not replies or not replies[0].expert_counts:
        return {}
    sizes = [r.num_examples for r in replies]
    tiers = torch.tensor([r.tier for r in replies])
    shares = {int(k): [] for k in tiers.unique()}
    for module in replies[0].expert_counts:
        gamma = activation_weights([r.expert_counts[module] for r in replies],
                                   [r.tokens[module] for r in replies], sizes, t)  # (C, E)
        total = gamma.sum(0)
        used = total > 0
        for k in shares:
            shares[k].append((gamma[tiers == k].sum(0)[used] / total[used]))
    return {str(k): float(torch.cat(v).mean()) for k, v in sorted(shares.items(), reverse=True) if v}


def aggregate_flame(replies: Sequence[Reply], previous: State, t: float, trim: float = 0.0) -> State:
    """New global adapter state from the accepted replies (pure; `previous` untouched).

    trim > 0 replaces each weighted average by a weighted trimmed mean (`fed.robust`)."""
    if not replies:
        return {k: v.clone() for k, v in previous.items()}
    sizes = [r.num_examples for r in replies]
    gammas: dict[str, torch.Tensor] = {}
    new: State = {}
    for key, prev in previous.items():
        module, name = split_key(key)
        values = [r.state[key] for r in replies]
        if name.startswith("lora_"):  # stacked per-expert tensors: dim 0 indexes experts
            if module not in gammas:
                gammas[module] = activation_weights(
                    [r.expert_counts[module] for r in replies], [r.tokens[module] for r in replies], sizes, t
                )
            new[key] = per_row_average(values, gammas[module], prev, trim)
        elif name == "rescale":
            out = prev.clone()
            for k in sorted({r.tier for r in replies}):
                tier = [(r.state[key][k - 1], r.num_examples) for r in replies if r.tier == k]
                out[k - 1] = weighted_average([v for v, _ in tier], [n for _, n in tier], trim)
            new[key] = out
        else:  # router, shared expert, anything else: data-size FedAvg
            new[key] = weighted_average(values, sizes, trim)
    return new


class Flame(Method):
    """FLAME (Le et al., 2025, arXiv:2506.16600): full experts, per-tier top-k,
    learned rescaler, activation-aware aggregation."""

    name = "flame"
    Options = FlameOptions
    robust_averaging = True

    def __init__(self, options, adapter, tiers, seed):
        super().__init__(options, adapter, tiers, seed)
        self.shares: dict[str, float] = {}

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        self.shares = tier_weight_shares(replies, self.options.t)
        return aggregate_flame(replies, previous, self.options.t, self.trim)

    def round_metrics(self) -> dict:
        """Each tier's share of the expert aggregation weight in the last round (t = 2 favours the tiers
        that activate more experts: a tier-1 client can get a few % of an expert's weight)."""
        return {"expert_weight_share": dict(self.shares)} if self.shares else {}
