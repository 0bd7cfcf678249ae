"""The fedmole ClientApp: one fedmole client per Flower node.

Every message carries the run's resolved config. A node's data comes from one
of two places:

- its own site (node config `data-path`, and optionally `data-format`,
  `split-seed`, `name`; see `fedmole.data.sites`): the node builds its one
  client from that file and never needs another site's data;
- otherwise the config's `[data]` section, from which the node rebuilds every
  client (the Simulation Engine, the embedded data sets) and serves the one
  it is asked for.

A process builds the `Setup` (base model, adapter, method, its clients' data)
once per config and data source and reuses it for every message and every
virtual node it serves; a client's runtime is built for one message and dropped
after it (engine/clients.py). What a client must remember between rounds (its
`ClientRuntime.store`: personal tensors, optimizer moments when kept, FLoRA's
merged base; and its `TrainBatches` position) lives at rest in files
(engine/client_state.py, newest version only) under the node's state folder:

    <state dir>/run-<Flower run id>/node-<node id>/client-<client id>/

where the state dir is the node config's `state-dir`, else $FEDMOLE_NODE_STATE_DIR
(the Simulation Engine sets it to RUN_DIR/node-state), else
<system temp dir>/fedmole-node-state. A ClientApp rebuilt for each message, or a
node process restarted within a run, continues exactly where the client stopped;
nothing of it stays in memory between messages. The folder of a finished run can
be deleted.

    train      Instruction -> Method.client_update (within fed.client_timeout) -> Reply
    evaluate   global state -> Method.eval_view -> test metrics (evaluate_client)
    query      "node-config": the node's declared partition-id and tier;
               "describe": its client's name and training / test example counts
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmole.algorithms import METHODS, Method
from fedmole.algorithms.base import ClientRuntime, client_seed, timed_update
from fedmole.data.sites import NODE_KEYS, node_site
from fedmole.data.types import ClientData
from fedmole.engine.client_state import NodeClientState
from fedmole.engine.clients import ClientPool
from fedmole.engine.deadline import ClientTimeout, run_client
from fedmole.engine.local import evaluate_client
from fedmole.engine.setup import Setup, build_client_data
from fedmole.flower import serde
from fedmole.flower.simulation import STATE_DIR_ENV

log = logging.getLogger("fedmole")
if not log.handlers and not logging.getLogger().handlers:  # a ClientApp process configures no logging for us
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode
_KEEP = 1  # setups (and client data sets) kept per process: each setup holds a base model
_SETUPS: OrderedDict[tuple, Setup] = OrderedDict()
_DATA: OrderedDict[tuple, tuple] = OrderedDict()  # key -> (config, clients)

app = ClientApp()


def _remember(cache: OrderedDict, key, build):
    if key not in cache:
        while len(cache) >= _KEEP:
            cache.popitem(last=False)
        cache[key] = build()
    cache.move_to_end(key)
    return cache[key]


def node_clients(content: RecordDict, context: Context, client_id: int) -> tuple[tuple, object, list[ClientData]]:
    """(cache key, config, the clients this node can serve) for a message about `client_id`."""
    text, sha = serde.read_config_record(content)
    nc = context.node_config
    if "data-path" in nc:
        declared = int(nc.get("partition-id", -1))
        if declared >= 0 and declared != client_id:
            raise ValueError(f"this site holds the data of client {declared} (partition-id), not of client {client_id}")
        key = (sha, client_id, tuple((k, str(nc[k])) for k in NODE_KEYS if k in nc))
    else:
        key = (sha,)

    def build():
        cfg = serde.config_from_text(text)
        site = node_site(cfg, nc, client_id)
        if site is None:
            return cfg, build_client_data(cfg)
        if METHODS[cfg.run.method].attach_clients is not Method.attach_clients:
            raise ValueError(f"{cfg.run.method} needs every client's data in one place; a site holds only its own")
        log.info("site data of client %d from %s: %d training, %d test examples", client_id, nc["data-path"],
                 len(site.train), len(site.test))
        return cfg, [site]

    cfg, clients = _remember(_DATA, key, build)
    return key, cfg, clients


def cached_setup(content: RecordDict, context: Context, client_id: int) -> Setup:
    """The Setup for the config and data source of this message, built once per process."""
    key, cfg, clients = node_clients(content, context, client_id)
    return _remember(_SETUPS, key, lambda: Setup(cfg, clients=clients))


def state_dir(context: Context) -> Path:
    """This node's folder of client state for this run (see the module docstring)."""
    root = context.node_config.get("state-dir") or os.environ.get(STATE_DIR_ENV) \
        or Path(tempfile.gettempdir()) / "fedmole-node-state"
    return Path(str(root)) / f"run-{context.run_id}" / f"node-{context.node_id}"


def open_client(content: RecordDict, context: Context, client_id: int, train: bool = True
                ) -> tuple[Setup, ClientPool, ClientRuntime]:
    """This node's runtime of `client_id`, with the state its previous rounds left at rest."""
    setup = cached_setup(content, context, client_id)
    pool = ClientPool(setup, NodeClientState(state_dir(context)))
    return setup, pool, pool.open(client_id, train=train)


def _failed(message: Message, what: str, e: Exception) -> Message:
    log.warning("%s failed: %r", what, e)
    reason = str(e) if isinstance(e, ClientTimeout) else f"exception: {e!r}"
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    try:
        instruction, payload_dtype = serde.read_instruction(message.content)
        setup, pool, rt = open_client(message.content, context, instruction.client_id)
        torch.manual_seed(client_seed(setup.cfg.run.seed, instruction.round, rt.client_id))
        t0 = time.perf_counter()
        # the node holds fed.client_timeout on its own update too (engine/deadline.py), so a stuck
        # update does not hold a simulation actor that other virtual nodes are waiting for
        reply = run_client(setup, rt, partial(timed_update, setup.method), instruction, setup.cfg.fed.client_timeout)
        reply.metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
        pool.keep(rt, instruction.round)
        return Message(serde.reply_content(reply, payload_dtype), reply_to=message)
    except Exception as e:  # the server logs the reason and the round goes on
        return _failed(message, "train", e)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        request = serde.read_evaluate(message.content)
        setup, _, rt = open_client(message.content, context, request.client_id, train=False)
        result = evaluate_client(setup, rt, request.state)
        return Message(serde.result_content(rt.data.name, result), reply_to=message)
    except Exception as e:
        return _failed(message, "evaluate", e)


@app.query()
def query(message: Message, context: Context) -> Message:
    """"node-config": the node's `partition-id` and `tier` from its node config (-1 / 0 when not set);
    "describe": name and training / test example counts of the client the server assigned it."""
    try:
        ask = message.content["query"]["ask"]
        if ask == "describe":
            client_id = int(message.content["query"]["client-id"])
            _, _, clients = node_clients(message.content, context, client_id)
            data = {c.client_id: c for c in clients}.get(client_id)
            if data is None:
                raise ValueError(f"this node has no client {client_id}")
            return Message(RecordDict({"client": ConfigRecord({
                "name": data.name, "train": len(data.train), "test": len(data.test)})}), reply_to=message)
        nc = context.node_config
        node = ConfigRecord({"partition-id": int(nc.get("partition-id", -1)), "tier": int(nc.get("tier", 0))})
        return Message(RecordDict({"node": node}), reply_to=message)
    except Exception as e:
        return _failed(message, "query", e)
