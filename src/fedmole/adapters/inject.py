"""Inject MoLE layers into a Hugging Face causal LM and manage the adapter state.

`inject_mole(model, cfg)` swaps every target linear layer for a `MoLELinear`
and returns a `MoLEAdapter` handle: per-call routing (k, padding mask, count
collection), the auxiliary loss, expert token counts, and the adapter state as
a flat name -> tensor dict with stable keys `<module path>.<tensor name>`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedmole.adapters.mole import RESCALE_MODES, ROUTERS, MoLELinear, Routing

State = dict[str, torch.Tensor]



@dataclass
class MoLEConfig:
    """Adapter settings (spec 1.1 and 1.4)."""

    num_experts: int = 8  # E: LoRA experts per adapted module
    rank: int = 8  # r: rank of each expert
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.05  # dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names, or ["all-linear"]
    router: str = "linear"  # gate type: linear | key (FedAMoLE-style <A_j x, W_t x> / sqrt(r))
    renormalize: bool = False  # renormalise the kept top-k gates to sum to one
    rescale: str = "learned"  # output rescaler: learned | fixed (k_max/k) | off
    shared_expert: bool = False  # add an always-on expert outside the mixture
    aux_loss_weight: float = 1e-3  # weight of the Switch load-balancing loss
    train_router: bool = False  # MoE base: train a copy of the base router (else it stays frozen)
    init_seed: int = 0  # seed of the adapter's initial weights


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the linear modules matched by `targets` (last name component or dotted suffix)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [n for n, m in model.named_modules() if _is_linear(m) and m is not head]
    if targets == ["all-linear"]:
        found = linear
    else:
        found = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        examples = sorted({n.rsplit(".", 1)[-1] for n in linear})[:12]
        raise ValueError(
            f"adapter targets {targets} match no linear layer of {type(model).__name__}; "
            f"layer names found include: {', '.join(examples)} (or use 'all-linear')"
        )
    return found


class MoLEAdapter:
    """Handle over the MoLE layers injected into one model."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], routing: Routing, cfg: MoLEConfig):
        self.model = model
        self.layers = layers
        self.routing = routing
        self.cfg = cfg

    # -- routing -------------------------------------------------------------
    @contextlib.contextmanager
    def route(self, k: int, token_mask: torch.Tensor | None = None, collect: bool = False) -> Iterator[None]:
        """Run forward passes with k active experts (and a padding mask / count collection)."""
        saved = (self.routing.k, self.routing.token_mask, self.routing.collect)
        self.routing.k = k
        self.routing.token_mask = None if token_mask is None else token_mask.reshape(-1).bool()
        self.routing.collect = collect
        try:
            yield
        finally:
            self.routing.k, self.routing.token_mask, self.routing.collect = saved

    def aux_loss(self) -> torch.Tensor:
        """Sum of the layers' load-balancing losses from the last training forward pass."""
        losses = [layer.aux_loss for layer in self.layers.values() if layer.aux_loss is not None]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    # -- counts --------------------------------------------------------------
    def reset_counts(self) -> None:
        for layer in self.layers.values():
            layer.reset_counts()

    def counts(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Per module: tokens routed to each expert (E,) and tokens seen."""
        counts = {n: layer.expert_counts.clone() for n, layer in self.layers.items()}
        tokens = {n: float(layer.tokens_seen) for n, layer in self.layers.items()}
        return counts, tokens

    # -- state ---------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [getattr(layer, name) for layer in self.layers.values() for name in layer.adapter_names()]

    def rescale_parameters(self) -> list[nn.Parameter]:
        """The learned tier rescalers (trained in their own optimizer group)."""
        return [layer.rescale for layer in self.layers.values() if "rescale" in layer.adapter_names()]

    def state_dict(self) -> State:
        """Detached CPU copies of every adapter tensor, keyed `<module>.<name>`."""
        return {
            f"{mod}.{name}": getattr(layer, name).detach().to("cpu", copy=True)
            for mod, layer in self.layers.items()
            for name in layer.adapter_names()
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            f"{mod}.{name}": tuple(getattr(layer, name).shape)
            for mod, layer in self.layers.items()
            for name in layer.adapter_names()
        }

    @torch.no_grad()
    def load_state_dict(self, state: State, strict: bool = True) -> None:
        """Copy tensors into the adapter; with strict, the key set must match exactly."""
        expected = self.shapes()
        if strict:
            missing = sorted(set(expected) - set(state))
            extra = sorted(set(state) - set(expected))
            if missing or extra:
                raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in state.items():
            if key not in expected:
                raise KeyError(f"unknown adapter tensor {key!r}")
            if tuple(value.shape) != expected[key]:
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(value.shape)}, expected {expected[key]}")
            mod, name = key.rsplit(".", 1)
            getattr(self.layers[mod], name).copy_(value)

    def save(self, path: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path: str | Path) -> None:
        self.load_state_dict(load_file(str(path)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def wrap_modules(model: nn.Module, names: list[str], wrap) -> dict[str, nn.Module]:
    """Replace each named submodule by `wrap(submodule)` (in place); return name -> wrapper."""
    layers = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layers[name] = wrap(getattr(parent, child))
        setattr(parent, child, layers[name])
    return layers


def inject_mole(model: nn.Module, cfg: MoLEConfig, k_max: int | None = None) -> MoLEAdapter:
    """Replace the target linear layers of `model` with MoLE layers (in place).

    The base model is frozen; only adapter tensors require grad. `k_max` is
    the largest tier in use (rescaler init k_max/k); defaults to E.
    """
    if cfg.router not in ROUTERS:
        raise ValueError(f"adapter.router={cfg.router!r}; allowed: {', '.join(ROUTERS)}")
    if cfg.rescale not in RESCALE_MODES:
        raise ValueError(f"adapter.rescale={cfg.rescale!r}; allowed: {', '.join(RESCALE_MODES)}")
    model.requires_grad_(False)
    names = find_targets(model, list(cfg.targets))
    routing = Routing(k=k_max or cfg.num_experts)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    layers = wrap_modules(model, names, lambda base: MoLELinear(
        base,
        routing,
        num_experts=cfg.num_experts,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        router=cfg.router,
        renormalize=cfg.renormalize,
        rescale=cfg.rescale,
        k_max=k_max,
        shared_expert=cfg.shared_expert,
        generator=gen,
    ))
    return MoLEAdapter(model, layers, routing, cfg)


def split_key(key: str) -> tuple[str, str]:
    """'model.layers.0.self_attn.q_proj.lora_A' -> ('model.layers.0.self_attn.q_proj', 'lora_A')."""
    module, _, name = key.rpartition(".")
    return module, name
