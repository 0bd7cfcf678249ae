"""What a personalised run evaluated, on disk: one adapter file per client and their joint fingerprint.

    RUN_DIR/clients/<id>-<name>.safetensors   the state client <id> was evaluated with
                                              (`Method.evaluated_state`), metadata: client, tier, sha256

Under the personalised protocol every client is scored with its own model, so
the run's `final_state_sha256` is `joint_sha256` of the per-client fingerprints
that evaluation reported (`state_sha256` in each `per_client` entry), and these
files are what hashes to them. A file is written only where this process holds
the client's state and it matches the fingerprint evaluation reported: on the
Flower engines the clients' own models stay on their nodes, and no file is written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedmole.algorithms.base import ClientRuntime
from fedmole.messages import State, state_sha256

log = logging.getLogger("fedmole")

CLIENTS_DIR = "clients"


def client_file(run_dir: str | Path, client_id: int, name: str) -> Path:
    """RUN_DIR/clients/<id>-<name>.safetensors, the name reduced to safe file-name characters."""
    safe = re.sub(r"[^\w.-]+", "_", name).strip("._") or "client"
    return Path(run_dir) / CLIENTS_DIR / f"{client_id:03d}-{safe}.safetensors"


def joint_sha256(shas: Mapping[int, str]) -> str:
    """One fingerprint of every client's evaluated state: sha256 over `<id>:<sha>` lines in id order."""
    h = hashlib.sha256()
    for client_id in sorted(shas):
        h.update(f"{client_id}:{shas[client_id]}\n".encode())
    return h.hexdigest()


def evaluated_sha256(per_client: Mapping[str, dict]) -> str:
    """The joint fingerprint of a personalised evaluation (`per_client` as `summarise` keeps it)."""
    missing = sorted(name for name, m in per_client.items() if "state_sha256" not in m)
    if missing:
        raise ValueError(f"personalised evaluation without a state fingerprint for clients {missing[:3]}")
    return joint_sha256({int(m["client_id"]): m["state_sha256"] for m in per_client.values()})


def save_client_states(run_dir: str | Path, method, runtimes: Iterable[ClientRuntime], global_state: State,
                       per_client: Mapping[str, dict]) -> list[Path]:
    """Write each client's evaluated state (`method.evaluated_state`) whose fingerprint matches what its
    evaluation reported; `runtimes` hold the clients' kept state and may be opened one at a time."""
    written, elsewhere = [], []
    for rt in runtimes:
        result = per_client.get(rt.data.name) or {}
        state = method.evaluated_state(rt, global_state)
        sha = state_sha256(state)
        if sha != result.get("state_sha256"):
            elsewhere.append(rt.client_id)
            continue
        path = client_file(run_dir, rt.client_id, rt.data.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata={"client": rt.data.name, "client_id": str(rt.client_id), "tier": str(rt.tier),
                            "sha256": sha})
        os.replace(tmp, path)
        written.append(path)
    if elsewhere:
        log.info("clients %s were evaluated with models this process does not hold (they stay where they "
                 "trained); no adapter file for them in %s", elsewhere, Path(run_dir) / CLIENTS_DIR)
    return written


def load_client_state(run_dir: str | Path, client_id: int) -> State:
    """The evaluated state of client `client_id`, checked against the fingerprint it was saved with."""
    found = sorted((Path(run_dir) / CLIENTS_DIR).glob(f"{client_id:03d}-*.safetensors"))
    if not found:
        raise FileNotFoundError(f"no {CLIENTS_DIR}/{client_id:03d}-*.safetensors in {run_dir}")
    with safe_open(str(found[0]), framework="pt") as f:
        expected = (f.metadata() or {}).get("sha256")
    state = load_file(str(found[0]))
    if state_sha256(state) != expected:
        raise ValueError(f"{found[0]} does not match the fingerprint it was saved with")
    return state
