"""A real deployment on loopback: SuperLink + 2 SuperNodes with TLS and node authentication,
each SuperNode a site that reads only its own data file, and a server given no data.

Runs scripts/flower/deploy_local.sh with SITES=1 (certificates, node keys, registration, a
refused unregistered node, one data file per site, `flwr run`, shutdown) in its own process
group, which is killed whatever happens; then checks the run against the local engine.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmole.config import load_config
from fedmole.engine.local import run_local

SCRIPT = Path("scripts/flower/deploy_local.sh")
OVERRIDES = ["rounds=1", "run.threads=1", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4",
             "run.progress=false"]


def test_two_authenticated_sites_with_their_own_data_complete_a_run(tmp_path):
    missing = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
    assert not missing, f"the deployment scripts need {missing} (Debian: openssl, openssh-client)"
    env = dict(os.environ, TIERS="4 2", OVERRIDES=" ".join(OVERRIDES), TIMEOUT="300", SITES="1",
               VENV=str(Path(sys.executable).parent.parent))
    proc = subprocess.Popen(["bash", str(SCRIPT), "2", str(tmp_path / "deploy")], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=330)
    finally:  # the script stops what it started; this is the backstop
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, out
    assert "not registered is refused" in out
    sites = tmp_path / "deploy" / "sites"
    for i in (0, 1):  # each node opened its own site file, and no other
        line = next(x for x in out.splitlines() if x.strip().startswith(f"node {i} read:"))
        assert line.split("read:")[1].split() == ["site", "data", "of", "client", str(i), "from",
                                                  str(sites / f"site_{i}" / "data.jsonl")], line

    summary = json.loads((tmp_path / "deploy" / "run" / "summary.json").read_text())
    assert summary["engine"] == "flower" and list(summary["per_tier"]) == ["4", "2"]
    local = run_local(load_config("configs/tiny.toml", [*OVERRIDES, "data.num_clients=2", "fed.tiers=[4,2]"]),
                      tmp_path / "local")
    assert summary["final_state_sha256"] == local["final_state_sha256"]
    assert summary["metrics"] == local["metrics"] and summary["comm_bytes"] == local["comm_bytes"]
