"""Centralised training: every client's training data pooled, the upper reference (spec 2.3).

One LoRA at the full rank r_max = adapter.rank * max(tiers), free of the
clients' compute limits, is trained on the union of the clients' training
sets (shuffled together, batches mix clients) with the same number of
optimizer steps per round as all selected clients together take in the
federated methods: train.local_steps * (clients selected). It is evaluated
at full rank on every client's test split; both protocols evaluate that one
pooled model (the data centre's model after its training is the global state).

The pooled data (and its optimizer moments, with train.optimizer_state = keep)
live with the method (the "data centre"), so the engine must hand it every
client's runtime once (`attach_clients`); each round one instruction, addressed
to the first selected client, carries the model in and out, so the round loop
is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from fedmole.algorithms.aggregate import State
from fedmole.algorithms.base import ClientRuntime
from fedmole.algorithms.lora_common import LoRAMethod
from fedmole.config import ConfigError
from fedmole.data.tokenize import TrainBatches
from fedmole.messages import Instruction, Reply

POOL_SEED = 999_983  # offsets the pooled shuffle's seed from every client's


@dataclass
class CentralizedOptions:
    """Options of centralised training (`[centralized]` table); it has none beyond [adapter] and [train]."""

    def check(self, cfg) -> None:
        """Its one client step trains the server's pooled data and optimizer, which an update abandoned
        past a deadline would keep writing (engine/deadline.py)."""
        if cfg.fed.client_timeout > 0:
            raise ConfigError(f"fed.client_timeout = {cfg.fed.client_timeout} does not apply to centralized; "
                              "allowed: 0")


class Centralized(LoRAMethod):
    """Centralised training (all data pooled; upper reference): one full-rank LoRA, the federated
    step budget, evaluated on every client's test split."""

    name = "centralized"
    Options = CentralizedOptions
    cross_tier_eval = False  # one full-rank model, the same at every tier

    def __init__(self, options, adapter, tiers, seed):
        adapter.fix_rank(adapter.max_rank)
        super().__init__(options, adapter, tiers, seed)
        self.pool: TrainBatches | None = None
        self.center: dict = {}  # the data centre's optimizer state

    def attach_clients(self, runtimes: Iterable[ClientRuntime]) -> None:
        """Pool every client's encoded training examples, in client order (called once by the
        engine's setup)."""
        items, first = [], None
        for rt in runtimes:
            items += rt.batches.items
            first = first or rt.batches
        self.pool = TrainBatches(items, batch_size=first.batch_size, seed=self.seed * 1000 + POOL_SEED,
                                 pad_id=first.pad_id)

    def known_examples(self, train_sizes: dict[int, int]) -> dict[int, int]:
        total = sum(train_sizes.values())  # the data centre trains on every client's data
        return {c: total for c in train_sizes}

    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        c = client_ids[0]
        return [Instruction(rnd, c, dict(global_state), self.tiers[c], config={"clients": len(client_ids)})]

    def expected_reply(self, client_id: int) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        if self.pool is None:
            raise RuntimeError("centralized needs every client's data: the engine must call attach_clients")
        rt.adapter.load_state_dict(instruction.state)
        trainer = dataclasses.replace(rt.trainer, steps=rt.trainer.steps * instruction.config["clients"])
        loss = trainer.train(rt.adapter, self.pool, k=instruction.tier, store=self.center, rnd=instruction.round)
        # no personal state: the model is the data centre's, and aggregation adopts it as it is
        return Reply(instruction.round, rt.client_id, rt.adapter.state_dict(), len(self.pool.items),
                     instruction.tier, loss)

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        if not replies:
            return {k: v.clone() for k, v in previous.items()}
        (reply,) = replies
        return {k: v.clone() for k, v in reply.state.items()}

    def state_dict(self) -> dict:
        return {"center": dict(self.center), "pool": self.pool.state_dict() if self.pool else {}}

    def load_state_dict(self, state: dict) -> None:
        self.center = dict(state["center"])
        if self.pool is not None and state["pool"]:
            self.pool.load_state_dict(state["pool"])
