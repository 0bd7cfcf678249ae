"""AMoLE: FedAMoLE's adaptive mixture of LoRA experts around one frozen linear layer.

    h = W0 x + (alpha/r) * [ sum_{j in topk_{S}(s(x))} g_j(x) B_j A_j x  +  B_s A_s x ]
    s_j(x) = <A_j x, W_t x> / sqrt(r)   for j in S (the experts this client holds)

The layer stores the server's whole pool of N domain experts (one frozen base
model serves every simulated client) plus a `held` index buffer naming the
subset S of the pool that the current client holds. Routing and compute touch
only the held rows (`index_select`, then two matmuls over all held experts at
once), so unheld experts get exactly zero gradient. Keys are the experts' own
down-projections of the clean input; the query is a token projection W_t (r x
d_in, no bias). Top-k gates are renormalised; `k` comes from the shared
`Routing` object and is capped by |S|.

`inject_amole` returns an `AMoLEAdapter` (a `MoLEAdapter`): the full pool state
under keys `<module>.lora_A` (N, r, d_in), `<module>.lora_B` (N, d_out, r),
`<module>.token_proj` (r, d_in), `<module>.shared_A` (r, d_in),
`<module>.shared_B` (d_out, r), and the *held view* a client exchanges, with one
key per held expert: `<module>.lora_A.<j>` (r, d_in), `<module>.lora_B.<j>`
(d_out, r), plus the module's token projection and shared expert.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters.inject import MoLEAdapter, State, find_targets, wrap_modules
from fedmole.adapters.mole import ExpertCounter, Routing, compute_dtype, linear_dims, top_k_router

EXPERT_TENSORS = ("lora_A", "lora_B")  # stacked over the pool: dim 0 indexes experts


@dataclass
class AMoLEConfig:
    """AMoLE settings (spec 1.3)."""

    pool_size: int = 30  # N: domain experts per module on the server
    rank: int = 8  # r
    alpha: float = 16.0  # scale = alpha / r
    dropout: float = 0.05  # dropout on the expert input (routing sees the clean input)
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    shared_expert: bool = True  # always-on expert with weight 1
    top_k: int = 2  # domain experts per token (capped by the number held)
    init_seed: int = 0


@dataclass
class EmbeddingSums:
    """Running sums over real tokens for FedAMoLE's client embeddings, and the largest
    norm of any one forward pass's (batch's) token mean: the clip bound of the DP noise."""

    query: torch.Tensor  # (r,) sum of W_t x
    keys: torch.Tensor  # (S, r) sum of A_j x per held expert
    tokens: float = 0.0
    query_bound: float = 0.0  # max over batches of |batch mean of W_t x|
    key_bounds: torch.Tensor | None = None  # (S,) max over batches of |batch mean of A_j x|


class TokenMeans(NamedTuple):
    """One module's embeddings from an embedding pass (float32, CPU)."""

    query: torch.Tensor  # (r,) token mean of W_t x
    keys: torch.Tensor  # (S, r) token mean of A_j x per held expert, ascending pool order
    query_bound: torch.Tensor  # () largest batch-mean norm of W_t x
    key_bounds: torch.Tensor  # (S,) largest batch-mean norm of A_j x


class AMoLELinear(ExpertCounter, nn.Module):
    """A frozen linear layer plus a pool of N LoRA experts (a held subset active),
    an optional shared expert and a token projection for key-based routing.

    Trainable tensors (and the saved state): `lora_A` (N, r, d_in), `lora_B`
    (N, d_out, r), `token_proj` (r, d_in), and `shared_A` (r, d_in), `shared_B`
    (d_out, r) when the shared expert is on.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        routing: Routing,
        *,
        pool_size: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        shared_expert: bool = True,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        d_in, d_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.routing = routing
        self.num_experts, self.rank, self.d_in, self.d_out = pool_size, rank, d_in, d_out
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device

        # LoRA init (A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0); W_t like A so that
        # routing scores differ between experts from the first step.
        bound = 1.0 / math.sqrt(d_in)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=generator).to(dev))

        self.lora_A = uniform(pool_size, rank, d_in)
        self.lora_B = nn.Parameter(torch.zeros(pool_size, d_out, rank, device=dev))
        self.token_proj = uniform(rank, d_in)
        self.shared_A: nn.Parameter | None = None
        self.shared_B: nn.Parameter | None = None
        if shared_expert:
            self.shared_A = uniform(rank, d_in)
            self.shared_B = nn.Parameter(torch.zeros(d_out, rank, device=dev))

        self.register_buffer("held", torch.arange(pool_size, device=dev), persistent=False)
        self._init_counts(pool_size)
        self.aux_loss: torch.Tensor | None = None
        self.embedding: EmbeddingSums | None = None  # set during an embedding pass

    def adapter_names(self) -> list[str]:
        """Names of this layer's trainable adapter tensors (the saved state)."""
        names = ["lora_A", "lora_B", "token_proj"]
        if self.shared_A is not None:
            names += ["shared_A", "shared_B"]
        return names

    def set_held(self, experts: torch.Tensor | list[int]) -> None:
        """Make the pool experts `experts` (sorted, distinct, at least one) the active subset."""
        idx = torch.as_tensor(experts, dtype=torch.long).flatten()
        if idx.numel() == 0 or idx.unique().numel() != idx.numel():
            raise ValueError(f"held experts must be distinct and non-empty, got {idx.tolist()}")
        if idx.min() < 0 or idx.max() >= self.num_experts:
            raise ValueError(f"held experts {idx.tolist()} outside the pool 0..{self.num_experts - 1}")
        self.held = idx.sort().values.to(self.lora_A.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xc = x.reshape(-1, self.d_in).to(compute_dtype(x))  # (T, d_in), cast once for every matmul
        n_tok, r = xc.shape[0], self.rank
        n_held = self.held.numel()
        k = min(self.routing.k, n_held)
        if k < 1:
            raise ValueError(f"active experts k={self.routing.k}; must be >= 1")
        mask = self.routing.token_mask
        if mask is not None and mask.numel() != n_tok:
            mask = None  # e.g. cached generation steps: every token is real
        out = self.base_layer(xc)

        a_held = self.lora_A.index_select(0, self.held).reshape(n_held * r, self.d_in).to(xc.dtype)  # (S*r, d_in)
        b_held = self.lora_B.index_select(0, self.held).permute(1, 0, 2).reshape(self.d_out, n_held * r)
        keys = F.linear(xc, a_held).view(n_tok, n_held, r)  # (T, S, r): A_j x
        query = F.linear(xc, self.token_proj.to(xc.dtype))  # (T, r): W_t x
        scores = torch.einsum("tsr,tr->ts", keys, query) / math.sqrt(r)  # (T, S)
        route = top_k_router(scores, k, renormalize=True, token_mask=mask)
        if self.training:
            self.aux_loss = route.aux_loss
        if self.routing.collect:
            self._count(route.indices, mask)
        if self.embedding is not None:
            self._accumulate(keys, query, mask)
        gates = route.gates * self.scaling  # (T, S): alpha/r folded into the gates

        xd = self.dropout(xc)
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        hidden = F.linear(xd, a_held).view(n_tok, n_held, r) if dropping else keys  # (T, S, r)
        hidden = (hidden * gates.unsqueeze(-1).to(hidden.dtype)).view(n_tok, n_held * r)
        out = out + F.linear(hidden, b_held.to(hidden.dtype))  # (T, d_out)
        if self.shared_A is not None:
            shared = F.linear(F.linear(xd, self.shared_A.to(xd.dtype)), self.shared_B.to(xd.dtype))
            out = out + shared * self.scaling
        return out.view(*lead, self.d_out)

    def _count(self, local: torch.Tensor, mask: torch.Tensor | None) -> None:
        super()._count(self.held[local], mask)  # held-local -> pool indices

    @torch.no_grad()
    def _accumulate(self, keys: torch.Tensor, query: torch.Tensor, mask: torch.Tensor | None) -> None:
        sums = self.embedding
        w = torch.ones(keys.shape[0], device=keys.device) if mask is None else mask.to(keys.device).float()
        q = torch.einsum("t,tr->r", w, query.float()).to(sums.query)  # (r,)
        k = torch.einsum("t,tsr->sr", w, keys.float()).to(sums.keys)  # (S, r)
        n = float(w.sum())
        sums.query += q
        sums.keys += k
        sums.tokens += n
        if n > 0:
            sums.query_bound = max(sums.query_bound, float(q.norm()) / n)
            norms = k.norm(dim=1) / n  # (S,)
            sums.key_bounds = norms if sums.key_bounds is None else torch.maximum(sums.key_bounds, norms)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, pool={self.num_experts}, held={self.held.numel()}, "
            f"rank={self.rank}, shared={self.shared_A is not None}"
        )


def reference_forward(layer: AMoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Naive per-token, per-expert loops with the maths of `AMoLELinear.forward` (test oracle)."""
    out = layer.base_layer(x)
    xf = x.reshape(-1, layer.d_in)
    xd = layer.dropout(xf)
    held = layer.held.tolist()
    k = min(layer.routing.k, len(held))
    rows = []
    for t in range(xf.shape[0]):
        q = layer.token_proj @ xf[t]  # (r,)
        scores = torch.stack([(layer.lora_A[j] @ xf[t]) @ q / math.sqrt(layer.rank) for j in held])
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=0)
        vals, idx = probs.topk(k)
        vals = vals / vals.sum()
        y = torch.zeros(layer.d_out, dtype=xf.dtype)
        for g, i in zip(vals, idx.tolist()):
            j = held[i]
            y = y + g.to(xf.dtype) * (layer.lora_B[j] @ (layer.lora_A[j] @ xd[t]))
        if layer.shared_A is not None:
            y = y + layer.shared_B @ (layer.shared_A @ xd[t])
        rows.append(y * layer.scaling)
    return out + torch.stack(rows).view(*x.shape[:-1], layer.d_out)


# -- held views: the per-client slice of a pool state ---------------------------------


def expert_key(module: str, name: str, expert: int) -> str:
    """'<module>.lora_A.<j>': one pool expert's tensor in a held view."""
    return f"{module}.{name}.{expert}"


def parse_key(key: str) -> tuple[str, str, int | None]:
    """'<module>.lora_A.3' -> (module, 'lora_A', 3); '<module>.token_proj' -> (module, 'token_proj', None)."""
    head, _, last = key.rpartition(".")
    if last.isdigit():
        module, _, name = head.rpartition(".")
        if name in EXPERT_TENSORS:
            return module, name, int(last)
    return head, last, None


def held_view(pool_state: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor | list[int]]) -> State:
    """The slice of a pool state a client holds: per-expert keys for its experts, plus
    every non-expert tensor (token projection, shared expert) of the modules in `held`."""
    out: State = {}
    for key, value in pool_state.items():
        module, name, _ = parse_key(key)
        if module not in held:
            raise KeyError(f"no held experts given for module {module!r}")
        if name in EXPERT_TENSORS:
            for j in torch.as_tensor(held[module]).tolist():
                out[expert_key(module, name, j)] = value[j].clone()
        else:
            out[key] = value.clone()
    return out


def held_experts(view: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """Module -> sorted pool indices of the experts present in a held view."""
    found: dict[str, set[int]] = {}
    for key in view:
        module, _, j = parse_key(key)
        found.setdefault(module, set())
        if j is not None:
            found[module].add(j)
    return {m: sorted(js) for m, js in found.items()}


class AMoLEAdapter(MoLEAdapter):
    """Handle over the AMoLE layers of one model: the `MoLEAdapter` interface over
    the full pool, plus held subsets, held views and the embedding pass."""

    layers: dict[str, AMoLELinear]

    def __init__(self, model: nn.Module, layers: dict[str, AMoLELinear], routing: Routing, cfg: AMoLEConfig):
        super().__init__(model, layers, routing, cfg)
        self._sums: dict[str, EmbeddingSums] = {}

    @property
    def pool_size(self) -> int:
        return next(iter(self.layers.values())).num_experts

    def set_held(self, held: Mapping[str, torch.Tensor | list[int]]) -> None:
        """Set every module's held subset (module -> pool indices)."""
        missing = sorted(set(self.layers) - set(held))
        if missing:
            raise KeyError(f"no held experts for modules {missing[:3]}")
        for module, experts in held.items():
            self.layers[module].set_held(experts)

    def held(self) -> dict[str, list[int]]:
        return {m: layer.held.tolist() for m, layer in self.layers.items()}

    def held_state(self) -> State:
        """Detached CPU copy of the held view: held experts, token projections, shared experts."""
        return held_view(self.state_dict(), self.held())

    @torch.no_grad()
    def load_held_state(self, view: Mapping[str, torch.Tensor]) -> None:
        """Hold exactly the experts present in `view` and copy its tensors into the pool.

        Every module needs its token projection (and shared expert, if on) and at
        least one expert with both A and B; unheld pool rows are left as they are.
        """
        experts = held_experts(view)
        expected: dict[str, tuple[int, ...]] = {}
        for module, layer in self.layers.items():
            if not experts.get(module):
                raise KeyError(f"held view has no experts for module {module!r}")
            for name in layer.adapter_names():
                shape = tuple(getattr(layer, name).shape)
                if name in EXPERT_TENSORS:
                    expected.update({expert_key(module, name, j): shape[1:] for j in experts[module]})
                else:
                    expected[f"{module}.{name}"] = shape
        missing, extra = sorted(set(expected) - set(view)), sorted(set(view) - set(expected))
        if missing or extra:
            raise KeyError(f"held view mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for key, value in view.items():
            if tuple(value.shape) != expected[key]:
                raise ValueError(f"held tensor {key!r} has shape {tuple(value.shape)}, expected {expected[key]}")
        self.set_held(experts)
        for key, value in view.items():
            module, name, j = parse_key(key)
            target = getattr(self.layers[module], name)
            (target[j] if j is not None else target).copy_(value)

    @contextlib.contextmanager
    def embedding_pass(self) -> Iterator[None]:
        """Within the block, forward passes add up W_t x and A_j x (held j) over real tokens."""
        for layer in self.layers.values():
            dev = layer.lora_A.device
            layer.embedding = EmbeddingSums(torch.zeros(layer.rank, dtype=torch.float64, device=dev),
                                            torch.zeros(layer.held.numel(), layer.rank, dtype=torch.float64,
                                                        device=dev))
        try:
            yield
        finally:
            self._sums = {m: layer.embedding for m, layer in self.layers.items()}
            for layer in self.layers.values():
                layer.embedding = None

    def embeddings(self) -> dict[str, TokenMeans]:
        """Per module, from the last embedding pass: the token means t (r,) of W_t x and
        e (S, r) of A_j x for the held experts, with their largest per-batch norms."""
        out = {}
        for m, sums in self._sums.items():
            n = max(sums.tokens, 1.0)
            bounds = sums.key_bounds if sums.key_bounds is not None else torch.zeros(sums.keys.shape[0])
            out[m] = TokenMeans((sums.query / n).float().cpu(), (sums.keys / n).float().cpu(),
                                torch.tensor(sums.query_bound, dtype=torch.float32), bounds.float().cpu())
        return out


def inject_amole(model: nn.Module, cfg: AMoLEConfig) -> AMoLEAdapter:
    """Replace the target linear layers of `model` with AMoLE layers (in place); freeze the base."""
    model.requires_grad_(False)
    names = find_targets(model, list(cfg.targets))
    routing = Routing(k=cfg.top_k)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    layers = wrap_modules(model, names, lambda base: AMoLELinear(
        base, routing, pool_size=cfg.pool_size, rank=cfg.rank, alpha=cfg.alpha,
        dropout=cfg.dropout, shared_expert=cfg.shared_expert, generator=gen,
    ))
    return AMoLEAdapter(model, layers, routing, cfg)
