"""Deadlines held by the wall clock on the local engine: a hanging client is dropped after
fed.client_timeout, the round completes without it, and its abandoned work cannot touch what
the other clients train."""

import json
import threading
import time

import pytest
from rounds import TINY

from fedmole.algorithms.flame import Flame
from fedmole.config import ConfigError, load_config
from fedmole.engine.local import run_local

HANG = 6.0  # seconds the hanging client sleeps; the deadline is 0.5 s


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_a_hanging_client_is_dropped_at_the_deadline_and_cannot_change_the_result(tmp_path, monkeypatch):
    original = Flame.client_update
    cfg = ["rounds=1", "fed.client_timeout=0.5"]

    def failing(self, rt, instruction):
        if rt.client_id == 1:
            raise RuntimeError("gone")
        return original(self, rt, instruction)

    monkeypatch.setattr(Flame, "client_update", failing)
    reference = run_local(load_config("configs/tiny.toml", [*TINY, *cfg]), tmp_path / "failing")

    def hanging(self, rt, instruction):
        if rt.client_id == 1:
            time.sleep(HANG)  # then trains on the adapter it was given, which is no longer the engine's
        return original(self, rt, instruction)

    monkeypatch.setattr(Flame, "client_update", hanging)
    started = time.perf_counter()
    summary = run_local(load_config("configs/tiny.toml", [*TINY, *cfg]), tmp_path / "hanging")
    row = _rows(tmp_path / "hanging")[1]
    assert row["clients"] == [0, 2] and row["rejected"]["1"].startswith("timeout: no reply within fed.client_timeout")
    assert row["seconds"] < HANG / 2 and time.perf_counter() - started < HANG  # the round did not wait for it
    # the clients that answered trained exactly as when client 1 failed at once: the abandoned
    # update shares no tensor, optimizer state or batch position with them
    assert summary["final_state_sha256"] == reference["final_state_sha256"]


def test_abandoned_training_stops_at_its_next_step(tmp_path, monkeypatch):
    original = Flame.client_update

    def endless(self, rt, instruction):
        reply = original(self, rt, instruction)
        while rt.client_id == 1:  # a client that never returns, training all the while
            reply = original(self, rt, instruction)
        return reply

    monkeypatch.setattr(Flame, "client_update", endless)
    run_local(load_config("configs/tiny.toml", [*TINY, "rounds=1", "fed.client_timeout=1"]), tmp_path)
    assert _rows(tmp_path)[1]["clients"] == [0, 2]
    deadline = time.monotonic() + 30
    while any(t.name == "fedmole-client-1" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the abandoned client's thread kept running"
        time.sleep(0.1)


def test_the_centralised_reference_refuses_a_client_timeout():
    with pytest.raises(ConfigError, match="fed.client_timeout = 3.0 does not apply to centralized; allowed: 0"):
        load_config(None, ["method=centralized", "fed.client_timeout=3"])
