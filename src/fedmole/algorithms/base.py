"""The contract between a federated method and the engine that runs it.

A method decides what each client receives (`configure`), what a client does
with it (`client_update`, run wherever the client lives), and how replies
become the next global state (`aggregate`, a pure function of the replies and
the previous state). Engines only move `Instruction`s and `Reply`s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedmole.adapters.inject import MoLEAdapter
from fedmole.data.types import ClientData
from fedmole.messages import Instruction, Reply, State
from fedmole.training import LocalTrainer


@dataclass
class ClientRuntime:
    """Everything one client's step needs; built and owned by the engine."""

    client_id: int
    tier: int
    data: ClientData
    batches: object  # fedmole.data.tokenize.TrainBatches (None when opened for evaluation only)
    adapter: MoLEAdapter
    trainer: LocalTrainer
    aux_batches: list = field(default_factory=list)  # padded batches of the aux split (no-grad passes)
    store: dict = field(default_factory=dict)  # state kept between rounds, at rest (engine/client_state.py)


class Method:
    """Base class: FedAvg-style plumbing shared by the methods."""

    name: ClassVar[str] = ""
    Options: ClassVar[type]
    # [adapter] options the method's adapter reads, on a dense and on a sparse MoE base model
    ADAPTER_OPTIONS: ClassVar[dict[str, frozenset[str]]] = {
        "dense": frozenset({"num_experts", "rank", "alpha", "dropout", "targets", "router", "renormalize", "rescale",
                            "shared_expert", "aux_loss_weight"}),
        "moe": frozenset({"rank", "alpha", "dropout", "rescale", "train_router", "aux_loss_weight"}),
    }

    @classmethod
    def adapter_options(cls, moe: bool) -> frozenset[str]:
        return cls.ADAPTER_OPTIONS["moe" if moe else "dense"]

    @classmethod
    def ignored_reason(cls, key: str, moe: bool) -> str:
        """Why this method ignores adapter option `key` (for the config error)."""
        if moe and key in ("num_experts", "targets", "router", "renormalize", "shared_expert"):
            return ("LoRA goes on the base model's own experts, and their number, router, gate normalisation "
                    "and shared expert come from the model")
        if key == "train_router":
            return "only a sparse MoE base has a router to train"
        return "this method's adapter has no such part"

    # the evaluation protocols (eval.protocol) this method can report; the first is its default
    protocols: ClassVar[tuple[str, ...]] = ("global", "personalized")
    # whether clients differ by tier (k experts per token, or rank); False: no per-tier results
    tiered: ClassVar[bool] = True
    # Whether the global model a client is evaluated with can run at another tier's k (eval.tiers = all);
    # False for models of one size and for models that ignore the tier. A personalised evaluation
    # scores each client's own model at its own tier only.
    cross_tier_eval: ClassVar[bool] = True
    # its aggregation is built from the averaging helpers of algorithms/aggregate.py, so
    # `fed.robust = "trimmed_mean"` applies (they get `trim`, set by the engine's setup)
    robust_averaging: ClassVar[bool] = False
    trim: float = 0.0
    # why train.optimizer_state = "keep" does not apply to this method ("": it does)
    keep_optimizer_refused: ClassVar[str] = ""

    @classmethod
    def build_adapter(
        cls, model: torch.nn.Module, adapter_cfg, seed: int, tiers: list[int], options=None
    ) -> MoLEAdapter:
        """Inject this method's adapter into the frozen base model: LoRA on the base
        model's own experts for an MoE base (spec 1.2), else MoLE (spec 1.1)."""
        from fedmole.adapters.inject import inject_mole
        from fedmole.adapters.moe_lora import inject_moe_lora, is_moe_model

        if is_moe_model(model):
            return inject_moe_lora(model, adapter_cfg.mole(seed), k_max=max(tiers))
        return inject_mole(model, adapter_cfg.mole(seed), k_max=max(tiers))

    def __init__(self, options, adapter: MoLEAdapter, tiers: list[int], seed: int):
        self.protocol = self.protocols[0]  # set_protocol(eval protocol) before a run
        self.options = options
        self.tiers = tiers  # tier of each client id
        self.seed = seed
        self.shapes = adapter.shapes()
        self.num_experts = {name: layer.num_experts for name, layer in adapter.layers.items()}

    def set_protocol(self, protocol: str) -> None:
        """Evaluate `global` (the aggregated model) or `personalized` (each client's own model)."""
        if protocol not in self.protocols:
            raise ValueError(f"{self.name} reports the {' or '.join(self.protocols)} protocol, not {protocol!r}")
        self.protocol = protocol

    # -- server side ---------------------------------------------------------
    def initial_state(self, adapter: MoLEAdapter) -> State:
        return adapter.state_dict()

    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        return [Instruction(rnd, c, global_state, self.tiers[c]) for c in client_ids]

    def check(self, reply: Reply, instruction: Instruction) -> str | None:
        """Why this well-typed reply (`validate.check_types`) must be rejected, or None."""
        from fedmole.algorithms.validate import check_reply

        if reply.tier != instruction.tier:
            return f"tier {reply.tier} differs from the {instruction.tier} it was given"
        return check_reply(reply, self.shapes, num_experts=self.num_experts)

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        raise NotImplementedError

    def round_metrics(self) -> dict:
        """Method-specific figures of the last aggregation for the round's metrics row (JSON values)."""
        return {}

    def known_examples(self, train_sizes: dict[int, int]) -> dict[int, int]:
        """The example count each client's reply may claim, from the clients' training-set sizes."""
        return dict(train_sizes)

    def attach_clients(self, runtimes: Iterable[ClientRuntime]) -> None:
        """Called once with every client's runtime in client order, each built as the iteration
        reaches it (only the centralised reference consumes them)."""

    def final_state(self, global_state: State) -> State:
        """The tensors that make up the trained model (saved as adapter.safetensors and hashed)."""
        return global_state

    def load_final_state(self, saved: State) -> State:
        """The inverse of `final_state` for a saved run: restore what it added, return the global state."""
        return dict(saved)

    def state_dict(self) -> dict:
        """Cross-round server state (for checkpoints)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # -- client side ---------------------------------------------------------
    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        """Default client step: start from the sent state, train with top-k = tier, report counts."""
        rt.adapter.load_state_dict(instruction.state)
        rt.adapter.reset_counts()
        loss = rt.trainer.train(rt.adapter, rt.batches, k=instruction.tier, store=rt.store, rnd=instruction.round)
        counts, tokens = rt.adapter.counts()
        state = rt.adapter.state_dict()
        self.keep_personal(rt, state)
        return Reply(
            round=instruction.round,
            client_id=rt.client_id,
            state=state,
            num_examples=len(rt.data.train),
            tier=instruction.tier,
            train_loss=loss,
            expert_counts=counts,
            tokens=tokens,
        )

    def expert_usage(self, reply: Reply) -> list[float] | dict | None:
        """What summary.json reports of a client's routing (`expert_usage`): the fraction of its routed
        tokens per expert, averaged over modules (expert j is slot j of every module); None without counts."""
        if not reply.expert_counts:
            return None
        fracs = [c.to(torch.float64) / c.sum().clamp_min(1) for c in reply.expert_counts.values()]
        return torch.stack(fracs).mean(0).tolist()

    # -- evaluation ------------------------------------------------------------
    # Global protocol: every client is evaluated with its view of the global state.
    # Personalised protocol: with its model after its latest local training (the
    # '-FT' protocol), kept as one state in its store (`rt.store["personal"]`);
    # a client that has not trained yet is evaluated with its global view.
    def keep_personal(self, rt: ClientRuntime, state: State) -> None:
        """Under the personalised protocol, keep `state` (this client's trained model) for evaluation."""
        if self.protocol == "personalized":
            rt.store["personal"] = state

    def global_view(self, rt: ClientRuntime, global_state: State, tier: int) -> State:
        """The tensors client `rt` is evaluated with at `tier` under the global protocol."""
        return global_state

    def evaluated_state(self, rt: ClientRuntime, global_state: State, tier: int | None = None) -> State:
        """The tensors client `rt` is evaluated with at `tier` (default: its own) under this method's
        protocol (what a personalised run saves per client)."""
        personal = rt.store.get("personal") if self.protocol == "personalized" else None
        if personal is not None:
            return personal
        return self.global_view(rt, global_state, rt.tier if tier is None else tier)

    def load_view(self, rt: ClientRuntime, state: State, tier: int | None = None) -> int:
        """Load an evaluated state (`evaluated_state`) into the adapter; return the k to route with
        (`tier`, default: the client's own)."""
        rt.adapter.load_state_dict(state)
        return rt.tier if tier is None else tier

    def eval_view(self, rt: ClientRuntime, global_state: State, tier: int | None = None) -> int:
        """Load the weights this client is evaluated with at `tier` (default: its own); return the k
        to route with. `global_state` is what `final_state` makes of the global state. Under the global
        protocol the weights may depend only on `global_state` and the tier, not on the client: the
        engine scores many clients with one view."""
        return self.load_view(rt, self.evaluated_state(rt, global_state, tier), tier)

    def eval_tiers(self, rt: ClientRuntime, tiers: list[int]) -> list[int]:
        """The tiers at which this client is scored when every tier is evaluated (eval.tiers = all):
        all of `tiers` for a global model that can run at any k (`cross_tier_eval`), else its own."""
        return list(tiers) if self.cross_tier_eval and self.protocol == "global" else [rt.tier]


def timed_update(method: Method, rt: ClientRuntime, instruction: Instruction) -> Reply:
    """`method.client_update` with the client's mean optimizer-step seconds and its step count
    in `reply.metrics` ("step_seconds", "steps"), as its trainer measured them."""
    rt.trainer.step_seconds.clear()
    reply = method.client_update(rt, instruction)
    times = rt.trainer.step_seconds
    if times:
        reply.metrics["step_seconds"] = sum(times) / len(times)
        reply.metrics["steps"] = len(times)
    return reply


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """Independent, order-free seed for one client's round (dropout, etc.)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(
        (seed * 1_000_003 + rnd) * 1_000_003 + client_id)).item())
