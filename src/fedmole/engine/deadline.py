"""Client updates under a wall-clock deadline that the engine can walk away from.

`run_client(setup, rt, update, instruction, timeout)` runs one client's local update.
Without a timeout it runs inline, as it always did. With one (`fed.client_timeout`):

- The update runs in a daemon worker thread on a private view of the client: a deep
  copy of its store (optimizer moments, personal tensors, FLoRA's merged base) and of
  its batch position. Only an update that finishes in time commits them back, so a
  dropped client's state does not advance, as if it had not been selected.
- Past the deadline the engine stops waiting and raises `ClientTimeout`; the round
  goes on. Python cannot kill the thread, so it is abandoned: whatever it returns
  later is dropped. It may still be writing into the adapter it was given (parameters,
  optimizer steps, routing state and counts, FLoRA's merged base weights), so the
  engine arms the abandoned adapter (its next adapter forward raises, which ends the
  thread at its next step) and swaps in a fresh copy of it for everyone else
  (`replace_adapter`: the adapted layers, base weights inside them included, are
  cloned; the frozen tensors outside them are shared, since no client writes them).

What an abandoned thread can still touch is process-global: CPU time until it stops,
and torch's global random generator (dropout), so a run in which a client was
abandoned is not bit-reproducible. Methods whose client step writes server-side state
(the centralised reference's pooled data) refuse a client timeout at config load.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable

import torch

from fedmole.algorithms.base import ClientRuntime
from fedmole.messages import Instruction, Reply

log = logging.getLogger("fedmole")


class ClientTimeout(RuntimeError):
    """A client's update did not finish within fed.client_timeout."""


class Abandoned(RuntimeError):
    """Raised inside an abandoned client's thread at its next adapter forward."""


def run_client(setup, rt: ClientRuntime, update: Callable[[ClientRuntime, Instruction], Reply],
               instruction: Instruction, timeout: float = 0.0) -> Reply:
    """`update(rt, instruction)`, within `timeout` wall seconds when timeout > 0 (see the module docstring)."""
    if not timeout:
        return update(rt, instruction)
    view = dataclasses.replace(rt, store=copy.deepcopy(rt.store),
                               batches=copy.deepcopy(rt.batches, _shared_items(rt.batches)))
    box: dict = {}

    def work() -> None:
        try:
            box["reply"] = update(view, instruction)
        except BaseException as e:  # noqa: BLE001 - reported to the engine, or dropped once abandoned
            box["error"] = e

    worker = threading.Thread(target=work, name=f"fedmole-client-{rt.client_id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        replace_adapter(setup)
        raise ClientTimeout(f"timeout: no reply within fed.client_timeout = {timeout:g} s; the update was abandoned")
    if "error" in box:
        raise box["error"]
    rt.store.clear()
    rt.store.update(view.store)
    rt.batches = view.batches
    return box["reply"]


def _shared_items(batches) -> dict:
    """deepcopy memo that shares a TrainBatches' encoded items (read-only) and copies its position."""
    items = getattr(batches, "items", None)
    return {id(items): items} if items is not None else {}


def replace_adapter(setup) -> None:
    """Give `setup` a fresh copy of its adapter (for every client opened later) and stop the old one.

    The old layers are armed first, so the abandoned update starts no new adapter forward
    (its next one raises `Abandoned`). The copy shares every tensor outside the adapted
    layers (frozen base weights nobody writes) and clones the adapted layers, base weights
    inside them included (FLoRA merges into those); values the abandoned update was
    writing may be torn, which does not matter: every client step and evaluation loads its
    whole starting state first. Gradients are not carried over.
    """
    old = setup.adapter
    for layer in old.layers.values():
        if not getattr(layer, "_fedmole_stop_hook", False):  # copies inherit the hook and the mark
            layer.register_forward_pre_hook(_stop_if_abandoned)
            layer._fedmole_stop_hook = True
        _ABANDONED.add(layer)
    for attempt in range(COPY_TRIES):
        try:
            new = _copy(old)
            break
        except RuntimeError:  # a forward already under way stored a graph tensor while we copied
            if attempt == COPY_TRIES - 1:
                raise
            time.sleep(0.05)
    for p in new.parameters():
        p.grad = None
    setup.adapter, setup.model = new, new.model  # runtimes opened from now on take it up
    log.warning("a client update was abandoned past its deadline; later clients use a fresh copy of the adapter")


def _copy(adapter):
    inside = {id(t) for layer in adapter.layers.values()
              for t in itertools.chain(layer.parameters(), layer.buffers())}
    memo = {id(t): t for t in itertools.chain(adapter.model.parameters(), adapter.model.buffers())
            if id(t) not in inside}
    for obj in itertools.chain([adapter], adapter.model.modules()):  # results of the last forward (e.g. an
        for value in list(vars(obj).values()):  # aux loss) are graph nodes, which deepcopy refuses: copy values
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(adapter, memo)


_ABANDONED: weakref.WeakSet = weakref.WeakSet()  # adapter layers of abandoned updates
COPY_TRIES = 20


def _stop_if_abandoned(module, args):
    if module in _ABANDONED:
        raise Abandoned("this client update was abandoned after its deadline")
