"""Local-only training: the no-federation lower reference (spec 2.3).

Each client trains a plain LoRA of its tier's rank (adapter.rank * k) on its
own data, keeps it across rounds (and its optimizer moments with
train.optimizer_state = keep) and is evaluated with it: its only protocol is
the personalised one. Nothing is uploaded. The server sends each client the
common initial adapter once (the starting point every method shares) and
otherwise nothing; the global state stays that initial adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmole.algorithms.aggregate import State
from fedmole.algorithms.base import ClientRuntime
from fedmole.algorithms.lora_common import LoRAMethod
from fedmole.messages import Instruction, Reply


@dataclass
class LocalOptions:
    """Options of local-only training (`[local]` table); it has none beyond [adapter] and [fed]."""


class LocalOnly(LoRAMethod):
    """Local-only training (no federation; lower reference): each client trains and keeps its own
    rank-(adapter.rank * tier) LoRA."""

    name = "local"
    protocols = ("personalized",)  # the global state is only the common initial adapter
    Options = LocalOptions
    cross_tier_eval = False  # a personal adapter of the client's own rank

    def __init__(self, options, adapter, tiers, seed):
        super().__init__(options, adapter, tiers, seed)
        self.started = [False] * len(tiers)  # whether a client has replied once (so it holds its adapter)

    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        return [Instruction(rnd, c, {} if self.started[c] else self.client_view(global_state, c), self.tiers[c])
                for c in client_ids]

    def expected_reply(self, client_id: int) -> dict[str, tuple[int, ...]]:
        return {}  # nothing leaves the client

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        for r in replies:
            self.started[r.client_id] = True
        return {k: v.clone() for k, v in previous.items()}

    def state_dict(self) -> dict:
        return {"started": list(self.started)}

    def load_state_dict(self, state: dict) -> None:
        self.started = [bool(s) for s in state["started"]]

    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        start = rt.store.get("personal") or instruction.state
        if not start:
            raise RuntimeError(f"client {rt.client_id} holds no adapter and was sent none")
        state, loss = self.train_view(rt, start, instruction.tier, instruction.round)
        rt.store["personal"] = state
        return Reply(instruction.round, rt.client_id, {}, len(rt.data.train), instruction.tier, loss)

