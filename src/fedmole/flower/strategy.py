"""The Flower side of a fedmole round: which node is which client, and the per-node messages.

`FedmoleStrategy` turns the Instructions a fedmole `Method` made for this round
into one Flower message per node (each node gets its own payload: its tier,
its subset of experts), and the nodes' reply messages back into `Reply`s, with
Flower error replies, missing and malformed replies turned into rejection
reasons. It holds cross-round state only (the client -> node map, the payload
dtype, the resolved config the nodes build their clients from); the round loop,
reply checks (`Method.check`) and aggregation (`Method.aggregate`) stay in
`fedmole.engine.local.LocalEngine.run`, which `FlowerEngine` reuses unchanged.

It does not subclass `flwr.serverapp.strategy.Strategy`: that class's `start`
loop broadcasts one ArrayRecord to sampled nodes and aggregates inside the
strategy, while fedmole's loop (retries, `fed.min_clients`, checkpoints, the
run directory) is written once, in the local engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmole.flower import serde
from fedmole.messages import Instruction, Reply, State

log = logging.getLogger("fedmole")


def discover_nodes(grid: Grid, num_clients: int, wait_s: float = 120.0) -> dict[int, tuple[int, int | None]]:
    """Client id -> (node id, tier the node declares or None), for `num_clients` clients.

    Waits up to `wait_s` for enough nodes, then asks every node for its node config.
    Nodes that declare `partition-id` (the Simulation Engine sets it; SuperNodes take
    it from `--node-config`) serve that client; if none declares one, clients are
    the sorted node ids in order.
    """
    deadline = time.monotonic() + wait_s
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of the {num_clients} nodes (data.num_clients) connected "
                               f"within {wait_s:.0f} s")
        time.sleep(0.2)
    query = [Message(RecordDict({"fedmole": ConfigRecord({"ask": "node-config"})}), dst_node_id=n,
                     message_type=MessageType.QUERY) for n in node_ids]
    declared: dict[int, tuple[int, int]] = {}  # node -> (partition id, tier), -1 / 0 when not given
    for reply in grid.send_and_receive(query, timeout=wait_s):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}")
        node = reply.content["node"]
        declared[reply.metadata.src_node_id] = (int(node["partition-id"]), int(node["tier"]))
    if len(declared) < len(node_ids):
        raise RuntimeError(f"{len(node_ids) - len(declared)} node(s) did not answer the node-config query")

    with_ids = {n: p for n, (p, _) in declared.items() if p >= 0}
    if not with_ids:
        chosen = {c: n for c, n in enumerate(node_ids[:num_clients])}
    else:
        if len(with_ids) < len(declared):
            raise RuntimeError("either every node or none declares a partition-id; these do not: "
                               f"{sorted(set(declared) - set(with_ids))}")
        by_client: dict[int, list[int]] = {}
        for n, p in with_ids.items():
            by_client.setdefault(p, []).append(n)
        twice = {p: ns for p, ns in by_client.items() if len(ns) > 1}
        missing = sorted(set(range(num_clients)) - set(by_client))
        if twice or missing:
            raise RuntimeError(f"partition-ids must cover 0..{num_clients - 1} once each; "
                               f"missing {missing}, declared by several nodes {twice}")
        unused = sorted(p for p in by_client if p >= num_clients)
        if unused:
            log.warning("nodes with partition-id %s are not used (data.num_clients = %d)", unused, num_clients)
        chosen = {p: by_client[p][0] for p in range(num_clients)}
    return {c: (n, declared[n][1] if declared[n][1] > 0 else None) for c, n in chosen.items()}


class FedmoleStrategy:
    """Per-node fedmole messages over a Flower Grid (see the module docstring)."""

    def __init__(self, nodes: dict[int, int], config_text: str, payload_dtype: str = "float32",
                 round_timeout: float | None = None):
        serde.wire_dtype(payload_dtype)  # fail early on an unknown dtype
        self.nodes = dict(nodes)  # client id -> node id
        self.clients = {n: c for c, n in nodes.items()}
        self.config_text = config_text
        self.payload_dtype = payload_dtype
        self.round_timeout = round_timeout or None  # 0 = wait for every reply

    # -- train ----------------------------------------------------------------------
    def configure_train(self, instructions: Iterable[Instruction]) -> list[Message]:
        """One TRAIN message per instruction, to the node serving that client."""
        return [
            Message(serde.instruction_content(i, self.payload_dtype, self.config_text),
                    dst_node_id=self.nodes[i.client_id], message_type=MessageType.TRAIN, group_id=str(i.round))
            for i in instructions
        ]

    def receive_train(self, expected: list[int], replies: Iterable[Message]) -> tuple[list[Reply], dict[int, str]]:
        """Replies in the order of `expected` client ids, and why the others are missing."""
        got, failures = self._sort(expected, replies)
        out = []
        for c, msg in got.items():
            try:
                reply = serde.read_reply(msg.content)
            except (serde.RecordError, KeyError, ValueError, TypeError) as e:
                failures[c] = f"malformed reply: {e}"
                continue
            if reply.client_id != c:
                failures[c] = f"reply from the node of client {c} claims client {reply.client_id}"
                continue
            out.append(reply)
        return out, failures

    def train(self, grid: Grid, instructions: list[Instruction]) -> tuple[list[Reply], dict[int, str]]:
        replies = grid.send_and_receive(self.configure_train(instructions), timeout=self.round_timeout)
        return self.receive_train([i.client_id for i in instructions], replies)

    # -- evaluate -------------------------------------------------------------------
    def configure_evaluate(self, rnd: int, global_state: State, client_ids: Iterable[int]) -> list[Message]:
        """One EVALUATE message per client with the global state; `Method.eval_view` on the
        node picks the weights it is evaluated with (personal ones for FedAMoLE)."""
        return [
            Message(serde.evaluate_content(serde.EvaluateRequest(rnd, c, global_state), self.payload_dtype,
                                           self.config_text),
                    dst_node_id=self.nodes[c], message_type=MessageType.EVALUATE, group_id=str(rnd))
            for c in client_ids
        ]

    def evaluate(self, grid: Grid, rnd: int, global_state: State,
                 client_ids: list[int]) -> tuple[dict[str, dict], dict[int, str]]:
        """Per-client metrics keyed by client name, in client id order, and the failures."""
        replies = grid.send_and_receive(self.configure_evaluate(rnd, global_state, client_ids),
                                        timeout=self.round_timeout)
        got, failures = self._sort(client_ids, replies)
        per_client = {}
        for c, msg in got.items():
            try:
                name, result = serde.read_result(msg.content)
            except (serde.RecordError, KeyError, ValueError, TypeError) as e:
                failures[c] = f"malformed evaluation: {e}"
                continue
            per_client[name] = result
        return per_client, failures

    # -- replies ----------------------------------------------------------------------
    def _sort(self, expected: list[int], replies: Iterable[Message]) -> tuple[dict[int, Message], dict[int, str]]:
        """Good reply messages by client id (in `expected` order) and the reasons for the rest."""
        by_client: dict[int, Message] = {}
        failures: dict[int, str] = {}
        for msg in replies:
            c = self.clients.get(msg.metadata.src_node_id)
            if c is None or c not in expected:
                log.warning("ignoring a reply from node %d, which was not asked", msg.metadata.src_node_id)
                continue
            if msg.has_error():
                failures[c] = msg.error.reason or f"node error (code {msg.error.code})"
            else:
                by_client[c] = msg
        for c in expected:
            if c not in by_client and c not in failures:
                failures[c] = f"no reply within {self.round_timeout} s"
        return {c: by_client[c] for c in expected if c in by_client}, failures
