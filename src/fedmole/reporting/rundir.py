"""The run directory: resolved config, per-round metrics, summary, checkpoints.

    RUN_DIR/config.toml         resolved configuration
    RUN_DIR/metrics.jsonl       one JSON object per round (round 0 = before training)
    RUN_DIR/summary.json        final figures
    RUN_DIR/adapter.safetensors final global adapter
    RUN_DIR/checkpoints/round_NNNN/  global adapter + server state + meta, written atomically
    RUN_DIR/report.md           Markdown report with plots
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import tomli_w
import torch
from safetensors.torch import save_file

from fedmole.messages import State


def new_run_dir(parent: str | Path, method: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{method}-{stamp}"
    path, i = base, 1
    while path.exists():
        path, i = Path(f"{base}-{i}"), i + 1
    return path


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
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict) -> None:
        _atomic_write(self.path / "summary.json", json.dumps(summary, indent=2))

    def save_adapter(self, state: State, name: str = "adapter.safetensors") -> Path:
        target = self.path / name
        tmp = target.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        os.replace(tmp, target)
        return target

    def checkpoint(self, rnd: int, global_state: State, server_state: dict, meta: dict) -> Path:
        """Write checkpoints/round_NNNN atomically (temp folder + rename) and prune old ones."""
        root = self.path / "checkpoints"
        root.mkdir(exist_ok=True)
        final = root / f"round_{rnd:04d}"
        tmp = root / f".round_{rnd:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "adapter.safetensors"))
        torch.save(server_state, tmp / "server.pt")
        (tmp / "meta.json").write_text(json.dumps({"round": rnd, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in root.iterdir() if p.name.startswith("round_"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
