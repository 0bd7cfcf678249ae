"""Deadlines on Flower: a client hanging in its update on the Simulation Engine is dropped after
fed.client_timeout, and the round completes; the server's own deadline derives from the options.
The same simulation checks that no process it started listens beyond loopback."""

import ipaddress
import json
import threading
import time

import psutil
import pytest

from fedmole.flower.simulation import run_flower_sim
from fedmole.flower.strategy import NODE_ALLOWANCE, FedmoleStrategy


def listening_sockets(stop: threading.Event, found: dict) -> None:
    """Until `stop`: every listening TCP socket of this process and its descendants (Ray's)."""
    me = psutil.Process()
    while not stop.is_set():
        try:
            ours = {me.pid} | {p.pid for p in me.children(recursive=True)}
            found.update({(c.laddr.ip, c.laddr.port): c.pid for c in psutil.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN and c.pid in ours})
        except psutil.Error:  # a process ended while being looked at
            pass
        time.sleep(0.3)


def test_a_hanging_client_on_the_simulation_engine_is_dropped_and_the_round_completes(cfg_factory, tmp_path):
    import hang_app  # patches client 1's update on import: in every Ray actor, and here until the end

    from fedmole.algorithms.flame import Flame

    cfg = cfg_factory("rounds=1", "fed.client_timeout=1")
    stop, sockets = threading.Event(), {}
    watcher = threading.Thread(target=listening_sockets, args=(stop, sockets), daemon=True)
    watcher.start()
    try:
        summary = run_flower_sim(cfg, tmp_path, client_app=hang_app.app)
    finally:
        Flame.client_update = hang_app.honest_update
        stop.set()
        watcher.join()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["clients"] == [0, 2]
    assert rows[1]["rejected"]["1"].startswith("timeout: no reply within fed.client_timeout = 1 s")
    assert rows[1]["seconds"] < hang_app.HANG / 2  # the round did not wait for the hanging client
    assert summary["engine"] == "flower-sim" and summary["evaluation_missing"] == {}

    # Ray's servers (GCS, raylet), its workers and this driver listened on loopback only
    assert len(sockets) >= 3, sockets  # the watcher saw them
    for ip, port in sockets:
        address = ipaddress.ip_address(ip)
        assert (getattr(address, "ipv4_mapped", None) or address).is_loopback, (ip, port, sockets[(ip, port)])


def test_the_server_deadline_of_a_training_round():
    strategy = lambda **kw: FedmoleStrategy({0: 1}, "", **kw)  # noqa: E731
    assert strategy().train_deadline(3) is None  # no deadline asked for: wait for every reply
    assert strategy(client_timeout=3.0).train_deadline(4) == pytest.approx(12 + NODE_ALLOWANCE)
    assert strategy(client_timeout=3.0, round_timeout=20.0).train_deadline(4) == 20.0
