"""End-to-end runs of the local engine on the tiny model and synthetic tasks."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmole.config import load_config
from fedmole.engine.local import LocalEngine, RoundFailed, run_local
from fedmole.messages import state_sha256

TINY = "configs/tiny.toml"
FAST = ["rounds=2", "run.progress=false", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


def tiny_cfg(*extra):
    return load_config(TINY, [*FAST, *extra])


def test_tiny_flame_run_writes_every_output(tmp_path):
    summary = run_local(tiny_cfg(), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert {"train_loss", "comm_bytes_up", "comm_bytes_down", "seconds"} <= set(r)
        assert r["comm_bytes_down"] > 0 and r["comm_bytes_up"] >= r["comm_bytes_down"]
    assert "rouge_l" in rows[0] and "rouge_l" in rows[-1]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk) >= {"method", "engine", "rounds", "seed", "metrics", "per_client", "per_tier", "comm_bytes",
                            "wall_seconds", "final_state_sha256"}
    assert on_disk["per_tier"].keys() == {"4", "2", "1"} and len(on_disk["per_client"]) == 6
    assert on_disk["comm_bytes"]["up"] == sum(r["comm_bytes_up"] for r in rows[1:])
    # the sha names the saved final adapter
    assert state_sha256(load_file(str(tmp_path / "adapter.safetensors"))) == on_disk["final_state_sha256"]
    assert (tmp_path / "checkpoints" / "round_0002" / "adapter.safetensors").is_file()
    assert "| rouge_l |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "config.toml").is_file()
    # the expert usage of a tier-1 client sums to one per token
    usage = on_disk["expert_usage"]
    assert all(abs(sum(u) - 1) < 1e-6 for u in usage.values())


def test_same_seed_same_result_and_other_seed_differs(tmp_path):
    a = run_local(tiny_cfg("rounds=1"), tmp_path / "a")
    b = run_local(tiny_cfg("rounds=1"), tmp_path / "b")
    c = run_local(tiny_cfg("rounds=1", "seed=1"), tmp_path / "c")
    assert a["final_state_sha256"] == b["final_state_sha256"]
    assert a["metrics"] == b["metrics"]
    assert c["final_state_sha256"] != a["final_state_sha256"]


def test_training_lowers_the_loss(tmp_path):
    run_local(tiny_cfg("rounds=3", "train.local_steps=4"), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1:]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]


def test_partial_participation_selects_a_fraction(tmp_path):
    engine = LocalEngine(tiny_cfg("fed.sample_fraction=0.5", "rounds=1"), tmp_path)
    picks = [engine.select(r) for r in (1, 2, 3)]
    assert all(len(p) == 3 and p == sorted(set(p)) for p in picks)
    assert len({tuple(p) for p in picks}) > 1  # rounds draw different clients


def test_failing_and_nan_clients_are_excluded_and_logged(tmp_path):
    engine = LocalEngine(tiny_cfg("rounds=1"), tmp_path)
    original = engine.method.client_update

    def flaky(rt, instruction):
        if rt.client_id == 1:
            raise RuntimeError("disk on fire")
        reply = original(rt, instruction)
        if rt.client_id == 2:
            key = next(iter(reply.state))
            reply.state[key] = torch.full_like(reply.state[key], float("nan"))
        return reply

    engine.method.client_update = flaky
    summary = engine.run()
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][1]
    assert row["clients"] == [0, 3, 4, 5]
    assert "disk on fire" in row["rejected"]["1"] and "non-finite" in row["rejected"]["2"]
    final = load_file(str(tmp_path / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values())
    assert summary["metrics"]["rouge_l"] >= 0


def test_too_few_replies_stops_with_a_clear_message(tmp_path):
    engine = LocalEngine(tiny_cfg("rounds=1", "fed.min_clients=6"), tmp_path)
    original = engine.method.client_update

    def fail_one(rt, instruction):
        if rt.client_id == 0:
            raise RuntimeError("gone")
        return original(rt, instruction)

    engine.method.client_update = fail_one
    with pytest.raises(RoundFailed, match="5 acceptable replies, fed.min_clients = 6"):
        engine.run()


def test_category_only_file_reaches_every_client_and_the_summary_says_how(tmp_path, caplog):
    caplog.set_level("INFO", logger="fedmole")
    cats = ["order", "select", "count", "case", "math", "misc"]
    rows = [{"instruction": f"Task {c}.", "input": f"x{i}", "output": f"y{i}", "category": c}
            for c in cats for i in range(30)]
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    # the default partition is `task`; no cap on rows per task, and the tiny config's own task list cleared
    summary = run_local(tiny_cfg("rounds=1", f"data.source='{data}'", "data.max_test=0", "data.max_per_task=0",
                                 "data.max_val=0", "data.tasks=[]"), tmp_path / "run")
    d = summary["data"]
    assert (d["rows_loaded"], d["rows_assigned"], d["rows_used"]) == (180, 180, 180)  # every row reaches a client
    assert sorted(c["tasks"][0] for c in d["clients"]) == sorted(cats)
    for c in d["clients"]:
        assert c["train"] + c["val"] + c["test"] + c["aux"] == 30 and c["val"] >= 1 and c["test"] >= 1
        assert c["categories"] == {c["tasks"][0]: 30} and c["name"] == c["tasks"][0]
    assert [c["tier"] for c in d["clients"]] == [4, 4, 2, 2, 1, 1]
    assert "180 rows have no `task` field: their `category` is their task" in caplog.text
    assert "| count | " in (tmp_path / "run" / "report.md").read_text()  # report.md shows the partition


def test_data_errors_surface_before_the_model_loads(tmp_path, monkeypatch):
    from fedmole.data.sources import DataError
    from fedmole.engine import setup

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(setup, "load_base", no_model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1: missing required field 'output'"):
        LocalEngine(tiny_cfg(f"data.source='{bad}'"), tmp_path / "run")


def test_flame_on_a_tiny_moe_base_runs_end_to_end(tmp_path):
    cfg = load_config("configs/tiny-moe.toml", ["rounds=2", "run.progress=false", "train.local_steps=2",
                                                "data.max_test=2", "eval.max_new_tokens=2"])
    summary = run_local(cfg, tmp_path)
    assert set(summary["per_tier"]) == {"4", "2", "1"}
    flops = {t: v["flops_per_token"] for t, v in summary["compute"]["per_tier"].items()}
    assert flops["4"] > flops["2"] > flops["1"] > 0  # a lower tier runs fewer whole experts
    assert all(v["step_seconds"] > 0 for v in summary["compute"]["per_tier"].values())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    shares = rows[-1]["expert_weight_share"]
    assert set(shares) == {"4", "2", "1"} and shares["4"] > shares["1"] > 0  # t = 2 favours the busy tiers
    state = load_file(str(tmp_path / "adapter.safetensors"))
    assert any(k.endswith("lora_gate_up_A") for k in state) and any(k.endswith(".rescale") for k in state)
    assert "Expert aggregation weight by tier" in (tmp_path / "report.md").read_text()
