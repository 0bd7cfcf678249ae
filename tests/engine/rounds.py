"""One trained round on the tiny config, to build hostile replies from honest ones."""

import copy

import torch

from fedmole.config import load_config

TINY = ["run.progress=false", "run.threads=1", "data.num_clients=3", "fed.tiers=[4,2,1]", "train.local_steps=1",
        "data.max_test=4", "eval.max_new_tokens=4"]


def engine_round(engine_cls, tmp_path, *overrides, **kw):
    """(engine, instructions, honest raw replies, previous global state) for round 1 of every client."""
    engine = engine_cls(load_config("configs/tiny.toml", [*TINY, *overrides]), tmp_path, **kw)
    previous = engine.method.initial_state(engine.setup.adapter)
    instructions = engine.method.configure(1, [0, 1, 2], previous)
    return engine, instructions, previous


def honest_replies(engine, instructions):
    """Each client's real reply to its instruction (client id -> Reply)."""
    from fedmole.engine.local import LocalEngine

    replies, failures = LocalEngine.train_clients(engine, 1, instructions)
    assert not failures, failures
    return replies


def clone(reply):
    return copy.deepcopy(reply)


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
