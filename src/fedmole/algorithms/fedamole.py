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
   Reply: the trained view; the tokens each held expert served (int32, one per
   held expert in ascending pool order); and, under RSEA only, `<module>.client_emb`
   (r,) and `<module>.expert_emb.<j>` (r,) in `Reply.extra`. With `dp_eta` > 0 each uploaded
   vector gets the official code's noise (`rsea.privatize`: per coordinate
   Gamma(r, rate eta) x U[-1, 1]) and is scaled down to the largest norm of any one
   aux batch's mean of that vector. (The official code means the same bound but
   compares the first batch's mean with later batches' token *sums*, so there it
   rarely binds; here it is the per-batch mean throughout.)
3. server: each domain expert = unweighted mean over its holders this round
   (kept where nobody held it); shared expert and W_t = mean over all replies;
   e_j = mean over holders; then the next round's assignment X (N, C) per module.

The assignment and the expert counts are two independent choices (the paper's
ablations): `assignment` = rsea (RSEA, algorithms/rsea.py, from the embeddings),
static (a random feasible X once, kept) or random (a new random X each round);
static and random skip the embedding pass and upload no embeddings.
`expert_counts` = data (each client holds L..M experts per module, as the
assignment gives) or uniform (exactly N*K/C each; the official `homo_arch`).

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

ASSIGNMENTS = ("rsea", "static", "random")
EXPERT_COUNTS = ("data", "uniform")


@dataclass
class FedAMoLEOptions:
    """Options of FedAMoLE (`[fedamole]` table)."""

    pool_size: int = opt(30, "domain experts per module on the server (N)", range=(1, 1024))
    experts_per_expert: int = opt(2, "clients each domain expert is assigned to per round (K)", range=(1, None))
    min_experts: int = opt(2, "fewest domain experts a client holds per module (L; expert_counts = data)",
                           range=(1, None))
    max_experts: int = opt(8, "most domain experts a client holds per module (M; expert_counts = data)",
                           range=(1, None))
    top_k: int = opt(2, "domain experts each token activates (fewer if a client holds fewer)", range=(1, None))
    shared_expert: bool = opt(True, "add the always-on shared expert (weight 1)")
    assignment: str = opt("rsea", "who holds which experts: rsea (experts choose clients by the uploaded embeddings, "
                          "each round) | static (random once, kept) | random (random each round); static and random "
                          "compute and upload no embeddings", choices=ASSIGNMENTS)
    expert_counts: str = opt("data", "experts per client and module: data (any number in L..M, as the assignment "
                             "gives) | uniform (exactly N*K/C for every client)", choices=EXPERT_COUNTS)
    dp_eta: float = opt(0.0, "privacy budget eta of the noise on uploaded embeddings: per coordinate Gamma(r, rate "
                        "eta) x U[-1,1], larger = less noise (the paper tries 1/50/100); 0 = off", range=(0.0, None))

    def bounds(self, num_clients: int) -> tuple[int, int, int]:
        """(K, L, M) in force for C clients: `uniform` pins L = M = N*K/C (rounded down; `check` refuses a remainder)."""
        K = self.experts_per_expert
        if self.expert_counts == "uniform":
            return K, self.pool_size * K // num_clients, self.pool_size * K // num_clients
        return K, self.min_experts, self.max_experts

    def check(self, cfg) -> None:
        """Cross-section rule for config validation: the assignment must be feasible for data.num_clients."""
        N, C = self.pool_size, cfg.data.num_clients
        K, L, M = self.bounds(C)
        if self.expert_counts == "uniform" and N * K % C:
            near = sorted((n for n in range(1, N + C + 1) if n * K % C == 0), key=lambda n: (abs(n - N), n))
            raise ConfigError(
                f"fedamole.expert_counts = 'uniform' gives every client N*K/C experts per module, but N*K = "
                f"{N}*{K} = {N * K} is not divisible by data.num_clients C={C}; e.g. set fedamole.pool_size to "
                f"{' or '.join(map(str, sorted(near[:2])))}"
            )
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
    # no single global model: the pool's experts form a model only in some client's subset,
    # and the paper evaluates each client's own model after its local training
    protocols = ("personalized",)
    tiered = False  # clients differ in data, not compute: fed.tiers does not apply
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
        if reply.extra and self.options.assignment != "rsea":
            return f"embeddings uploaded, but fedamole.assignment = {self.options.assignment!r} uses none"
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
            counts, seen = reply.expert_counts[m], reply.tokens[m]
            if counts.dtype != torch.int32 or tuple(counts.shape) != (len(js),):
                return (f"{m}: expert counts must be int32 of shape ({len(js)},), one per held expert; got "
                        f"{counts.dtype} {tuple(counts.shape)}")
            if (counts < 0).any():
                return f"{m}: negative expert counts {counts.tolist()}"
            if seen != int(seen):
                return f"{m}: token count {seen!r} is not a whole number"
            # each token goes to exactly k held experts, each expert at most once
            why = check_counts({m: counts}, {m: seen}, {m: len(js)}, min(self.options.top_k, len(js)))
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
        loss = rt.trainer.train(adapter, rt.batches, k=self.options.top_k, store={}, rnd=instruction.round)  # fresh optimizer
        trained = adapter.held_state()
        self.keep_personal(rt, trained)
        pool_counts, tokens = adapter.counts()  # (N,) float64 per module: compact them to the held experts
        held = adapter.held()
        counts = {m: c[held[m]].round().to(torch.int32) for m, c in pool_counts.items()}
        extra, bounds = self.embed(rt) if self.options.assignment == "rsea" else ({}, {})  # only RSEA uses them
        if extra and self.options.dp_eta > 0:
            rng = np.random.default_rng([self.seed, instruction.round, rt.client_id])
            extra = {k: privatize(v, self.options.dp_eta, rng, bounds[k]) for k, v in sorted(extra.items())}
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
    def embed(self, rt: ClientRuntime) -> tuple[State, dict[str, torch.Tensor]]:
        """No-grad pass over the aux split only: `<m>.client_emb` (r,) and `<m>.expert_emb.<j>` (r,)
        per module and held expert j (empty when the client has no aux examples), and per key
        the largest norm of one aux batch's mean (the DP clip bound)."""
        if not rt.aux_batches:
            return {}, {}
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
        bounds: dict[str, torch.Tensor] = {}
        for m, means in adapter.embeddings().items():
            out[client_emb_key(m)] = means.query
            bounds[client_emb_key(m)] = means.query_bound
            for row, j in enumerate(held[m]):
                out[expert_emb_key(m, j)] = means.keys[row].clone()
                bounds[expert_emb_key(m, j)] = means.key_bounds[row]
        return out, bounds

    def expert_usage(self, reply: Reply) -> dict[str, dict[str, float]]:
        """Per module: the fraction of this client's routed tokens each held pool expert served."""
        held = held_experts(reply.state)
        return {m: {str(j): float(n) / max(float(c.sum()), 1.0) for j, n in zip(held[m], c.tolist())}
                for m, c in reply.expert_counts.items()}

    def global_view(self, rt: ClientRuntime, global_state: State, tier: int) -> State:
        """Before a client has trained: the global experts of its current assignment."""
        return held_view(global_state, self.held_by(rt.client_id))

    def load_view(self, rt: ClientRuntime, state: State, tier: int | None = None) -> int:
        rt.adapter.load_held_state(state)
        return self.options.top_k
