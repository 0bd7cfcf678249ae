"""The Flower transport over an in-process grid: node mapping, per-node payloads, rejected
replies, bf16 payloads, and every method's result against the local engine."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmole.algorithms import METHODS
from fedmole.algorithms.flame import Flame
from fedmole.engine.local import run_local
from fedmole.flower import serde
from fedmole.flower.server_app import serve
from fedmole.flower.simulation import actor_cpus
from fedmole.flower.strategy import describe_clients, discover_nodes


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_nodes_serve_the_client_named_by_their_partition_id(grid_factory):
    grid = grid_factory([{"partition-id": 2}, {"partition-id": 0, "tier": 1}, {"partition-id": 1}])
    ids = list(grid.contexts)
    assert discover_nodes(grid, 3, wait_s=1) == {0: (ids[1], 1), 1: (ids[2], None), 2: (ids[0], None)}

    plain = grid_factory([{}, {}, {}])
    assert discover_nodes(plain, 3, wait_s=1) == {c: (n, None) for c, n in enumerate(sorted(plain.contexts))}

    with pytest.raises(RuntimeError, match=r"missing \[2\], declared by several nodes \{1: "):
        discover_nodes(grid_factory([{"partition-id": 0}, {"partition-id": 1}, {"partition-id": 1}]), 3, wait_s=1)
    with pytest.raises(RuntimeError, match="only 2 of the 3 nodes"):
        discover_nodes(grid_factory([{}, {}]), 3, wait_s=0.3)


def test_start_up_queries_go_a_wave_at_a_time_each_with_its_own_deadline(grid_factory, cfg_factory):
    grid = grid_factory([{"partition-id": 2}, {"partition-id": 0}, {"partition-id": 1}])
    asked = []
    send = grid.send_and_receive
    grid.send_and_receive = lambda messages, *, timeout=None: (asked.append((len(messages), timeout))
                                                               or send(messages, timeout=timeout))
    nodes = discover_nodes(grid, 3, wait_s=5, wave=2)
    assert sorted(nodes) == [0, 1, 2] and asked == [(2, 5), (1, 5)]
    asked.clear()
    infos = describe_clients(grid, {c: n for c, (n, _) in nodes.items()}, serde.config_to_text(cfg_factory()),
                             wait_s=7, wave=2)
    assert sorted(infos) == [0, 1, 2] and all(i.test == 4 for i in infos.values()) and asked == [(2, 7), (1, 7)]

    # a node whose first answer comes too late (its ClientApp still starting) is asked once more
    slow_nodes = set(sorted(grid.contexts)[::2])  # two of the three, one in each wave

    def late_once(messages, *, timeout=None):
        asked.append(len(messages))
        replies = send(messages, timeout=timeout)
        kept = [r for r in replies if r.metadata.src_node_id not in slow_nodes]
        slow_nodes.difference_update(r.metadata.src_node_id for r in replies)
        return kept

    asked.clear()
    grid.send_and_receive = late_once
    assert discover_nodes(grid, 3, wait_s=5, wave=2) == nodes and asked == [2, 1, 2]


def test_a_simulation_actor_claims_its_torch_threads(cfg_factory):
    assert actor_cpus(cfg_factory("run.threads=1"), 16) == 1  # 16 clients side by side
    assert actor_cpus(cfg_factory("run.threads=0"), 16) == 16  # one at a time, every core
    assert actor_cpus(cfg_factory("run.threads=32"), 16) == 16


def test_failing_and_nan_nodes_are_rejected_with_their_reason(grid_factory, cfg_factory, tmp_path, monkeypatch):
    original = Flame.client_update

    def flaky(self, rt, instruction):
        if rt.client_id == 1:
            raise RuntimeError("disk on fire")
        reply = original(self, rt, instruction)
        if rt.client_id == 2:
            key = next(iter(reply.state))
            reply.state[key] = torch.full_like(reply.state[key], float("nan"))
        return reply

    monkeypatch.setattr(Flame, "client_update", flaky)
    serve(grid_factory([{}, {}, {}]), cfg_factory("rounds=1"), tmp_path)
    row = _rows(tmp_path)[1]
    assert row["clients"] == [0]
    assert row["rejected"]["1"] == "exception: RuntimeError('disk on fire')"
    assert "non-finite" in row["rejected"]["2"]


def test_each_node_gets_its_own_tier_and_bfloat16_payloads_halve_the_adapter_bytes(grid_factory, cfg_factory,
                                                                                    tmp_path):
    grid = grid_factory([{"partition-id": 0}, {"partition-id": 1, "tier": 3}, {"partition-id": 2}])
    summary = serve(grid, cfg_factory("rounds=1", "run.payload_dtype=bfloat16"), tmp_path)
    # node 1's declared tier replaces the config's 2, and each node got its own
    sent = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            ins, dtype = serde.read_instruction(m.content)
            sent[ins.client_id] = (m.metadata.dst_node_id, ins.tier, dtype)
    ids = list(grid.contexts)
    assert sent == {0: (ids[0], 4, "bfloat16"), 1: (ids[1], 3, "bfloat16"), 2: (ids[2], 1, "bfloat16")}
    assert summary["engine"] == "flower" and list(summary["per_tier"]) == ["4", "3", "1"]
    assert "tiers = [\n    4,\n    3,\n    1,\n]" in (tmp_path / "config.toml").read_text()

    row = _rows(tmp_path)[1]
    final = load_file(str(tmp_path / "adapter.safetensors"))
    assert all(t.dtype == torch.float32 for t in final.values())  # the server keeps float32
    full = sum(t.numel() * 4 for t in final.values())
    assert row["comm_bytes_down"] == 3 * full // 2  # FLAME sends every client the whole adapter
    assert full // 2 < row["comm_bytes_up"] / 3 < full  # + the expert counts, always exact


METHOD_OPTIONS = {"fedamole": ["fedamole.pool_size=6", "fedamole.max_experts=4"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_matches_the_local_engine_over_flower_messages(method, grid_factory, cfg_factory, tmp_path):
    """Two rounds, so what clients keep between rounds (optimizer moments, FedAMoLE's personal
    experts, FLoRA's merged base) must survive in the nodes' contexts; personalised
    evaluation must find it there."""
    cfg = [f"run.method={method}", "rounds=2", *METHOD_OPTIONS.get(method, [])]
    local = run_local(cfg_factory(*cfg), tmp_path / "local")
    flower = serve(grid_factory([{}, {}, {}]), cfg_factory(*cfg), tmp_path / "flower")
    assert flower["final_state_sha256"] == local["final_state_sha256"]
    assert flower["metrics"] == local["metrics"] and flower["per_client"] == local["per_client"]
    local_bytes, flower_bytes = ([(r["comm_bytes_down"], r["comm_bytes_up"]) for r in _rows(tmp_path / e)[1:]]
                                 for e in ("local", "flower"))
    assert flower_bytes == local_bytes  # each node was sent what the local engine hands its client


def test_a_node_keeps_its_clients_state_in_files_not_in_its_context(grid_factory, cfg_factory, tmp_path):
    """Local-only training: each client's personal adapter must survive from round 1 to round 2 and
    to evaluation, at rest under the node's state folder; the node's context stays empty."""
    grid = grid_factory([{}, {}, {}])
    local = run_local(cfg_factory("method=local", "rounds=2"), tmp_path / "local")
    flower = serve(grid, cfg_factory("method=local", "rounds=2"), tmp_path / "flower")
    assert flower["metrics"] == local["metrics"] and flower["per_client"] == local["per_client"]
    assert all(len(ctx.state) == 0 for ctx in grid.contexts.values())
    records = sorted(p.name for p in (tmp_path / "node-state").glob("run-*/node-*/client-*/records/*.json"))
    assert records == ["c000000-r00002.json", "c000001-r00002.json", "c000002-r00002.json"]  # the newest only


def test_evaluation_asks_the_nodes_in_waves_of_a_rounds_size(grid_factory, cfg_factory, tmp_path):
    """Every evaluation message carries the model: a population is asked a round's worth at a time."""
    from flwr.app import MessageType

    grid = grid_factory([{}, {}, {}])
    send, waves = grid.send_and_receive, []

    def counted(messages, *, timeout=None):
        if messages and messages[0].metadata.message_type == MessageType.EVALUATE:
            waves.append(len(messages))
        return send(messages, timeout=timeout)

    grid.send_and_receive = counted
    summary = serve(grid, cfg_factory("rounds=1", "fed.sample_fraction=0.67"), tmp_path)
    assert waves == [2, 1, 2, 1]  # before training and after round 1: two clients, then the third
    assert len(summary["per_client"]) == 3 and not summary["evaluation_missing"]


def test_a_node_that_went_away_keeps_its_reason_and_a_partial_evaluation_is_marked(grid_factory, cfg_factory,
                                                                                    tmp_path, monkeypatch):
    """The SuperLink answers for a vanished node with an error message that carries its own id, not the
    node's; the reply still belongs to the message it answers. Evaluation results are the server's to
    name: a node reporting NaN or another client's identity is rejected, and the summary says who is missing."""
    from flwr.app import Error, Message

    import fedmole.flower.client_app as client_app

    grid = grid_factory([{}, {}, {}])
    lost = sorted(grid.contexts)[1]  # client 1's node
    send = grid.send_and_receive

    def vanishing(messages, *, timeout=None):
        messages = list(messages)
        out = []
        for reply in send(messages, timeout=timeout):
            if reply.metadata.src_node_id == lost and reply.metadata.message_type == "train":
                sent = next(m for m in messages if m.metadata.message_id == reply.metadata.reply_to_message_id)
                reply = Message(Error(code=3, reason="node 1 was lost mid-round"), reply_to=sent)
                reply.metadata.__dict__["_src_node_id"] = 0  # made by the SuperLink, not by the node
            out.append(reply)
        return out

    grid.send_and_receive = vanishing
    real = client_app.evaluate_client

    def lying(setup, rt, state):
        result = real(setup, rt, state)
        if rt.client_id == 2:
            return {**result, "rouge_l": float("nan"), "client_id": 0, "tier": 99}
        return {**result, "client_id": 7, "tier": 99} if rt.client_id == 0 else result

    monkeypatch.setattr(client_app, "evaluate_client", lying)
    summary = serve(grid, cfg_factory("rounds=1"), tmp_path)
    row = _rows(tmp_path)[1]
    assert row["clients"] == [0, 2] and row["rejected"] == {"1": "node 1 was lost mid-round"}
    assert set(summary["evaluation_missing"]) == {"2"} and "rouge_l = nan" in summary["evaluation_missing"]["2"]
    assert [(m["client_id"], m["tier"]) for m in summary["per_client"].values()] == [(0, 4), (1, 2)]
    json.loads((tmp_path / "summary.json").read_text())  # strict JSON
