"""Export what a run trained: a PEFT adapter, fedmole's own adapter format, or a merged model.

    export_run(RUN_DIR, OUT, fmt="peft" | "fedmole", client=None, tier=None, merge=False)

Single-LoRA methods export to PEFT (`export/peft.py`); mixtures of LoRA experts
to the fedmole format (`export/native.py`, loaded with `fedmole.load_adapter`);
`merge` folds the adapter into the base weights where that is exact
(`export/merge.py`). A personalised run (always for local and FedAMoLE) exports
one adapter per client, in a folder per client name, unless `client` picks one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedmole.export.native import ExportError, load_adapter

FORMATS = ("peft", "fedmole")


@dataclass
class Exported:
    """One written export: where, in which format, for which client and tier."""

    path: Path
    format: str  # peft | fedmole | merged
    client: str | None
    tier: int
    base_model: str


def base_model_reference(spec: str) -> str:
    """What an export names as its base: the checkpoint directory for the embedded model and local
    directories (the adapter was trained on exactly those weights), else the spec as given."""
    from fedmole.assets import EMBEDDED_MODELS, resolve_model

    if spec in EMBEDDED_MODELS or Path(spec).expanduser().is_dir():
        return resolve_model(spec)
    return spec


def _folder(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "client"


def export_run(run_dir: str | Path, out: str | Path, *, fmt: str | None = None, client: str | int | None = None,
               tier: int | None = None, merge: bool = False) -> list[Exported]:
    """Export a finished run into `out`; returns what was written (one entry per client for
    personalised runs without `client`). `fmt` defaults to peft for single-LoRA methods,
    else fedmole; `merge` writes a standalone Hugging Face model instead of an adapter."""
    from fedmole.config import eval_protocol, load_config
    from fedmole.export.merge import save_merged
    from fedmole.export.native import native_export, save_native
    from fedmole.export.peft import peft_export, save_peft
    from fedmole.inference import check_run_dir, find_client, load_run, run_clients

    if fmt is not None and fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if merge and fmt is not None:
        raise ExportError("--merge writes a full Hugging Face model; it takes no --format")
    run_dir, out = check_run_dir(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new --out")
    cfg = load_config(run_dir / "config.toml")
    clients = run_clients(run_dir)
    if eval_protocol(cfg) == "personalized" and client is None:
        targets = [(c.name, out / _folder(c.name)) for c in clients]
    else:
        targets = [(find_client(clients, client).name if client is not None else None, out)]
    base = base_model_reference(cfg.model.name)

    written = []
    for name, dest in targets:
        loaded = load_run(run_dir, client=name, tier=tier, device="cpu")
        kind = "merged"
        if merge:
            save_merged(loaded, dest)
        else:
            kind = fmt or ("peft" if _single_lora(loaded) else "fedmole")
            if kind == "peft":
                save_peft(dest, *peft_export(loaded, base))
            else:
                save_native(dest, *native_export(loaded))
        written.append(Exported(dest, kind, name, loaded.k, base))
    return written


def _single_lora(loaded) -> bool:
    from fedmole.adapters.lora import LoRAAdapter

    return isinstance(loaded.adapter, LoRAAdapter)


__all__ = ["export_run", "load_adapter", "ExportError", "Exported", "FORMATS"]
