"""Checkpoints and resume: a killed run continues to the same final state."""

import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

from fedmole.config import load_config
from fedmole.engine.local import LocalEngine, run_local

ARGS = ["rounds=3", "run.progress=false", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


# The child dies by SIGKILL at the worst moment: round 1's checkpoint is on disk, its metric row is not.
KILL_AFTER_CHECKPOINT_1 = """
import os, signal, sys
from fedmole.reporting.rundir import RunDir
log_round = RunDir.log_round
def dying(self, row):
    if row["round"] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    log_round(self, row)
RunDir.log_round = dying
from fedmole.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_between_checkpoint_and_row_resumes_with_every_row_once(tmp_path):
    reference = run_local(load_config("configs/tiny.toml", ARGS), tmp_path / "ref")

    run_dir = tmp_path / "killed"
    sets = [x for a in ARGS for x in ("--set", a)]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT_1, "run", "configs/tiny.toml", *sets,
                             "--out", str(run_dir)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (run_dir / "checkpoints" / "round_0001").is_dir() and not (run_dir / "summary.json").exists()
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0]

    out = subprocess.run([sys.executable, "-m", "fedmole", "resume", str(run_dir)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
    assert summary["metrics"] == reference["metrics"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    drop = ("seconds", "compute")  # wall-clock figures
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref_rows]


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedmole")
    cfg = load_config("configs/tiny.toml", ARGS[1:] + ["rounds=2"])
    reference = run_local(cfg, tmp_path / "ref")
    run_dir = tmp_path / "run"
    run_local(cfg, run_dir)
    (run_dir / "summary.json").unlink()
    newest = run_dir / "checkpoints" / "round_0002" / "adapter.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short

    engine = LocalEngine(cfg, run_dir)
    summary = engine.run(resume=True)
    assert "round_0002 is unusable (adapter.safetensors does not match its checksum)" in caplog.text
    assert "resuming" in caplog.text and "after round 1" in caplog.text
    assert summary["final_state_sha256"] == reference["final_state_sha256"]


def test_resume_without_checkpoints_starts_over_and_replaces_old_rows(tmp_path, caplog):
    cfg = load_config("configs/tiny.toml", ARGS[1:] + ["rounds=1"])
    run_dir = tmp_path / "run"
    engine = LocalEngine(cfg, run_dir)
    engine.out.write_config(cfg.to_dict())
    engine.out.metrics_path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"rou')  # an earlier attempt
    summary = engine.run(resume=True)
    assert "no usable checkpoint" in caplog.text
    assert summary["rounds"] == 1 and Path(run_dir / "summary.json").exists()
    rows = [json.loads(line) for line in engine.out.metrics_path.read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and "train_loss" in rows[1]


def test_a_flower_run_directory_says_why_it_cannot_be_resumed(tmp_path, capsys):
    from fedmole.cli import main

    cfg = load_config("configs/tiny.toml", ARGS[1:] + ["rounds=1"])
    run_dir = tmp_path / "run"
    run_local(cfg, run_dir)
    (run_dir / "summary.json").unlink()
    meta_path = run_dir / "checkpoints" / "round_0001" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["engine"] = "flower"  # what a deployment run's checkpoints record
    meta_path.write_text(json.dumps(meta))
    config = run_dir / "config.toml"  # and, like a deployment server's, a config naming no data it holds
    config.write_text(config.read_text().replace('source = "synthetic"', f'source = "{tmp_path}/nowhere.jsonl"'))
    assert main(["resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "run on the flower engine" in err and "start a new run" in err
