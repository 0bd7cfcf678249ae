"""Clients built when they are needed: a runtime exists only while its client trains or is evaluated.

Set-up only partitions and splits the data (lists of examples, cheap); nothing is
tokenised and no runtime is built for a client until the engine opens it (its
tokens are then kept for as many clients as a round samples, `Setup.encoded`):

    rt = pool.open(client_id)               # tokenised now; the state it kept at rest loaded
    ... train rt ...
    pool.keep(rt, rnd)                      # what it holds after round rnd, back to disk
    rt = pool.open(client_id, train=False)  # evaluation: its data and kept state, no batches

A runtime that is not kept (its update failed or timed out, or it was only evaluated)
is dropped with whatever it changed, as if it had not been selected. Memory thus
follows the clients open at once (one at a time on the local engine), whatever the
population.
"""

from __future__ import annotations

from fedmole.algorithms.base import ClientRuntime
from fedmole.engine.client_state import NodeClientState, RunClientStates


def clients_per_round(cfg) -> int:
    """Clients selected per round: fed.sample_fraction of data.num_clients, at least fed.min_clients."""
    n = cfg.data.num_clients
    return min(n, max(cfg.fed.min_clients, round(cfg.fed.sample_fraction * n)))


class ClientPool:
    """Open clients of `setup` (`Setup.runtime`) with the state `states` keeps for them at rest."""

    def __init__(self, setup, states: RunClientStates | NodeClientState):
        self.setup = setup
        self.states = states

    def open(self, client_id: int, train: bool = True) -> ClientRuntime:
        """Client `client_id`'s runtime with its kept store and (for training) batch position."""
        rt = self.setup.runtime(client_id, train=train)
        saved = self.states.load(client_id)
        if saved is not None:
            store, batches = saved
            rt.store.update(store)
            if train and batches is not None:
                rt.batches.load_state_dict(batches)
        return rt

    def keep(self, rt: ClientRuntime, rnd: int) -> None:
        """Write what `rt` holds after training in round `rnd` (its store and batch position)."""
        self.states.save(rt.client_id, rnd, rt.store, rt.batches.state_dict())
