"""The final evaluation's outputs: predictions.jsonl, cross-tier scores, skipped round 0,
measured compute per tier."""

import json
from statistics import fmean

import pytest
import torch

from fedmole.config import load_config
from fedmole.engine import evaluation
from fedmole.engine.evaluation import evaluate_client, evaluate_clients, read_predictions, tiers_to_evaluate
from fedmole.engine.local import LocalEngine, run_local

TINY = "configs/tiny.toml"
FAST = ["rounds=2", "run.progress=false", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


def tiny_cfg(*extra):
    return load_config(TINY, [*FAST, *extra])


def test_predictions_hold_one_scored_record_per_test_example(tmp_path):
    engine = LocalEngine(tiny_cfg(), tmp_path)
    summary = engine.run()
    records = read_predictions(tmp_path)
    tests = {c.name: c.test for c in engine.setup.clients}
    assert len(records) == sum(len(t) for t in tests.values()) == 24
    for name, examples in tests.items():
        mine = [r for r in records if r["client_name"] == name]
        assert [r["example_id"] for r in mine] == [ex.id for ex in examples]
        assert all(r["tier"] == r["client_tier"] == summary["per_client"][name]["tier"] for r in mine)
        assert [r["references"] for r in mine] == [list(ex.outputs) for ex in examples]
        for r, ex in zip(mine, examples):
            assert set(r) == {"client", "client_name", "client_tier", "tier", "example_id", "prediction",
                              "references", "scores"}
            if ex.options:  # chosen among the options, and scored for accuracy
                assert r["prediction"] in ex.options and set(r["scores"]) == {"rouge_l", "exact_match", "accuracy"}
            else:
                assert set(r["scores"]) == {"rouge_l", "exact_match"}
        assert summary["per_client"][name]["rouge_l"] == pytest.approx(fmean(r["scores"]["rouge_l"] for r in mine))
    ids = [(r["client"], r["example_id"]) for r in records]
    assert len(set(ids)) == len(ids) and all(r["example_id"] for r in records)
    assert "accuracy" in summary["metrics"] and "accuracy" in summary["per_tier"]["4"]


@pytest.mark.parametrize("method,tiers", [("flame", "all"), ("hetlora", "own")])
def test_clients_scored_together_score_as_they_do_one_at_a_time(tmp_path, monkeypatch, method, tiers):
    # batches of 3 prompts straddle clients (4 test examples each), and chunks of 2 batches hold 2 clients
    engine = LocalEngine(tiny_cfg(f"method={method}", f"eval.tiers={tiers}", "eval.batch_size=3"), tmp_path)
    setup = engine.setup
    torch.manual_seed(0)  # a trained-looking state: every tier's view differs from the base model
    start = engine.method.initial_state(setup.adapter)
    state = engine.method.final_state({k: v + 0.1 * torch.randn_like(v) for k, v in start.items()})
    at = tiers_to_evaluate(setup)
    ids = sorted(setup.client_data)
    alone = [evaluate_client(setup, setup.runtime(c, train=False), state, at) for c in ids]

    calls = []
    predict = evaluation.predict
    monkeypatch.setattr(evaluation, "predict", lambda model, tok, examples, *a, **k: calls.append(len(examples))
                        or predict(model, tok, examples, *a, **k))
    monkeypatch.setattr(evaluation, "CHUNK_BATCHES", 2)
    together = list(evaluate_clients(setup, (setup.runtime(c, train=False) for c in ids), state, at))
    assert together == alone  # per-client and per-tier means, and every record with its prediction
    labels = 3 if tiers == "all" else 1
    assert calls == [8] * 3 * labels  # three chunks of two clients, one call per tier each
    assert len({r["prediction"] for res in alone for r in res["records"]}) > 1


def test_a_personalised_method_scores_each_client_with_its_own_model(tmp_path, monkeypatch):
    engine = LocalEngine(tiny_cfg("method=local"), tmp_path)
    calls = []
    predict = evaluation.predict
    monkeypatch.setattr(evaluation, "predict", lambda model, tok, examples, *a, **k: calls.append(len(examples))
                        or predict(model, tok, examples, *a, **k))
    state = engine.method.initial_state(engine.setup.adapter)
    ids = sorted(engine.setup.client_data)
    results = list(evaluate_clients(engine.setup, (engine.pool.open(c, train=False) for c in ids), state))
    assert [r["client_id"] for r in results] == ids and calls == [4] * 6


def test_cross_tier_evaluation_scores_every_client_at_every_tier(tmp_path):
    summary = run_local(tiny_cfg("eval.tiers=all", "rounds=1", "eval.before=false"), tmp_path / "flame")
    records = read_predictions(tmp_path / "flame")
    assert {r["tier"] for r in records} == {4, 2, 1} and len(records) == 3 * 24
    assert all(info["clients"] == 6 for info in summary["per_tier"].values())
    for name, info in summary["per_client"].items():
        assert info["by_tier"].keys() == {"4", "2", "1"}
        assert info["rouge_l"] == info["by_tier"][str(info["tier"])]["rouge_l"]  # headline: own tier
    rows = [json.loads(line) for line in (tmp_path / "flame" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and summary["baseline_metrics"] is None  # no round 0
    assert "| client |" in (tmp_path / "flame" / "report.md").read_text()

    hetlora = run_local(tiny_cfg("eval.tiers=all", "rounds=1", "method=hetlora"), tmp_path / "hetlora")
    assert all(info["by_tier"].keys() == {"4", "2", "1"} for info in hetlora["per_client"].values())
    # a personal model has one size: local-only clients are scored at their own tier only
    local = run_local(tiny_cfg("eval.tiers=all", "rounds=1", "method=local"), tmp_path / "local")
    assert all(info["by_tier"].keys() == {str(info["tier"])} for info in local["per_client"].values())
    assert {r["tier"] == r["client_tier"] for r in read_predictions(tmp_path / "local")} == {True}


def test_compute_per_tier_counts_every_client_round(tmp_path):
    summary = run_local(tiny_cfg("train.local_steps=3"), tmp_path)
    per_tier = summary["compute"]["per_tier"]
    assert list(per_tier) == ["4", "2", "1"]
    for info in per_tier.values():  # two clients per tier, two rounds, three steps each
        assert len(info["samples"]) == 4 and info["steps"] == 12
        assert min(info["samples"]) <= info["step_seconds"] <= max(info["samples"])
        assert all(s > 0 for s in info["samples"])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [len(r.get("compute", [])) for r in rows] == [0, 6, 6]


def test_validation_split_is_scored_when_asked_and_must_exist(tmp_path):
    engine = LocalEngine(tiny_cfg("eval.split=val", "data.max_val=3", "rounds=1"), tmp_path / "val")
    engine.run()
    records = read_predictions(tmp_path / "val")
    val_ids = {ex.id for c in engine.setup.clients for ex in c.val}
    assert len(records) == 18 and {r["example_id"] for r in records} <= val_ids
    with pytest.raises(ValueError, match="has no val examples"):
        run_local(tiny_cfg("eval.split=val", "data.val_frac=0.0", "rounds=1"), tmp_path / "none")
