"""The run directory: resolved config, per-round metrics, summary, checkpoints.

    RUN_DIR/config.toml         resolved configuration
    RUN_DIR/metrics.jsonl       one JSON object per round (round 0 = before training)
    RUN_DIR/summary.json        final figures
    RUN_DIR/adapter.safetensors final global adapter
    RUN_DIR/checkpoints/round_NNNN/  global adapter + server state + which client state + meta, atomically
    RUN_DIR/client_state/       what each client keeps between rounds (fedmole.engine.client_state)
    RUN_DIR/report.md           Markdown report with plots

Every metric row so far is part of each checkpoint's meta.json, so a resume
rewrites metrics.jsonl from the checkpoint it continues from: a row is never
lost (killed between the checkpoint and the append) nor repeated. JSON files
never hold NaN or infinity: such values are written as null, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import tomli_w
import torch
from safetensors.torch import load_file, save_file

from fedmole.messages import State

log = logging.getLogger("fedmole")


def new_run_dir(parent: str | Path, method: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{method}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


def json_safe(obj, where: str = ""):
    """`obj` with every non-finite float replaced by None (logged), so json.dumps(allow_nan=False) holds."""
    if isinstance(obj, float) and not math.isfinite(obj):
        log.warning("non-finite value %r at %s written as null", obj, where or "top level")
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON (no NaN / Infinity tokens) of `obj`."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunDir:
    """Writer for one run directory."""

    def __init__(self, path: str | Path, keep_checkpoints: int = 2):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.keep = keep_checkpoints

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, cfg_dict: dict) -> None:
        def clean(v):  # TOML has no null
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items() if x is not None}
            return v

        _atomic_write(self.path / "config.toml", tomli_w.dumps(clean(cfg_dict)))

    def log_round(self, row: dict) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with `rows` (a fresh start, or the rows of the checkpoint resumed from)."""
        _atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", dumps(summary, indent=2))

    def save_adapter(self, state: State, name: str = "adapter.safetensors") -> Path:
        target = self.path / name
        tmp = target.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, target)
        return target

    def checkpoint(self, rnd: int, global_state: State, server_state: dict, clients: dict, meta: dict) -> Path:
        """Write checkpoints/round_NNNN atomically and prune old ones.

        `clients` (clients.json) names the client state the checkpoint continues from
        (client -> [version, record SHA-256], see `RunClientStates.manifest`); the state
        itself is already on disk. Files go to a temporary folder, `meta.json` (with the
        SHA-256 of every other file) is written last, and the folder is renamed into
        place, so a checkpoint either exists whole or not at all.
        """
        root = self.path / "checkpoints"
        root.mkdir(exist_ok=True)
        final = root / f"round_{rnd:04d}"
        tmp = root / f".round_{rnd:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "adapter.safetensors"))
        torch.save(server_state, tmp / "server.pt")
        (tmp / "clients.json").write_text(json.dumps(clients))
        files = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(dumps({"round": rnd, "files": files, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if p.name.startswith("round_"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def checkpoint_rounds(self) -> list[int]:
        """Rounds of the checkpoint folders on disk, ascending."""
        root = self.path / "checkpoints"
        return sorted(int(p.name.removeprefix("round_")) for p in root.glob("round_*")) if root.is_dir() else []

    def newest_meta(self) -> dict:
        """meta.json of the newest checkpoint folder ({} when there is none or it is unreadable)."""
        root = self.path / "checkpoints"
        for ckpt in sorted(root.glob("round_*"), reverse=True) if root.is_dir() else []:
            try:
                return json.loads((ckpt / "meta.json").read_text())
            except (OSError, ValueError):
                continue
        return {}

    def load_checkpoint(self) -> dict | None:
        """The newest checkpoint whose files match their checksums, or None.

        A damaged checkpoint (missing file, bad JSON, checksum mismatch,
        unreadable tensors) is skipped with a warning naming the reason.
        """
        root = self.path / "checkpoints"
        candidates = sorted((p for p in root.glob("round_*") if p.is_dir()), reverse=True) if root.is_dir() else []
        for ckpt in candidates:
            try:
                return _read_checkpoint(ckpt)
            except CheckpointError as e:
                log.warning("checkpoint %s is unusable (%s); trying an older one", ckpt.name, e)
        return None


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or corrupted."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_checkpoint(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"meta.json unreadable: {e}") from None
    for name, digest in files.items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{name} is missing")
        if file_sha256(f) != digest:
            raise CheckpointError(f"{name} does not match its checksum")
    try:
        state = load_file(str(ckpt / "adapter.safetensors"))
        server = torch.load(ckpt / "server.pt", weights_only=True)
        clients = json.loads((ckpt / "clients.json").read_text()) if "clients.json" in files else None
    except Exception as e:  # checksums matched but the content is not what we write
        raise CheckpointError(f"cannot load: {e}") from None
    return {"path": ckpt, "meta": meta, "global_state": state, "server": server, "clients": clients}
