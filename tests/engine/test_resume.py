"""Checkpoints and resume: a killed run continues to the same final state."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedmole.config import load_config
from fedmole.engine.local import LocalEngine, run_local

ARGS = ["rounds=3", "run.progress=false", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


def fedmole(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedmole", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_run_resumes_to_the_same_final_state(tmp_path):
    reference = run_local(load_config("configs/tiny.toml", ARGS), tmp_path / "ref")

    run_dir = tmp_path / "killed"
    sets = [x for a in ARGS for x in ("--set", a)]
    proc = fedmole("run", "configs/tiny.toml", *sets, "--out", str(run_dir))
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "round_0001").exists():  # wait for round 1 to be saved
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()

    out = subprocess.run([sys.executable, "-m", "fedmole", "resume", str(run_dir)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
    assert summary["metrics"] == reference["metrics"]
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]


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


def test_resume_without_checkpoints_starts_over(tmp_path, caplog):
    cfg = load_config("configs/tiny.toml", ARGS[1:] + ["rounds=1"])
    run_dir = tmp_path / "run"
    engine = LocalEngine(cfg, run_dir)
    engine.out.write_config(cfg.to_dict())
    summary = engine.run(resume=True)
    assert "no usable checkpoint" in caplog.text
    assert summary["rounds"] == 1 and Path(run_dir / "summary.json").exists()
