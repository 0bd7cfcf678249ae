"""`run.engine = "flower-sim"`: a fedmole run on Flower's Simulation Engine.

One virtual SuperNode per client (`partition-id` = client id); the ServerApp
runs in this process, the ClientApps in Ray actors. Each actor claims as many
CPUs as its torch threads (`run.threads`; every CPU when 0), so with
`run.threads = 1` a machine of n cores runs n clients at once, and with the
default clients run one after another with all cores, as on the local engine.
Either way the actors run torch with the local engine's thread count, which
keeps results bit-identical to it. Each actor builds its own Setup (a base
model) when it first gets a message.

Each virtual node keeps its client's state between rounds in files under
RUN_DIR/node-state/ (fedmole.flower.client_app), not in the node's context, so
memory follows the clients of a round, not the number of virtual nodes.

Nothing listens beyond loopback: Ray runs in its single-machine mode (every
Ray server, the GCS, raylet, workers, the runtime-env agent and the driver,
binds 127.0.0.1; without it they listen on every interface, unauthenticated)
and without its dashboard.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fedmole.config import Config, ConfigError

STATE_DIR_ENV = "FEDMOLE_NODE_STATE_DIR"  # read by fedmole.flower.client_app.state_dir
NODE_STATE = "node-state"  # RUN_DIR/node-state: the virtual nodes' client state


def run_flower_sim(cfg: Config, run_dir: str | Path, *, resume: bool = False,
                   cpus_per_client: int | None = None, client_app=None) -> dict:
    """Run `cfg` on the Simulation Engine, write `run_dir`, return the summary.

    cpus_per_client: CPUs each Ray actor claims (default: run.threads, every CPU when 0).
    client_app: the ClientApp the virtual nodes run (fedmole's by default; a wrapper of it
    must live in an importable module, since Ray ships it to the actors by reference).
    """
    if resume:
        from fedmole.engine.local import ResumeError

        raise ResumeError("a flower-sim run cannot be resumed: its checkpoints hold only the server's half, "
                          "and the virtual nodes' client state is not versioned with them; start a new run")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU actors; silences a Ray notice
    loopback_ray()
    logging.getLogger("flwr").propagate = False  # flwr prints through its own handler; no duplicates
    try:
        from flwr.simulation import run_simulation
    except ImportError as e:
        raise ConfigError(f"run.engine = 'flower-sim' needs Flower ({e}); install it with "
                          "pip install -e '.[flower]'") from None

    from fedmole.flower.server_app import make_server_app

    if client_app is None:
        from fedmole.flower.client_app import app as client_app

    cpus = os.cpu_count() or 1
    summary: dict = {}
    # the virtual nodes keep their clients' state in the run directory (Ray's processes inherit it)
    before = os.environ.get(STATE_DIR_ENV)
    os.environ[STATE_DIR_ENV] = str(Path(run_dir).resolve() / NODE_STATE)
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, on_summary=summary.update),
            client_app=client_app,
            num_supernodes=cfg.data.num_clients,
            backend_config={
                "client_resources": {"num_cpus": cpus_per_client or actor_cpus(cfg, cpus), "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                              "_node_ip_address": "127.0.0.1"},
            },
        )
    finally:
        if before is None:
            os.environ.pop(STATE_DIR_ENV, None)
        else:
            os.environ[STATE_DIR_ENV] = before
    if not summary:
        raise RuntimeError("the Flower simulation ended without a summary; its log above says why")
    return summary


def actor_cpus(cfg: Config, cpus: int) -> int:
    """CPUs a client's Ray actor claims on a machine of `cpus`: its torch threads (run.threads),
    all of them when 0; Ray then runs cpus // that many actors side by side."""
    return min(cfg.run.threads or cpus, cpus)


def loopback_ray() -> None:
    """Make the Ray started for the simulation bind every server to loopback.

    Ray's single-machine mode (its default on macOS and Windows) resolves the node
    address to 127.0.0.1 and binds there; `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` turns it
    on for Linux too. Ray reads it when imported, in each of its processes (which inherit
    the environment) and in this one; if Ray was imported here before, its already-read
    constant is set too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False
