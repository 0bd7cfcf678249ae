"""Real sites: each node reads only its own data file (node config), the server loads no client data,
and what a node declares about its data bounds what its replies may claim."""

import json

import pytest
from flwr.app import RecordDict

import fedmole.flower.client_app as client_app
from fedmole.algorithms.flame import Flame
from fedmole.data.sites import export_sites
from fedmole.engine.local import run_local
from fedmole.flower import serde
from fedmole.flower.server_app import serve


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def sites(cfg_factory, tmp_path):
    """Each client's examples in its own site file, and a config whose shared data source does not exist."""
    files = export_sites(cfg_factory(), tmp_path / "sites")
    nowhere = cfg_factory(f"data.source='{tmp_path / 'no-shared-data.jsonl'}'")
    return files, nowhere


def test_sites_with_their_own_files_match_the_local_engine(sites, grid_factory, cfg_factory, tmp_path):
    files, nowhere = sites
    grid = grid_factory([{"partition-id": i, "data-path": str(f)} for i, f in enumerate(files)])
    summary = serve(grid, nowhere, tmp_path / "flower")  # any load of the shared source would fail
    local = run_local(cfg_factory(), tmp_path / "local")
    assert summary["final_state_sha256"] == local["final_state_sha256"]
    assert summary["metrics"] == local["metrics"] and summary["per_client"] == local["per_client"]


def test_a_site_serves_only_its_own_client_and_names_it(sites, grid_factory):
    files, nowhere = sites
    grid = grid_factory([{"partition-id": 0, "data-path": str(files[1]), "name": "north"}])
    context = next(iter(grid.contexts.values()))
    content = RecordDict({"fedmole": serde.config_record(serde.config_to_text(nowhere))})
    with pytest.raises(ValueError, match=r"holds the data of client 0 \(partition-id\), not of client 1"):
        client_app.node_clients(content, context, 1)
    _, _, clients = client_app.node_clients(content, context, 0)
    assert [(c.client_id, c.name) for c in clients] == [(0, "north")]


def test_a_reply_claiming_more_examples_than_its_node_declared_is_rejected(sites, grid_factory, tmp_path,
                                                                           monkeypatch):
    files, nowhere = sites
    original = Flame.client_update

    def inflating(self, rt, instruction):
        reply = original(self, rt, instruction)
        if rt.client_id == 2:
            reply.num_examples = 10**9
        return reply

    monkeypatch.setattr(Flame, "client_update", inflating)
    grid = grid_factory([{"partition-id": i, "data-path": str(f)} for i, f in enumerate(files)])
    serve(grid, nowhere, tmp_path / "flower")
    row = _rows(tmp_path / "flower")[1]
    assert row["clients"] == [0, 1]
    assert "example count 1000000000 exceeds fed.max_example_ratio = 1 x the" in row["rejected"]["2"]
