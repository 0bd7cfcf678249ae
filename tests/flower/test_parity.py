"""Same seed, same result: the tiny run on the local engine and on Flower's Simulation Engine.

Both engines run the same round loop, clients get the same seeds, tensors travel
bit-exactly at float32 and the Ray actor computes with the local engine's thread
count, so the tolerance is zero: identical final adapter (sha256) and metrics.
"""

import json

from fedmole.cli import main
from fedmole.config import load_config
from fedmole.engine.local import run_local

FAST = ["rounds=2", "run.progress=false", "run.threads=1", "train.local_steps=2", "data.max_test=4",
        "eval.max_new_tokens=4"]


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_flower_simulation_matches_the_local_engine(tmp_path):
    local = run_local(load_config("configs/tiny.toml", FAST), tmp_path / "local")
    args = [a for kv in FAST for a in ("--set", kv)]
    assert main(["run", "configs/tiny.toml", *args, "--set", "run.engine=flower-sim",
                 "--out", str(tmp_path / "sim")]) == 0
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())

    assert sim["engine"] == "flower-sim" and local["engine"] == "local"
    assert sim["final_state_sha256"] == local["final_state_sha256"]
    for key in ("metrics", "baseline_metrics", "per_client", "per_tier", "comm_bytes", "expert_usage"):
        assert sim[key] == local[key], key
    drop = {"seconds", "compute"}  # wall times differ; the measured step times with them
    assert [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "sim")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / "local")]
    def untimed(path):
        return [[{k: c[k] for k in ("client", "tier", "steps")} for c in r.get("compute", [])] for r in _rows(path)]

    assert untimed(tmp_path / "sim") == untimed(tmp_path / "local") and untimed(tmp_path / "sim")[-1]
    assert (tmp_path / "sim" / "report.md").is_file()
