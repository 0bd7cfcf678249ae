"""The Flower side of a fedmole round: which node is which client, and the per-node messages.

`FedmoleStrategy` turns the Instructions a fedmole `Method` made for this round
into one Flower message per node (each node gets its own payload: its tier,
its subset of experts), and matches the reply messages to the messages they
answer, with Flower error replies and missing replies turned into rejection
reasons. Decoding and checking a reply happen in `fedmole.engine.guard`, the
one trust boundary of every engine. The strategy holds cross-round state only
(the client -> node map, the payload dtype, the resolved config the nodes
build their clients from); the round loop, reply checks and aggregation stay
in `fedmole.engine.local.LocalEngine.run`, which `FlowerEngine` reuses unchanged.

It does not subclass `flwr.serverapp.strategy.Strategy`: that class's `start`
loop broadcasts one ArrayRecord to sampled nodes and aggregates inside the
strategy, while fedmole's loop (retries, `fed.min_clients`, checkpoints, the
run directory) is written once, in the local engine.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmole.algorithms.validate import MAX_EXAMPLES, is_int
from fedmole.engine.guard import ClientInfo
from fedmole.flower import serde
from fedmole.messages import Instruction, State

log = logging.getLogger("fedmole")

NODE_ALLOWANCE = 60.0  # seconds a node may need beyond its update: starting a ClientApp, building its Setup


def ask_in_waves(grid: Grid, build: Callable[[int], Message], keys: list[int], wait_s: float, wave: int = 0
                 ) -> tuple[list[Message], list[Message]]:
    """(the messages `build(key)` sent for `keys`, the replies to them), sent `wave` at a time
    (0: all at once), each wave given `wait_s` seconds, so the time allowed grows with the
    number of nodes. A key left unanswered is asked once more, in a fresh message, after the
    others: a node's first message may find its ClientApp still starting. `sent` holds the
    last message of each key, in `keys` order.

    Flower's in-memory SuperLink (the Simulation Engine's) scans every pending message for
    every node it serves: a population's worth of messages pending at once costs time that
    grows with the square of the population, and starves the replies."""
    step = wave or len(keys) or 1
    last: dict[int, Message] = {}
    replies: list[Message] = []
    pending = list(keys)
    for attempt in range(2):
        missed = []
        for i in range(0, len(pending), step):
            part = {k: build(k) for k in pending[i:i + step]}
            got = list(grid.send_and_receive(list(part.values()), timeout=wait_s))
            replies += got
            answered = {r.metadata.reply_to_message_id for r in got}
            missed += [k for k, m in part.items() if m.metadata.message_id not in answered]
            last.update(part)
        if not missed:
            break
        if attempt == 0:
            log.info("%d node(s) did not answer within %g s; asking them once more", len(missed), wait_s)
        pending = missed
    return [last[k] for k in keys], replies


def discover_nodes(grid: Grid, num_clients: int, wait_s: float = 120.0, wave: int = 0
                   ) -> dict[int, tuple[int, int | None]]:
    """Client id -> (node id, tier the node declares or None), for `num_clients` clients.

    Waits up to `wait_s` for enough nodes, then asks every node for its node config,
    `wave` nodes at a time (0: all at once), each wave within `wait_s`. Nodes that declare
    `partition-id` (the Simulation Engine sets it; SuperNodes take it from `--node-config`)
    serve that client; if none declares one, clients are the sorted node ids in order.
    """
    deadline = time.monotonic() + wait_s
    while len(node_ids := sorted(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of the {num_clients} nodes (data.num_clients) connected "
                               f"within {wait_s:.0f} s")
        time.sleep(0.2)
    def query(n: int) -> Message:
        return Message(RecordDict({"query": ConfigRecord({"ask": "node-config"})}), dst_node_id=n,
                       message_type=MessageType.QUERY)

    declared: dict[int, tuple[int, int]] = {}  # node -> (partition id, tier), -1 / 0 when not given
    for reply in ask_in_waves(grid, query, node_ids, wait_s, wave)[1]:
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to describe itself: {reply.error.reason}")
        try:
            node = reply.content["node"]
            partition, tier = node["partition-id"], node["tier"]
            if not (is_int(partition) and is_int(tier)):
                raise TypeError(f"partition-id {partition!r}, tier {tier!r}")
        except Exception as e:  # noqa: BLE001 - a node that cannot say who it is does not join
            raise RuntimeError(f"node {reply.metadata.src_node_id} sent a malformed node config: {e!r}") from None
        declared[reply.metadata.src_node_id] = (partition, tier)
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


def describe_clients(grid: Grid, nodes: dict[int, int], config_text: str, wait_s: float = 120.0, wave: int = 0
                     ) -> dict[int, ClientInfo]:
    """Client id -> what its node declares about its data when the run starts: name, training and
    test example counts, asked `wave` nodes at a time, each wave within `wait_s`. These bound what
    the node's replies may claim later (engine/guard.py); a repeated or unusable name becomes
    "clientN", as `build_clients` names clients."""
    def describe(c: int) -> Message:
        return Message(RecordDict({"query": ConfigRecord({"ask": "describe", "client-id": c}),
                                   "fedmole": serde.config_record(config_text)}),
                       dst_node_id=nodes[c], message_type=MessageType.QUERY)

    sent, replies = ask_in_waves(grid, describe, list(nodes), wait_s, wave)
    got, failures = FedmoleStrategy.match(sent, list(nodes), replies, wait_s)
    if failures:
        raise RuntimeError(f"nodes could not describe their clients' data: {failures}")
    infos = {}
    for c, msg in got.items():
        try:
            rec = msg.content["client"]
            name, train, test = rec["name"], rec["train"], rec["test"]
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"the node of client {c} described its data in a malformed message: {e!r}") from None
        if not (is_int(train) and 1 <= train <= MAX_EXAMPLES and is_int(test) and 0 <= test <= MAX_EXAMPLES):
            raise RuntimeError(f"the node of client {c} declares {train!r} training and {test!r} test examples; "
                               f"allowed: integers in 1..{MAX_EXAMPLES} and 0..{MAX_EXAMPLES}")
        name = name.strip() if isinstance(name, str) else ""
        infos[c] = ClientInfo(name if name.isprintable() and len(name) <= 100 else "", train, test)
    names = Counter(i.name for i in infos.values())
    return {c: ClientInfo(i.name if i.name and names[i.name] == 1 else f"client{c}", i.train, i.test)
            for c, i in sorted(infos.items())}


class FedmoleStrategy:
    """Per-node fedmole messages over a Flower Grid (see the module docstring)."""

    def __init__(self, nodes: dict[int, int], config_text: str, payload_dtype: str = "float32",
                 round_timeout: float = 0.0, client_timeout: float = 0.0):
        serde.wire_dtype(payload_dtype)  # fail early on an unknown dtype
        self.nodes = dict(nodes)  # client id -> node id
        self.config_text = config_text
        self.payload_dtype = payload_dtype
        self.round_timeout = round_timeout  # fed.round_timeout (0 = derived, see train_deadline)
        self.client_timeout = client_timeout  # fed.client_timeout (each node also holds it on its own update)

    def train_deadline(self, clients: int) -> float | None:
        """Seconds the server waits for a training round of `clients` replies, by its own clock:
        fed.round_timeout, else enough for the clients' updates one after another (as one
        simulation actor runs them) plus NODE_ALLOWANCE, else no limit."""
        if self.round_timeout:
            return self.round_timeout
        if self.client_timeout:
            return self.client_timeout * clients + NODE_ALLOWANCE
        return None

    # -- train ----------------------------------------------------------------------
    def configure_train(self, instructions: Iterable[Instruction]) -> list[Message]:
        """One TRAIN message per instruction, to the node serving that client."""
        return [
            Message(serde.instruction_content(i, self.payload_dtype, self.config_text),
                    dst_node_id=self.nodes[i.client_id], message_type=MessageType.TRAIN, group_id=str(i.round))
            for i in instructions
        ]

    def train(self, grid: Grid, instructions: list[Instruction]) -> tuple[dict[int, Message], dict[int, str]]:
        """Each client's reply message (undecoded; `engine/guard.py` decodes and checks it) and why
        the others have none."""
        messages = self.configure_train(instructions)
        deadline = self.train_deadline(len(messages))
        replies = grid.send_and_receive(messages, timeout=deadline)
        return self.match(messages, [i.client_id for i in instructions], replies, deadline)

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

    def evaluate(self, grid: Grid, rnd: int, global_state: State, client_ids: list[int],
                 wave: int = 0) -> tuple[dict[int, Message], dict[int, str]]:
        """Each client's evaluation reply message (undecoded) and why the others have none.

        Clients are asked `wave` at a time (0: all at once): every message carries the
        state, so a population's worth of them waiting at once would hold that many copies.
        fed.round_timeout bounds all waves together."""
        deadline = self.round_timeout or None  # generation time is not bounded by fed.client_timeout
        end = time.monotonic() + deadline if deadline else None
        clients = list(client_ids)
        step = wave or len(clients) or 1
        got: dict[int, Message] = {}
        failures: dict[int, str] = {}
        for i in range(0, len(clients), step):
            part = clients[i:i + step]
            messages = self.configure_evaluate(rnd, global_state, part)
            left = max(end - time.monotonic(), 0.0) if end else None
            replies = grid.send_and_receive(messages, timeout=left) if left != 0.0 else []
            g, f = self.match(messages, part, replies, deadline)
            got.update(g)
            failures.update(f)
        return got, failures

    # -- replies ----------------------------------------------------------------------
    @staticmethod
    def match(sent: list[Message], clients: list[int], replies: Iterable[Message], timeout: float | None = None
              ) -> tuple[dict[int, Message], dict[int, str]]:
        """Good reply messages by client (in `clients` order), and the reasons for the rest.

        A reply belongs to the message it answers (`reply_to_message_id`), not to the node
        it names: error replies the SuperLink makes for a node that went away carry the
        SuperLink's id, and a node may only answer its own messages.
        """
        asked = {m.metadata.message_id: (c, m.metadata.dst_node_id) for m, c in zip(sent, clients)}
        got: dict[int, Message] = {}
        failures: dict[int, str] = {}
        for msg in replies:
            c, node = asked.get(msg.metadata.reply_to_message_id, (None, None))
            if c is None or c in got or c in failures:
                log.warning("ignoring a reply from node %d to no message of this round (or a second reply)",
                            msg.metadata.src_node_id)
                continue
            if msg.has_error():
                failures[c] = msg.error.reason or f"node error (code {msg.error.code})"
            elif msg.metadata.src_node_id != node:
                failures[c] = f"reply from node {msg.metadata.src_node_id} to the message sent to node {node}"
            else:
                got[c] = msg
        for c in clients:
            if c not in got and c not in failures:
                failures[c] = f"no reply within the server's deadline of {timeout:g} s" if timeout else "no reply"
        return {c: got[c] for c in clients if c in got}, failures
