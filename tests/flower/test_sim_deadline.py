"""Deadlines on Flower: a client hanging in its update on the Simulation Engine is dropped after
fed.client_timeout, and the round completes; the server's own deadline derives from the options."""

import json
import time

import pytest

from fedmole.flower.simulation import run_flower_sim
from fedmole.flower.strategy import NODE_ALLOWANCE, FedmoleStrategy


def test_a_hanging_client_on_the_simulation_engine_is_dropped_and_the_round_completes(cfg_factory, tmp_path):
    import hang_app  # patches client 1's update on import: in every Ray actor, and here until the end

    from fedmole.algorithms.flame import Flame

    cfg = cfg_factory("rounds=1", "fed.client_timeout=1")
    started = time.perf_counter()
    try:
        summary = run_flower_sim(cfg, tmp_path, client_app=hang_app.app)
    finally:
        Flame.client_update = hang_app.honest_update
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients"] == [0, 2]
    assert rows[1]["rejected"]["1"].startswith("timeout: no reply within fed.client_timeout = 1 s")
    assert rows[1]["seconds"] < hang_app.HANG / 2 and time.perf_counter() - started < hang_app.HANG
    assert summary["engine"] == "flower-sim" and summary["evaluation_missing"] == {}


def test_the_server_deadline_of_a_training_round():
    strategy = lambda **kw: FedmoleStrategy({0: 1}, "", **kw)  # noqa: E731
    assert strategy().train_deadline(3) is None  # no deadline asked for: wait for every reply
    assert strategy(client_timeout=3.0).train_deadline(4) == pytest.approx(12 + NODE_ALLOWANCE)
    assert strategy(client_timeout=3.0, round_timeout=20.0).train_deadline(4) == 20.0
