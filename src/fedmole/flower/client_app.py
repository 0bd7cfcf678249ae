"""The fedmole ClientApp: one fedmole client per Flower node.

Every message carries the run's resolved config; a process builds the `Setup`
(base model, adapter, method, client data) once per config and reuses it for
every message and every virtual node it serves. What a client must remember
between rounds (its `ClientRuntime.store`: optimizer moments, FedAMoLE's
personal experts; and its `TrainBatches` position) lives in the node's
`context.state`, so a ClientApp rebuilt for each message continues exactly
where the client stopped.

    train      Instruction -> Method.client_update -> Reply
    evaluate   global state -> Method.eval_view -> test metrics (evaluate_client)
    query      the node's declared partition-id and tier (node config)
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedmole.algorithms.base import ClientRuntime, client_seed
from fedmole.engine.deadline import ClientTimeout, run_client
from fedmole.engine.local import evaluate_client
from fedmole.engine.setup import Setup
from fedmole.flower import serde

log = logging.getLogger("fedmole")

CLIENT_APP_RAISED_EXCEPTION = 2  # flwr.common.constant.ErrorCode
_SETUPS: OrderedDict[str, tuple[Setup, dict[int, dict]]] = OrderedDict()  # config sha -> (setup, initial batches)
_KEEP = 1  # setups kept per process (each holds a base model)

app = ClientApp()


def cached_setup(content: RecordDict) -> tuple[Setup, dict[int, dict]]:
    """The Setup for the config this message carries, built once per process."""
    text, sha = serde.read_config_record(content)
    if sha not in _SETUPS:
        while len(_SETUPS) >= _KEEP:
            _SETUPS.popitem(last=False)
        setup = Setup(serde.config_from_text(text))
        initial = {rt.client_id: copy.deepcopy(rt.batches.state_dict()) for rt in setup.runtimes}
        _SETUPS[sha] = (setup, initial)
    _SETUPS.move_to_end(sha)
    return _SETUPS[sha]


def restore(content: RecordDict, context: Context, client_id: int) -> tuple[Setup, ClientRuntime]:
    """This node's client runtime with the state its previous rounds left in `context.state`."""
    setup, initial = cached_setup(content)
    if not 0 <= client_id < len(setup.runtimes):
        raise ValueError(f"client id {client_id} outside 0..{len(setup.runtimes) - 1} (data.num_clients)")
    rt = setup.runtimes[client_id]
    saved = serde.load_client_state(context.state)
    if saved is not None and saved["client_id"] != client_id:
        raise ValueError(f"this node served client {saved['client_id']} before, now asked for client {client_id}")
    rt.store.clear()
    if saved is None:
        rt.batches.load_state_dict(initial[client_id])
    else:
        rt.store.update(saved["store"])
        rt.batches.load_state_dict(saved["batches"])
    return setup, rt


def _failed(message: Message, what: str, e: Exception) -> Message:
    log.warning("%s failed: %r", what, e)
    reason = str(e) if isinstance(e, ClientTimeout) else f"exception: {e!r}"
    return Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    try:
        instruction, payload_dtype = serde.read_instruction(message.content)
        setup, rt = restore(message.content, context, instruction.client_id)
        torch.manual_seed(client_seed(setup.cfg.run.seed, instruction.round, rt.client_id))
        t0 = time.perf_counter()
        # the node holds fed.client_timeout on its own update too (engine/deadline.py), so a stuck
        # update does not hold a simulation actor that other virtual nodes are waiting for
        reply = run_client(setup, rt, setup.method.client_update, instruction, setup.cfg.fed.client_timeout)
        reply.metrics.setdefault("seconds", round(time.perf_counter() - t0, 3))
        serde.save_client_state(context.state, {
            "client_id": rt.client_id, "store": rt.store, "batches": rt.batches.state_dict(),
        })
        return Message(serde.reply_content(reply, payload_dtype), reply_to=message)
    except Exception as e:  # the server logs the reason and the round goes on
        return _failed(message, "train", e)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    try:
        request = serde.read_evaluate(message.content)
        setup, rt = restore(message.content, context, request.client_id)
        result = evaluate_client(setup, rt, request.state)
        return Message(serde.result_content(rt.data.name, result), reply_to=message)
    except Exception as e:
        return _failed(message, "evaluate", e)


@app.query()
def query(message: Message, context: Context) -> Message:
    """The node's `partition-id` and `tier` from its node config (-1 / 0 when not set)."""
    nc = context.node_config
    node = ConfigRecord({"partition-id": int(nc.get("partition-id", -1)), "tier": int(nc.get("tier", 0))})
    return Message(RecordDict({"node": node}), reply_to=message)
