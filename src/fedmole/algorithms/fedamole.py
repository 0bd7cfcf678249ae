"""FedAMoLE: federated fine-tuning with heterogeneous, data-driven mixtures of LoRA experts.

"Personalized Federated Fine-Tuning for LLMs via Data-Driven Heterogeneous
Model Architectures", arXiv:2411.19128, 2024.

Each module has a server pool of N domain experts, a shared expert and a token
projection W_t (adapters/amole.py). Every round:

1. configure: client c receives only its held view: the experts X[:, c] of every
   module, the shared expert and W_t (keys `<module>.lora_A.<j>`, `<module>.lora_B.<j>`,
   `<module>.token_proj`, `<module>.shared_A`, `<module>.shared_B`).
2. client: trains that view (top-k over held experts, renormalised), keeps the
   result as its personal model, then runs no-grad over its aux split only:
   t_c = token mean of W_t x, e_{c,j} = token mean of A_j x (held j), per module.
   Reply: the trained view, plus `<module>.client_emb` (r,) and
   `<module>.expert_emb.<j>` (r,) in `Reply.extra` (optionally DP-noised).
3. server: each domain expert = unweighted mean over its holders this round
   (kept where nobody held it); shared expert and W_t = mean over all replies;
   e_j = mean over holders; then RSEA (algorithms/rsea.py) per module gives the
   next round's assignment X (N, C).

Choices made here *(inferred)*: routing keys use the clean input while expert
outputs see dropout; each round starts a fresh optimizer (a client's experts change
between rounds); a client that never replied, or an expert nobody held yet, scores
0 in RSEA until it has an embedding. Evaluation is personalised: each client's
own model after its latest local training, or, before any, the global experts of
its current assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmole.adapters.amole import (
    EXPERT_TENSORS,
    AMoLEAdapter,
    AMoLEConfig,
    expert_key,
    held_experts,
    held_view,
    inject_amole,
    parse_key,
)
from fedmole.algorithms.base import ClientRuntime, Method
from fedmole.algorithms.rsea import check_feasible, privatize, random_assignment, rsea_assign
from fedmole.algorithms.validate import check_counts, check_reply
from fedmole.config import ConfigError, opt
from fedmole.messages import Instruction, Reply, State
from fedmole.training import autocast_context

ASSIGNMENTS = ("rsea", "static", "random", "uniform")


@dataclass
class FedAMoLEOptions:
    """Options of FedAMoLE (`[fedamole]` table)."""

    pool_size: int = opt(30, "domain experts per module on the server (N)", range=(1, 1024))
    experts_per_expert: int = opt(2, "clients each domain expert is assigned to per round (K)", range=(1, None))
    min_experts: int = opt(2, "fewest domain experts a client holds per module (L)", range=(1, None))
    max_experts: int = opt(8, "most domain experts a client holds per module (M)", range=(1, None))
    top_k: int = opt(2, "domain experts each token activates (fewer if a client holds fewer)", range=(1, None))
    shared_expert: bool = opt(True, "add the always-on shared expert (weight 1)")
    assignment: str = opt("rsea", "rsea | static (random once) | random (each round) | "
                          "uniform (RSEA, every client holds N*K/C experts)", choices=ASSIGNMENTS)
    dp_eta: float = opt(0.0, "scale of the Gamma noise on uploaded embeddings (0 = off)", range=(0.0, None))

    def bounds(self, num_clients: int) -> tuple[int, int, int]:
        """(K, L, M) in force for C clients: `uniform` pins L and M to floor/ceil(N*K/C)."""
        K = self.experts_per_expert
        if self.assignment == "uniform":
            total = self.pool_size * K
            return K, total // num_clients, -(-total // num_clients)
        return K, self.min_experts, self.max_experts

    def check(self, cfg) -> None:
        """Cross-section rule for config validation: the assignment must be feasible for data.num_clients."""
        N, C = self.pool_size, cfg.data.num_clients
        K, L, M = self.bounds(C)
        try:
            check_feasible(N, C, K, L, M)
        except ValueError as e:
            hints = []
            if N * K > C * M:
                hints.append(f"fedamole.pool_size <= {C * M // K}")
                hints.append(f"fedamole.max_experts >= {-(-N * K // C)}")
            if N * K < C * L:
                hints.append(f"fedamole.pool_size >= {-(-C * L // K)}")
                hints.append(f"fedamole.min_experts <= {N * K // C}")
            if K > C:
                hints.append(f"fedamole.experts_per_expert <= {C}")
            advice = f"; e.g. set {' or '.join(hints)}" if hints else ""
            raise ConfigError(
                f"fedamole with pool_size N={N}, experts_per_expert K={K}, min/max_experts L={L}/M={M} "
                f"and data.num_clients C={C}: {e}{advice}"
            ) from None


# -- pure aggregation ------------------------------------------------------------------


def mean_rows(views: Sequence[Mapping[str, torch.Tensor]], row_key: Callable[[int], str],
              previous: torch.Tensor) -> torch.Tensor:
    """Row j = unweighted mean of view[row_key(j)] over the views holding it, else previous[j]."""
    out = previous.to(torch.float64).clone()  # (N, ...)
    for j in range(previous.shape[0]):
        rows = [v[row_key(j)] for v in views if row_key(j) in v]
        if rows:
            out[j] = torch.stack([x.to(torch.float64) for x in rows]).mean(0)
    return out.to(previous.dtype)


def aggregate_fedamole(views: Sequence[Mapping[str, torch.Tensor]], previous: State) -> State:
    """New pool state from the clients' trained held views (pure; `previous` untouched).

    Domain experts: mean over the views holding them; other tensors (W_t, shared
    expert): mean over the views carrying them; previous value where none does.
    """
    new: State = {}
    for key, prev in previous.items():
        module, name, _ = parse_key(key)
        if name in EXPERT_TENSORS:
            new[key] = mean_rows(views, lambda j: expert_key(module, name, j), prev)
        else:
            vals = [v[key].to(torch.float64) for v in views if key in v]
            new[key] = torch.stack(vals).mean(0).to(prev.dtype) if vals else prev.clone()
    return new


def client_emb_key(module: str) -> str:
    return f"{module}.client_emb"


def expert_emb_key(module: str, expert: int) -> str:
    return f"{module}.expert_emb.{expert}"


def aggregate_expert_embeddings(extras: Sequence[Mapping[str, torch.Tensor]],
                                previous: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module, e_j (N, r) = mean of the holders' e_{c,j}; previous row where no one reported it."""
    return {m: mean_rows(extras, lambda j, m=m: expert_emb_key(m, j), prev) for m, prev in previous.items()}


# -- the method --------------------------------------------------------------------------


class FedAMoLE(Method):
    """FedAMoLE (arXiv:2411.19128, 2024): per-client subsets of a pool of LoRA experts,
    key-based routing, RSEA expert-to-client assignment, personalised evaluation."""

    name = "fedamole"
    personalized = True
    Options = FedAMoLEOptions
    # num_experts only bounds fed.tiers, which a shared config may set for the other methods
    ADAPTER_OPTIONS = {"dense": frozenset({"num_experts", "rank", "alpha", "dropout", "targets", "aux_loss_weight"}),
                       "moe": frozenset({"rank", "alpha", "dropout", "targets", "aux_loss_weight"})}

    @classmethod
    def ignored_reason(cls, key: str, moe: bool) -> str:
        return "FedAMoLE's experts, router and shared expert are set in [fedamole] (pool_size, top_k, shared_expert)"
    cross_tier_eval = False  # every client routes top_k of its own experts, whatever its tier
    keep_optimizer_refused = ("a client holds other pool experts from round to round (the assignment changes), "
                              "so its held slots' moments would describe other experts")

    @classmethod
    def build_adapter(cls, model: torch.nn.Module, adapter_cfg, seed: int, tiers: list[int],
                      options: FedAMoLEOptions | None = None) -> AMoLEAdapter:
        """Inject AMoLE layers: rank/alpha/dropout/targets from [adapter], pool and shared expert from options."""
        o = options if options is not None else cls.Options()
        return inject_amole(model, AMoLEConfig(
            pool_size=o.pool_size, rank=adapter_cfg.rank, alpha=adapter_cfg.alpha, dropout=adapter_cfg.dropout,
            targets=list(adapter_cfg.targets), shared_expert=o.shared_expert, top_k=o.top_k, init_seed=seed,
        ))

    def __init__(self, options: FedAMoLEOptions, adapter: AMoLEAdapter, tiers: list[int], seed: int):
        super().__init__(options, adapter, tiers, seed)
        if not isinstance(adapter, AMoLEAdapter):
            raise TypeError(f"fedamole needs an AMoLE adapter (FedAMoLE.build_adapter), got {type(adapter).__name__}")
        if adapter.pool_size != options.pool_size:
            raise ValueError(f"adapter pool has {adapter.pool_size} experts but fedamole.pool_size = "
                             f"{options.pool_size}: build the adapter with the method options")
        self.N, self.C = options.pool_size, len(tiers)
        self.K, self.L, self.M = options.bounds(self.C)
        check_feasible(self.N, self.C, self.K, self.L, self.M)
        self.rank = {m: layer.rank for m, layer in adapter.layers.items()}
        # cross-round server state
        self.assignment = self._random(rnd=0)  # module -> X (N, C) bool
        self.expert_emb = {m: torch.zeros(self.N, r) for m, r in self.rank.items()}  # module -> (N, r)
        self.client_emb = {m: torch.zeros(self.C, r) for m, r in self.rank.items()}  # module -> (C, r)

    def _random(self, rnd: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, rnd])
        return {m: random_assignment(self.N, self.C, self.K, self.L, self.M, rng) for m in self.rank}

    def held_by(self, client_id: int) -> dict[str, torch.Tensor]:
        """Module -> pool indices client `client_id` holds under the current assignment."""
        return {m: x[:, client_id].nonzero().flatten() for m, x in self.assignment.items()}

    # -- server side ---------------------------------------------------------
    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        return [Instruction(rnd, c, held_view(global_state, self.held_by(c)), self.tiers[c]) for c in client_ids]

    def check(self, reply: Reply, instruction: Instruction) -> str | None:
        if reply.tier != instruction.tier:
            return f"tier {reply.tier} differs from the {instruction.tier} it was given"
        why = check_reply(reply, {k: tuple(v.shape) for k, v in instruction.state.items()}, allow_extra=True)
        if why:
            return why
        held = held_experts(instruction.state)
        if reply.extra:
            expected = {client_emb_key(m): (self.rank[m],) for m in held}
            expected.update({expert_emb_key(m, j): (self.rank[m],) for m, js in held.items() for j in js})
            if set(reply.extra) != set(expected):
                missing, extra = sorted(set(expected) - set(reply.extra)), sorted(set(reply.extra) - set(expected))
                return f"wrong embedding keys: missing {missing[:3]}, unexpected {extra[:3]}"
            for key, t in reply.extra.items():
                if tuple(t.shape) != expected[key] or not t.is_floating_point() or not torch.isfinite(t).all():
                    return f"{key}: bad embedding (shape {tuple(t.shape)}, expected {expected[key]}, finite floats)"
        if set(reply.expert_counts) != set(held) or set(reply.tokens) != set(held):
            return f"expert counts / token totals for modules {sorted(reply.expert_counts)[:3]} / " \
                   f"{sorted(reply.tokens)[:3]}, expected {sorted(held)[:3]}"
        for m, js in held.items():
            counts = reply.expert_counts[m]
            unheld = torch.ones(self.N, dtype=torch.bool)
            unheld[js] = False
            if tuple(counts.shape) == (self.N,) and (counts[unheld] != 0).any():
                return f"{m}: tokens routed to experts it does not hold"
            why = check_counts({m: counts}, {m: reply.tokens[m]}, {m: self.N}, min(self.options.top_k, len(js)))
            if why:
                return why
        return None

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        new = aggregate_fedamole([r.state for r in replies], previous)
        with_emb = [r for r in replies if r.extra]
        self.expert_emb = aggregate_expert_embeddings([r.extra for r in with_emb], self.expert_emb)
        for r in with_emb:
            for m in self.client_emb:
                self.client_emb[m][r.client_id] = r.extra[client_emb_key(m)].to(self.client_emb[m].dtype)
        self.assignment = self.next_assignment(rnd)
        return new

    def next_assignment(self, rnd: int) -> dict[str, torch.Tensor]:
        """The assignment for round rnd + 1."""
        mode = self.options.assignment
        if mode == "static":
            return self.assignment
        if mode == "random":
            return self._random(rnd)
        return {m: rsea_assign(self.expert_emb[m], self.client_emb[m], self.K, self.L, self.M, self.rank[m])
                for m in self.assignment}

    def state_dict(self) -> dict:
        return {
            "assignment": {m: x.clone() for m, x in self.assignment.items()},
            "expert_emb": {m: e.clone() for m, e in self.expert_emb.items()},
            "client_emb": {m: t.clone() for m, t in self.client_emb.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("assignment", "expert_emb", "client_emb"):
            current = getattr(self, name)
            given = state[name]
            if set(given) != set(current) or any(given[m].shape != current[m].shape for m in current):
                raise ValueError(f"fedamole server state {name!r} does not match this adapter's modules and sizes")
            setattr(self, name, {m: given[m].clone() for m in current})

    # -- client side ---------------------------------------------------------
    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        adapter: AMoLEAdapter = rt.adapter
        adapter.load_held_state(instruction.state)
        adapter.reset_counts()
        loss = rt.trainer.train(adapter, rt.batches, k=self.options.top_k, store={})  # fresh optimizer
        trained = adapter.held_state()
        rt.store["personal"] = trained
        counts, tokens = adapter.counts()
        extra = self.embed(rt)
        if extra and self.options.dp_eta > 0:
            rng = np.random.default_rng([self.seed, instruction.round, rt.client_id])
            extra = {k: privatize(v, self.options.dp_eta, rng) for k, v in sorted(extra.items())}
        return Reply(
            round=instruction.round,
            client_id=rt.client_id,
            state=trained,
            num_examples=len(rt.data.train),
            tier=instruction.tier,
            train_loss=loss,
            expert_counts=counts,
            tokens=tokens,
            extra=extra,
        )

    @torch.no_grad()
    def embed(self, rt: ClientRuntime) -> State:
        """No-grad pass over the aux split only: `<m>.client_emb` (r,) and `<m>.expert_emb.<j>` (r,)
        per module and held expert j (empty when the client has no aux examples)."""
        if not rt.aux_batches:
            return {}
        adapter: AMoLEAdapter = rt.adapter
        device = rt.trainer.device
        adapter.model.eval()
        with adapter.embedding_pass():
            for batch in rt.aux_batches:
                mask = batch["attention_mask"].to(device)
                with adapter.route(self.options.top_k, token_mask=mask):
                    with autocast_context(device, rt.trainer.autocast_dtype):
                        adapter.model(input_ids=batch["input_ids"].to(device), attention_mask=mask, use_cache=False)
        held = adapter.held()
        out: State = {}
        for m, (t, e) in adapter.embeddings().items():
            out[client_emb_key(m)] = t
            out.update({expert_emb_key(m, j): e[row].clone() for row, j in enumerate(held[m])})
        return out

    def eval_view(self, rt: ClientRuntime, global_state: State, tier: int | None = None) -> int:
        """Personalised: the client's own model after its latest local training; before any,
        the global experts of its current assignment."""
        personal = rt.store.get("personal")
        if personal is None:
            personal = held_view(global_state, self.held_by(rt.client_id))
        rt.adapter.load_held_state(personal)
        return self.options.top_k
