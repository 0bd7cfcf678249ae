"""Per-round metrics to TensorBoard and MLflow (`run.tracker`)."""

import sys
import types

import pytest

from fedmole.config import load_config
from fedmole.engine.local import run_local
from fedmole.reporting.tracker import numeric_fields, open_tracker

FAST = ["rounds=2", "run.progress=false", "train.local_steps=1", "data.num_clients=2", "fed.tiers=[2,1]",
        "data.max_test=2", "eval.max_new_tokens=2", "data.max_per_task=16", "eval.every=1"]


def test_numeric_fields_skip_the_round_lists_and_flags():
    row = {"round": 3, "train_loss": 1.5, "clients": [0, 1], "rejected": {}, "num_rejected": 0, "ok": True}
    assert numeric_fields(row) == {"train_loss": 1.5, "num_rejected": 0.0}


def test_tensorboard_tracker_logs_every_round(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (scripts/setup.sh installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_local(load_config("configs/tiny.toml", [*FAST, "run.tracker=tensorboard"]), tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train_loss")] == [1, 2]
    assert [e.step for e in events.Scalars("rouge_l")] == [0, 1, 2]  # before training, then every round
    assert {"comm_bytes_up", "comm_bytes_down", "seconds"} <= set(events.Tags()["scalars"])


def test_mlflow_tracker_calls(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda params: calls.append(("params", params["run.method"], params["fed.tiers"]))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", step, sorted(metrics)))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = load_config("configs/tiny.toml", FAST)
    tracker = open_tracker("mlflow", tmp_path / "flame-1", cfg.to_dict())
    tracker.log({"round": 1, "train_loss": 2.0, "rouge_l": 10.0, "clients": [0]})
    tracker.close()
    assert calls == [("start", "flame-1"), ("params", "flame", "[2, 1]"), ("metrics", 1, ["rouge_l", "train_loss"]),
                     ("end",)]
