"""FedIT: federated instruction tuning with one LoRA, FedAvg of A and B by data size.

Zhang, Vahidian, Kuo, Li, Ruan, Xu, Wang, Chen. "Towards Building the
Federated GPT: Federated Instruction Tuning", ICASSP 2024 (arXiv:2305.05644).

Every client runs the same rank, so the rank must fit the weakest client: by
default the rank of the lowest tier in use, adapter.rank * min(tiers)
(`fedit.tier` picks another tier's rank, e.g. the largest for an "if everyone
could afford it" variant).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedmole.adapters.lora import LoRAAdapter
from fedmole.algorithms.aggregate import State, fedavg
from fedmole.algorithms.lora_common import LoRAMethod
from fedmole.config import ConfigError, opt
from fedmole.messages import Reply


@dataclass
class FedITOptions:
    """Options of FedIT (`[fedit]` table)."""

    tier: int = opt(0, "every client runs rank adapter.rank * tier; 0 = the lowest tier in fed.tiers "
                       "(the rank every client can afford)", range=(0, None))

    def check(self, cfg) -> None:
        """Cross-section rule: the tier's rank must fit in the allocated rank adapter.rank * max(fed.tiers)."""
        if self.tier > max(cfg.fed.tiers):
            raise ConfigError(f"fedit.tier = {self.tier} exceeds the largest tier in fed.tiers "
                              f"({max(cfg.fed.tiers)}); allowed: 0..{max(cfg.fed.tiers)}")


def aggregate_fedit(states: Sequence[State], sizes: Sequence[int], trim: float = 0.0) -> State:
    """FedAvg of every LoRA tensor, weighted by the clients' training-set sizes |D_i|
    (a weighted trimmed mean with trim > 0)."""
    return fedavg(states, sizes, trim=trim)


class FedIT(LoRAMethod):
    """FedIT (Zhang et al., ICASSP 2024, arXiv:2305.05644): one LoRA of a single rank for every
    client, FedAvg of A and B by data size."""

    name = "fedit"
    Options = FedITOptions
    robust_averaging = True

    def __init__(self, options: FedITOptions, adapter: LoRAAdapter, tiers: list[int], seed: int):
        tier = options.tier or min(tiers)
        if tier > max(tiers):
            raise ValueError(f"fedit.tier = {tier} exceeds the largest tier {max(tiers)}")
        adapter.fix_rank(adapter.rank_of(tier))
        super().__init__(options, adapter, tiers, seed)
        self.server_rank = adapter.fixed_rank

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        if not replies:
            return {k: v.clone() for k, v in previous.items()}
        return aggregate_fedit([r.state for r in replies], [r.num_examples for r in replies], self.trim)
