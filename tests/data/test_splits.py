"""Per-client splits: disjoint, seeded, sized as documented; clients named by task."""

from __future__ import annotations

import pytest

from fedmole.data.sources import DataError
from fedmole.data.splits import build_clients, split_examples
from fedmole.data.types import Example


def pool(n, task="t"):
    return [Example("i", f"x{k}", ("y",), "c", task) for k in range(n)]


def test_split_sizes_disjoint_complete():
    exs = pool(1000)
    train, aux, val, test = split_examples(exs, seed=0)
    assert (len(train), len(aux), len(val), len(test)) == (760, 40, 100, 100)
    everything = train + aux + val + test
    assert len(set(everything)) == 1000 and set(everything) == set(exs)
    assert split_examples(exs, seed=0) == (train, aux, val, test)
    assert split_examples(exs, seed=1)[3] != test


def test_aux_floor_and_cap():
    assert len(split_examples(pool(10), seed=0)[1]) == 1
    assert len(split_examples(pool(9), seed=0, val_frac=0.2, test_frac=0.2)[1]) == 0
    assert len(split_examples(pool(20000), seed=0)[1]) == 200
    assert len(split_examples(pool(20000), seed=0, aux_max=50)[1]) == 50
    assert len(split_examples(pool(100), seed=0, aux_frac=0)[1]) == 0
    assert len(split_examples(pool(20000), seed=0, aux_max=None)[1]) == 800


def test_aux_sizes_are_config_options():
    from fedmole.config import ConfigError, assign_tiers, load_config
    from fedmole.engine.setup import load_clients

    for extra, expected in ((["data.aux_frac=0.25", "data.aux_max=3"], 3), (["data.aux_frac=0.25", "data.aux_max=0"], 50),
                            (["data.aux_frac=0.0"], 0)):
        cfg = load_config("configs/tiny.toml", extra)
        clients, summary = load_clients(cfg, assign_tiers(cfg))
        assert [len(c.aux) for c in clients] == [expected] * 6  # 200 rows per client
        assert [c["aux"] for c in summary["clients"]] == [expected] * 6
    with pytest.raises(ConfigError, match="data.val_frac \\+ data.test_frac \\+ data.aux_frac must stay below 0.9"):
        load_config("configs/tiny.toml", ["data.aux_frac=0.45", "data.val_frac=0.3", "data.test_frac=0.3"])


def test_caps_shorten_without_reshuffling():
    exs = pool(500)
    train, aux, val, test = split_examples(exs, seed=3)
    c_train, c_aux, c_val, c_test = split_examples(exs, seed=3, max_train=10, max_val=5, max_test=7)
    assert (c_train, c_aux, c_val, c_test) == (train[:10], aux, val[:5], test[:7])


def test_split_errors():
    with pytest.raises(DataError, match="no training data"):
        split_examples(pool(2), seed=0, val_frac=0.4, test_frac=0.4)
    with pytest.raises(DataError, match="val_frac must be in"):
        split_examples(pool(30), seed=0, val_frac=1.5)
    with pytest.raises(DataError, match="must be < 1"):
        split_examples(pool(30), seed=0, val_frac=0.5, test_frac=0.5)


def test_build_clients():
    parts = [pool(50, "alpha"), pool(30, "beta") + pool(10, "alpha"), pool(40, "beta"), pool(20, "")]
    clients = build_clients(parts, seed=0, max_train=25)
    assert [c.client_id for c in clients] == [0, 1, 2, 3]
    # "beta" dominates two clients, so neither takes the name; an empty task never does
    assert [c.name for c in clients] == ["alpha", "client1", "client2", "client3"]
    assert clients[1].tasks == ["alpha", "beta"]
    assert clients[0].num_train == 25 and len(clients[0].test) == 5
    again = build_clients(parts, seed=0, max_train=25)
    assert [c.train for c in clients] == [c.train for c in again]
    # each client draws its own split, even for identical data
    same = build_clients([pool(50), pool(50)], seed=0)
    assert same[0].test != same[1].test
    with pytest.raises(DataError, match="client 1 has no examples"):
        build_clients([pool(20), []], seed=0)
