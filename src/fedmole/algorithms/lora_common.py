"""Plumbing shared by the plain-LoRA methods (FedIT, HetLoRA, FlexLoRA, FLoRA and the references).

The adapter allocates the server rank r_max = adapter.rank * (largest tier);
a client of tier k runs rank r_k = adapter.rank * k, which activates as many
adapter parameters per token as k of E rank-r experts (spec 2.3). A client
receives and returns the rank-r_k view of the adapter (A[:r_k], B[:, :r_k]),
so both the communication and the reply checks depend on the client's rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmole.adapters.inject import split_key
from fedmole.adapters.lora import LoRAAdapter, LoRAConfig, inject_lora, is_lora_A, lora_pairs, truncate_lora
from fedmole.algorithms.base import ClientRuntime, Method
from fedmole.algorithms.validate import check_reply
from fedmole.messages import Instruction, Reply, State


class LoRAMethod(Method):
    """Base of the LoRA methods: rank-r_k views down and up, default FedAvg-style client step."""

    ADAPTER_OPTIONS = {"dense": frozenset({"num_experts", "rank", "alpha", "dropout", "targets"}), "moe": frozenset({"rank", "alpha", "dropout"})}

    @classmethod
    def ignored_reason(cls, key: str, moe: bool) -> str:
        if moe and key == "targets":
            return "on an MoE base the LoRA goes on the base model's experts"
        if moe and key == "num_experts":
            return "the experts come from the base model"
        return "a single LoRA has no router, experts beyond the base model's, shared expert or tier rescaler"

    @classmethod
    def build_adapter(
        cls, model: torch.nn.Module, adapter_cfg, seed: int, tiers: list[int], options=None
    ) -> LoRAAdapter:
        """Plain LoRA of rank adapter.rank * max(tiers); tier k runs rank adapter.rank * k. On a sparse
        MoE base: a LoRA on every expert, rank adapter.rank, every client running the model's full top-k
        with per-expert rank adapter.rank * k / top_k (`inject_moe_lora_ranked`)."""
        from fedmole.adapters.moe_lora import inject_moe_lora_ranked, is_moe_model

        if is_moe_model(model):
            return inject_moe_lora_ranked(model, adapter_cfg, seed, k_max=max(tiers))
        return inject_lora(model, LoRAConfig(
            rank=adapter_cfg.rank * max(tiers), rank_per_tier=adapter_cfg.rank, alpha=adapter_cfg.alpha,
            dropout=adapter_cfg.dropout, targets=list(adapter_cfg.targets), init_seed=seed,
        ))

    def __init__(self, options, adapter: LoRAAdapter, tiers: list[int], seed: int):
        # Method.__init__ reads expert counts per layer; a LoRA layer has none, so set the fields here
        if not isinstance(adapter, LoRAAdapter):
            raise TypeError(f"{self.name} needs a LoRA adapter ({type(self).__name__}.build_adapter), "
                            f"got {type(adapter).__name__}")
        self.options = options
        self.tiers = tiers
        self.seed = seed
        self.shapes = adapter.shapes()  # at the allocated rank r_max
        self.alpha = adapter.cfg.alpha
        self.max_rank = adapter.max_rank
        self.rank_of = adapter.rank_of  # tier -> LoRA rank
        self.ranks = [adapter.rank_of(t) for t in tiers]  # rank of each client id
        self.server_rank = self.max_rank  # rank of the global state

    # -- server side ---------------------------------------------------------
    def initial_state(self, adapter: LoRAAdapter) -> State:
        return truncate_lora(adapter.state_dict(), self.server_rank)

    def client_view(self, global_state: State, client_id: int) -> State:
        """The adapter client `client_id` starts from (and is evaluated with)."""
        return self.tier_view(global_state, self.tiers[client_id])

    def tier_view(self, global_state: State, tier: int) -> State:
        """The adapter a client of tier `tier` runs: the rank-r_k view of the global state."""
        return truncate_lora(global_state, self.rank_of(tier))

    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        return [Instruction(rnd, c, self.client_view(global_state, c), self.tiers[c]) for c in client_ids]

    def expected_reply(self, client_id: int) -> dict[str, tuple[int, ...]]:
        """Key -> shape of the reply of `client_id`: its rank-r view (rank: dim -2 of A, dim -1 of B)."""
        r = self.ranks[client_id]
        return {key: (*shape[:-2], r, shape[-1]) if is_lora_A(split_key(key)[1]) else (*shape[:-1], r)
                for key, shape in self.shapes.items()}

    def check(self, reply: Reply, instruction: Instruction) -> str | None:
        if reply.tier != instruction.tier:
            return f"tier {reply.tier} differs from the {instruction.tier} it was given"
        return check_reply(reply, self.expected_reply(instruction.client_id), num_experts={})

    # -- client side ---------------------------------------------------------
    def train_view(self, rt: ClientRuntime, start: State, tier: int, rnd: int,
                   store: dict | None = None) -> tuple[State, float]:
        """Load `start`, train round `rnd` at the tier's rank, return (trained rank-r view, mean loss)."""
        rt.adapter.load_state_dict(start)
        if store is None:
            store = rt.store
        loss = rt.trainer.train(rt.adapter, rt.batches, k=tier, store=store, rnd=rnd)
        return truncate_lora(rt.adapter.state_dict(), rt.adapter.rank_of(tier)), loss

    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        state, loss = self.train_view(rt, instruction.state, instruction.tier, instruction.round)
        self.keep_personal(rt, state)
        return Reply(instruction.round, rt.client_id, state, len(rt.data.train), instruction.tier, loss)

    def global_view(self, rt: ClientRuntime, global_state: State, tier: int) -> State:
        return self.tier_view(global_state, tier)


def stack_lora(
    states: Sequence[State], weights: Sequence[float], alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per LoRA pair, the stacked factors of sum_i p_i (alpha/r_i) B_i A_i with p_i = w_i / sum(w) (pure).

    Returns pair -> (A_s (..., R, d_in), B_s (..., d_out, R)) in float64, R = sum_i r_i, with
    A_s = [A_1; ...; A_n] and B_s = [p_1 (alpha/r_1) B_1, ..., p_n (alpha/r_n) B_n], so that
    B_s A_s is the weighted sum of the clients' effective updates exactly, whatever their ranks.
    Leading dims (experts of an MoE block) are carried through.
    """
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if len(states) != len(w) or not states or w.sum() <= 0:
        raise ValueError(f"need one positive-sum weight per state (got {len(states)} states, weights {w.tolist()})")
    p = w / w.sum()
    pairs = [lora_pairs(s) for s in states]
    out = {}
    for module in pairs[0]:
        As, Bs = [], []
        for p_i, pair in zip(p.tolist(), pairs):
            A, B = (t.to(torch.float64) for t in pair[module])
            As.append(A)
            Bs.append(B * (p_i * alpha / A.shape[-2]))
        out[module] = (torch.cat(As, -2), torch.cat(Bs, -1))
    return out
