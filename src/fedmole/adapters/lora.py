"""Plain LoRA around one frozen linear layer, with a per-call active rank.

    h = W0 x + (alpha / r_a) B[:, :r_a] A[:r_a] x

The layer allocates the server rank r_max (A: r_max x d_in, B: d_out x r_max);
a client of rank r_a <= r_max uses the first r_a components, so one shared
model in the local engine serves clients of different ranks (HetLoRA,
FlexLoRA, FLoRA). The scaling follows the rank in use, alpha / r_a, as it
would for a client that allocated a rank-r_a LoRA of its own.

`inject_lora` returns a `LoRAAdapter`, a `MoLEAdapter` the engine drives the
same way: `route(k)` takes the client's tier k and runs rank `rank_of(k)`
(rank_per_tier * k, capped at r_max, or one fixed rank for every tier);
there is no auxiliary loss and there are no expert counts. Adapter state
keys are `<module>.lora_A` and `<module>.lora_B`; states of a smaller rank
(a client's view) load zero-padded.

On a sparse MoE base the same handle drives per-expert LoRA pairs
(`fedmole.adapters.moe_lora`, keys `<block>.lora_gate_up_A/B` and
`<block>.lora_down_A/B`, stacked over experts: A (E, r, d_in), B (E, d_out, r)).
The helpers below treat every pair alike: the rank is dim -2 of A and dim -1
of B, and leading dims index experts. A pair is named by its module (plain
LoRA) or `<block>.gate_up` / `<block>.down` (MoE experts).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters.inject import MoLEAdapter, State, find_targets, split_key, wrap_modules
from fedmole.adapters.mole import compute_dtype, linear_dims

LORA_TENSORS = ("lora_A", "lora_B")
# A tensor name -> (its B tensor name, the pair's name suffix); rank is dim -2 of A and dim -1 of B
LORA_PAIRS = {
    "lora_A": ("lora_B", ""),
    "lora_gate_up_A": ("lora_gate_up_B", "gate_up"),
    "lora_down_A": ("lora_down_B", "down"),
}
_B_NAMES = {b for b, _ in LORA_PAIRS.values()}


@dataclass
class ActiveRank:
    """Rank in use, shared by every LoRA layer of one model and set per call."""

    rank: int


def init_lora_A(rank: int, d_in: int, generator: torch.Generator | None = None, lead: tuple[int, ...] = ()) -> torch.Tensor:
    """LoRA's A init (*lead, rank, d_in): U(-1/sqrt(d_in), 1/sqrt(d_in)), the kaiming-uniform bound with a=sqrt(5)."""
    bound = 1.0 / math.sqrt(d_in)
    return torch.empty(*lead, rank, d_in).uniform_(-bound, bound, generator=generator)


class LoRALinear(nn.Module):
    """A frozen linear layer (nn.Linear or GPT-2 Conv1D) plus one LoRA pair of rank up to `rank`.

    Trainable (and saved): `lora_A` (rank, d_in), `lora_B` (d_out, rank), B = 0 at init.
    `set_delta` folds a dense update into the frozen weight (FLoRA's merged base).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        active: ActiveRank,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        d_in, d_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.active = active
        self.rank, self.alpha, self.d_in, self.d_out = rank, alpha, d_in, d_out
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device
        self.lora_A = nn.Parameter(init_lora_A(rank, d_in, generator).to(dev))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, device=dev))
        self._w0: torch.Tensor | None = None  # the pristine base weight, kept once a delta is merged

    def adapter_names(self) -> list[str]:
        return list(LORA_TENSORS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.active.rank
        if not 1 <= r <= self.rank:
            raise ValueError(f"active LoRA rank {r}; allowed: 1..{self.rank}")
        lead = x.shape[:-1]
        xc = x.reshape(-1, self.d_in).to(compute_dtype(x))  # (N, d_in)
        out = self.base_layer(xc)  # (N, d_out)
        h = F.linear(self.dropout(xc), self.lora_A[:r].to(xc.dtype))  # (N, r)
        out = out + F.linear(h, self.lora_B[:, :r].to(h.dtype)) * (self.alpha / r)
        return out.view(*lead, self.d_out)

    @torch.no_grad()
    def set_delta(self, delta: torch.Tensor | None, pair: str = "lora_A") -> None:
        """Make the frozen weight W0 + delta (delta: d_out x d_in), or W0 again for None (one pair: `pair` unused)."""
        w = self.base_layer.weight
        if self._w0 is None:
            if delta is None:
                return
            self._w0 = w.detach().clone()
        if delta is None:
            w.copy_(self._w0)
            return
        if tuple(delta.shape) != (self.d_out, self.d_in):
            raise ValueError(f"merged delta has shape {tuple(delta.shape)}, expected {(self.d_out, self.d_in)}")
        delta = delta.to(device=w.device, dtype=w.dtype)
        w.copy_(self._w0 + (delta if isinstance(self.base_layer, nn.Linear) else delta.t()))  # Conv1D: d_in x d_out

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, alpha={self.alpha}"


@dataclass
class LoRAConfig:
    """Plain LoRA settings (the rank-based baselines of spec 2.3)."""

    rank: int = 64  # r_max: the rank the server holds and the layers allocate
    rank_per_tier: int = 8  # a client of tier k runs rank rank_per_tier * k (capped at r_max); 0 = r_max for all
    alpha: float = 16.0  # scaling numerator: a rank-r client scales by alpha / r
    dropout: float = 0.05  # dropout on the adapter input
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # module names, or ["all-linear"]
    init_seed: int = 0  # seed of the initial A


class LoRAAdapter(MoLEAdapter):
    """Handle over the LoRA layers injected into one model (the `MoLEAdapter` interface)."""

    def __init__(self, model: nn.Module, layers: dict[str, LoRALinear], active: ActiveRank, cfg: LoRAConfig):
        super().__init__(model, layers, routing=None, cfg=cfg)  # routing unused: layers read `active`
        self.active = active
        self.fixed_rank = 0 if cfg.rank_per_tier else cfg.rank

    @property
    def max_rank(self) -> int:
        return self.cfg.rank

    def rank_of(self, k: int) -> int:
        """The rank a client of tier k runs."""
        if k < 1:
            raise ValueError(f"tier k={k}; tiers are >= 1")
        return self.fixed_rank or min(self.cfg.rank, self.cfg.rank_per_tier * k)

    def fix_rank(self, rank: int) -> None:
        """Make every tier run `rank` (FedIT's single rank; the centralised reference's full rank)."""
        if not 1 <= rank <= self.max_rank:
            raise ValueError(f"LoRA rank {rank}; allowed: 1..{self.max_rank} (the allocated rank)")
        self.fixed_rank = rank

    @contextlib.contextmanager
    def route(self, k: int, token_mask: torch.Tensor | None = None, collect: bool = False) -> Iterator[None]:
        """Run forward passes at the rank of tier k (the mask and `collect` do not apply to LoRA)."""
        saved = self.active.rank
        self.active.rank = self.rank_of(k)
        try:
            yield
        finally:
            self.active.rank = saved

    def aux_loss(self) -> torch.Tensor:
        return torch.zeros(())

    def reset_counts(self) -> None:
        pass

    def counts(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        return {}, {}

    @torch.no_grad()
    def load_state_dict(self, state: State, strict: bool = True) -> None:
        """Copy tensors in; a rank-r view (A: r x d_in, B: d_out x r, r <= r_max) fills the first r
        components and zeroes the rest. With strict, the key set must match exactly."""
        full = self.shapes()
        if strict:
            missing, extra = sorted(set(full) - set(state)), sorted(set(state) - set(full))
            if missing or extra:
                raise KeyError(f"adapter state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        unknown = sorted(set(state) - set(full))
        if unknown:
            raise KeyError(f"unknown adapter tensor {unknown[0]!r}")
        padded = pad_lora(state, self.max_rank)
        for key, value in padded.items():
            if tuple(value.shape) != full[key]:
                raise ValueError(f"adapter tensor {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected a rank-r view of {full[key]}")
            module, name = split_key(key)
            getattr(self.layers[module], name).copy_(value)

    def set_merged(self, deltas: Mapping[str, torch.Tensor] | None) -> None:
        """Fold pair name -> dense delta ((E,) d_out, d_in) into the frozen weights; pairs not given get W0."""
        deltas = deltas or {}
        pairs = {pair_id(name, a): (layer, a) for name, layer in self.layers.items()
                 for a in layer.adapter_names() if is_lora_A(a)}
        unknown = sorted(set(deltas) - set(pairs))
        if unknown:
            raise KeyError(f"merged delta for unknown LoRA pair {unknown[0]!r}")
        for pid, (layer, a_name) in pairs.items():
            layer.set_delta(deltas.get(pid), a_name)


def is_lora_A(name: str) -> bool:
    return name in LORA_PAIRS


def pair_id(module: str, a_name: str) -> str:
    """The name of the pair whose A tensor is `<module>.<a_name>`."""
    suffix = LORA_PAIRS[a_name][1]
    return f"{module}.{suffix}" if suffix else module


def pair_keys(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """pair name -> (A key, B key) for every LoRA pair in `state`."""
    out = {}
    for key in state:
        module, name = split_key(key)
        if is_lora_A(name):
            out[pair_id(module, name)] = (key, f"{module}.{LORA_PAIRS[name][0]}")
    return out


def lora_rank(state: Mapping[str, torch.Tensor]) -> int:
    """The rank of a LoRA state (every pair's A must agree)."""
    ranks = {v.shape[-2] for k, v in state.items() if is_lora_A(split_key(k)[1])}
    if len(ranks) != 1:
        raise ValueError(f"LoRA state has A tensors of ranks {sorted(ranks)}; expected one rank")
    return ranks.pop()


def truncate_lora(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """The rank-`rank` view: A[..., :rank, :], B[..., :rank]; other keys dropped."""
    out: State = {}
    for key, value in state.items():
        name = split_key(key)[1]
        if is_lora_A(name):
            out[key] = value[..., :rank, :].clone()
        elif name in _B_NAMES:
            out[key] = value[..., :rank].clone()
    return out


def pad_lora(state: Mapping[str, torch.Tensor], rank: int) -> State:
    """Zero-pad every A to (..., rank, d_in) and every B to (..., d_out, rank); other keys dropped."""
    out: State = {}
    for key, value in state.items():
        name = split_key(key)[1]
        if is_lora_A(name):
            if value.shape[-2] > rank:
                raise ValueError(f"{key}: rank {value.shape[-2]} exceeds {rank}")
            out[key] = F.pad(value, (0, 0, 0, rank - value.shape[-2]))
        elif name in _B_NAMES:
            if value.shape[-1] > rank:
                raise ValueError(f"{key}: rank {value.shape[-1]} exceeds {rank}")
            out[key] = F.pad(value, (0, rank - value.shape[-1]))
    return out


def lora_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """pair name -> (A (..., r, d_in), B (..., d_out, r))."""
    return {p: (state[a], state[b]) for p, (a, b) in pair_keys(state).items()}


def inject_lora(model: nn.Module, cfg: LoRAConfig) -> LoRAAdapter:
    """Replace the target linear layers of `model` with LoRA layers (in place); the base is frozen."""
    if cfg.rank < 1:
        raise ValueError(f"LoRA rank {cfg.rank}; must be >= 1")
    model.requires_grad_(False)
    names = find_targets(model, list(cfg.targets))
    active = ActiveRank(rank=cfg.rank)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    layers = wrap_modules(model, names, lambda base: LoRALinear(
        base, active, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, generator=gen,
    ))
    return LoRAAdapter(model, layers, active, cfg)
