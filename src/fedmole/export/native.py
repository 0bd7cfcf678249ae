"""fedmole's own adapter format, for adapters PEFT cannot express (mixtures of LoRA experts).

An exported adapter is a directory with two files:

    fedmole-adapter.json   what to inject: format, version, kind (mole | moe-lora | amole | lora),
                           method, base_model, modules (adapted module names), adapter
                           (the adapter settings: experts, rank, alpha, ...), k_max, tiers
                           (the tiers it was trained at), tier (the default k), client
    adapter.safetensors    the tensors, keyed `<module>.<tensor>` as in the run directory;
                           the safetensors metadata repeats the JSON under "config"

`load_adapter(model, path, tier=K)` injects the adapter into a freshly loaded
base model, loads the tensors, fixes the tier and puts the model in eval mode.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fedmole.adapters.amole import AMoLEAdapter, AMoLEConfig, inject_amole
from fedmole.adapters.inject import MoLEAdapter, MoLEConfig, State, inject_mole, split_key
from fedmole.adapters.lora import LoRAAdapter, LoRAConfig, inject_lora, truncate_lora
from fedmole.adapters.moe_lora import MoELoRABlock, inject_moe_lora

log = logging.getLogger("fedmole")

FORMAT = "fedmole-adapter"
VERSION = 1
CONFIG_FILE = "fedmole-adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
KINDS = ("mole", "moe-lora", "amole", "lora")


class ExportError(ValueError):
    """An adapter cannot be written or read in the format asked for; the message says why."""


def adapter_kind(adapter: MoLEAdapter) -> str:
    """mole (dense MoLE), moe-lora (LoRA on a sparse base's experts), amole (FedAMoLE) or lora."""
    if isinstance(adapter, LoRAAdapter):
        return "lora"
    if isinstance(adapter, AMoLEAdapter):
        return "amole"
    if isinstance(next(iter(adapter.layers.values())), MoELoRABlock):
        return "moe-lora"
    return "mole"


def native_export(loaded) -> tuple[dict, State]:
    """(config, tensors) of a loaded run's adapter in its current view (`fedmole.inference.LoadedRun`)."""
    from fedmole import __version__
    from fedmole.config import assign_tiers

    adapter, cfg = loaded.adapter, loaded.cfg
    kind = adapter_kind(adapter)
    tiers = sorted(set(assign_tiers(cfg)), reverse=True)
    settings = dataclasses.asdict(adapter.cfg)
    k_max = max(tiers)
    if kind == "lora":
        rank = adapter.rank_of(loaded.k)
        settings.update(rank=rank, rank_per_tier=0)
        state = {**truncate_lora(adapter.state_dict(), rank), **loaded.extras}  # extras: FLoRA's merged deltas
        k_max = loaded.k
    elif kind == "amole":
        state = adapter.held_state() if loaded.client is not None else adapter.state_dict()
    else:
        state = adapter.state_dict()
    if kind != "moe-lora":
        settings["targets"] = list(adapter.layers)  # exact module names: no matching rule to reproduce
    config = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "method": cfg.run.method,
        "base_model": cfg.model.name,
        "modules": list(adapter.layers),
        "adapter": settings,
        "k_max": k_max,
        "tiers": tiers,
        "tier": loaded.k,
        "client": loaded.client.name if loaded.client is not None else None,
        "held_view": kind == "amole" and loaded.client is not None,
        "fedmole_version": __version__,
    }
    return config, state


def save_native(out: str | Path, config: dict, state: State) -> Path:
    """Write `fedmole-adapter.json` and `adapter.safetensors` into the directory `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": FORMAT, "config": json.dumps(config)})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_native(path: str | Path) -> tuple[dict, State]:
    """(config, tensors) of an exported adapter: its directory, or the .safetensors file alone."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise ExportError(f"{path}: no {WEIGHTS_FILE}; expected a directory written by `fedmole export --format fedmole`")
    if path.is_dir() and (path / CONFIG_FILE).is_file():
        config = json.loads((path / CONFIG_FILE).read_text())
    else:
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or "config" not in meta:
            raise ExportError(f"{weights} carries no fedmole adapter metadata (format {meta.get('format')!r})")
        config = json.loads(meta["config"])
    if config.get("format") != FORMAT or config.get("kind") not in KINDS:
        raise ExportError(f"{path}: format {config.get('format')!r}, kind {config.get('kind')!r}; "
                          f"expected format {FORMAT!r} with kind one of {', '.join(KINDS)}")
    if config.get("version", 0) > VERSION:
        raise ExportError(f"{path}: format version {config['version']} is newer than this fedmole reads ({VERSION})")
    return config, load_file(str(weights))


def _settings(cls: type, given: dict) -> object:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        log.warning("adapter settings %s are unknown to this fedmole version and ignored", unknown)
    return cls(**{k: v for k, v in given.items() if k in known})


def load_adapter(model: nn.Module, path: str | Path, tier: int | None = None) -> MoLEAdapter:
    """Inject an exported fedmole adapter into `model` (the base model, in place) and load it.

    `tier` is the number of experts each token activates (mole, moe-lora), default the
    exported `tier`; an amole (FedAMoLE) or lora adapter has one setting and accepts
    only that. Returns the adapter handle (`.model` is `model`), ready for inference:
    eval mode, dropout off, every forward at the chosen tier.
    """
    config, state = read_native(path)
    kind, settings = config["kind"], config["adapter"]
    if kind == "mole":
        adapter = inject_mole(model, _settings(MoLEConfig, settings), k_max=config["k_max"])
    elif kind == "moe-lora":
        mole = _settings(MoLEConfig, settings)
        adapter = inject_moe_lora(model, mole, k_max=config["k_max"], train_router=mole.train_router)
    elif kind == "amole":
        adapter = inject_amole(model, _settings(AMoLEConfig, settings))
    else:
        adapter = inject_lora(model, _settings(LoRAConfig, settings))

    if kind == "lora":
        merged = {split_key(k)[0]: v for k, v in state.items() if split_key(k)[1] == "merged"}
        adapter.set_merged(merged)
        adapter.load_state_dict({k: v for k, v in state.items() if split_key(k)[1] != "merged"})
    elif config.get("held_view"):
        adapter.load_held_state(state)
    else:
        adapter.load_state_dict(state)

    k = config["tier"] if tier is None else int(tier)
    if kind in ("amole", "lora"):
        if k != config["tier"]:
            raise ExportError(f"this {kind} adapter runs at tier {config['tier']} only (exported from "
                              f"{config['method']}); tier={tier} does not apply")
    else:
        limit = max(getattr(layer, "top_k", layer.num_experts) for layer in adapter.layers.values())
        if not 1 <= k <= limit:
            raise ExportError(f"tier={k}: this adapter activates 1..{limit} experts per token")
    if kind == "lora":
        adapter.fix_rank(settings["rank"])  # the layers already run this rank; route(k) keeps it too
    else:
        adapter.routing.k = k if kind != "amole" else settings["top_k"]
    model.eval()
    return adapter
