"""MoLE: a sparse mixture of LoRA experts wrapped around one frozen linear layer.

    h = W0 x + s_k * sum_{j in topk(g(x), k)} g_j(x) * (alpha/r) B_j A_j x  (+ shared expert)

Experts are stacked (A: E x r x d_in, B: E x d_out x r) and computed with two
matmuls over all experts at once; unselected experts get a zero gate, so their
contribution and gradient are exactly zero. For E*r of a few dozen this dense
form beats any gather/scatter on a CPU and matches the naive per-expert loop
(`reference_forward` below, the test oracle). Because every expert is computed,
a lower tier saves no compute here: that needs a sparse base model
(`fedmole.adapters.moe_lora`), where the skipped experts are whole FFNs.

The router is a linear gate (FLAME's default) or the key-based router of
FedAMoLE (spec 1.3): expert j's key is its own A_j x, the query a token
projection W_t x, and the logit <A_j x, W_t x> / sqrt(r).

The number of active experts `k` is read from a `Routing` object shared by all
layers of one model, so the caller sets it per forward call (one global adapter
serves every tier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

RESCALE_MODES = ("learned", "fixed", "off")
ROUTERS = ("linear", "key")


@dataclass
class Routing:
    """Per-call routing settings shared by every MoLE layer of one model."""

    k: int  # experts activated per token
    token_mask: torch.Tensor | None = None  # (B*T,) bool: real (non-padding) tokens
    collect: bool = False  # accumulate per-expert token counts (training forward passes)


class RouterOutput(NamedTuple):
    gates: torch.Tensor  # (N, E) kept gate values, zero for unselected experts
    indices: torch.Tensor  # (N, k) selected experts
    aux_loss: torch.Tensor  # scalar Switch load-balancing loss


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 style Conv1D (weight stored d_in x d_out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D layers are supported")


def top_k_router(
    logits: torch.Tensor, k: int, renormalize: bool, token_mask: torch.Tensor | None
) -> RouterOutput:
    """Softmax gate, top-k selection and the Switch load-balancing loss.

    logits: (N, E). The aux loss is E * sum_j P_j f_j with P_j the mean router
    probability and f_j the fraction of (token, slot) assignments to expert j,
    both over real tokens only.
    """
    n_tok, n_exp = logits.shape
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, E)
    top_vals, top_idx = probs.topk(k, dim=-1)  # (N, k)
    if renormalize:
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, top_idx, top_vals)  # (N, E)
    assigned = torch.zeros_like(probs).scatter(-1, top_idx, 1.0 / k)  # (N, E), rows sum to 1
    if token_mask is not None:
        w = token_mask.to(probs.dtype).unsqueeze(-1)  # (N, 1)
        denom = w.sum().clamp_min(1.0)
        p_mean = (probs * w).sum(0) / denom
        f_mean = (assigned * w).sum(0) / denom
    else:
        p_mean, f_mean = probs.mean(0), assigned.mean(0)
    aux = n_exp * (p_mean * f_mean).sum()
    return RouterOutput(gates, top_idx, aux)


class ExpertCounter:
    """Per-expert token counts for FLAME's activation-aware aggregation, mixed into
    every expert layer: `expert_counts` (E,) tokens routed to each expert and
    `tokens_seen` real tokens, both non-persistent float64 buffers."""

    def _init_counts(self, num_experts: int, device=None) -> None:
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64, device=device),
                             persistent=False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    @torch.no_grad()
    def _count(self, indices: torch.Tensor, mask: torch.Tensor | None) -> None:
        """indices: (N, k) expert ids chosen per token; mask: (N,) real tokens or None."""
        if mask is not None:
            indices = indices[mask]
        self.expert_counts += torch.bincount(indices.reshape(-1), minlength=self.num_experts).to(torch.float64)
        self.tokens_seen += indices.shape[0]

    def reset_counts(self) -> None:
        self.expert_counts.zero_()
        self.tokens_seen.zero_()


def init_rescaler(module: nn.Module, mode: str, size: int, k_ref: int, renormalize: bool, device=None) -> None:
    """Register `module.rescale` (size,), entry k-1 scaling the mixture output of a tier-k client.

    Without renormalisation a tier-k client keeps about k/k_ref of the gate mass
    of the reference tier k_ref, so the scale starts at k_ref/k; renormalised
    gates already sum to one, so it starts at 1. `learned`: a parameter from that
    start; `fixed`: the same values as a buffer; `off`: ones.
    """
    if mode not in RESCALE_MODES:
        raise ValueError(f"rescale={mode!r}; allowed: {', '.join(RESCALE_MODES)}")
    ks = torch.arange(1, size + 1, dtype=torch.float32, device=device)
    start = torch.ones_like(ks) if renormalize else k_ref / ks
    if mode == "learned":
        module.rescale = nn.Parameter(start)
    else:
        module.register_buffer("rescale", start if mode == "fixed" else torch.ones_like(ks), persistent=False)


class MoLELinear(ExpertCounter, nn.Module):
    """A frozen linear layer plus a mixture of E stacked LoRA experts.

    Trainable parameters (and the only ones saved): `lora_A` (E, r, d_in),
    `lora_B` (E, d_out, r), the router (`router` (E, d_in) for the linear gate,
    `token_proj` (r, d_in) for the key-based one), `rescale` (E,) when learned,
    `shared_A` (r, d_in) and `shared_B` (d_out, r) when a shared expert is on.
    `rescale[k-1]` is the output scale of a client that activates k experts.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        routing: Routing,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        router: str = "linear",
        renormalize: bool = False,
        rescale: str = "learned",
        k_max: int | None = None,
        shared_expert: bool = False,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if router not in ROUTERS:
            raise ValueError(f"router={router!r}; allowed: {', '.join(ROUTERS)}")
        d_in, d_out = linear_dims(base_layer)
        self.base_layer = base_layer
        self.routing = routing
        self.num_experts, self.rank, self.d_in, self.d_out = num_experts, rank, d_in, d_out
        self.scaling = alpha / rank
        self.router_type = router
        self.renormalize = renormalize
        self.rescale_mode = rescale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev = base_layer.weight.device

        # LoRA init: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (kaiming-uniform, a=sqrt(5)), B = 0.
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(num_experts, rank, d_in).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(dev))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, rank, device=dev))
        self.router: nn.Parameter | None = None
        self.token_proj: nn.Parameter | None = None
        if router == "linear":
            r = torch.empty(num_experts, d_in).normal_(0.0, 0.02, generator=generator)
            self.router = nn.Parameter(r.to(dev))
        else:  # the query side of the key router; keys are the experts' own A_j x
            self.token_proj = nn.Parameter(torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator).to(dev))
        init_rescaler(self, rescale, num_experts, k_max or num_experts, renormalize, dev)

        self.shared_A: nn.Parameter | None = None
        self.shared_B: nn.Parameter | None = None
        if shared_expert:
            self.shared_A = nn.Parameter(torch.empty(rank, d_in).uniform_(-bound, bound, generator=generator).to(dev))
            self.shared_B = nn.Parameter(torch.zeros(d_out, rank, device=dev))

        self._init_counts(num_experts)
        self.aux_loss: torch.Tensor | None = None

    def adapter_names(self) -> list[str]:
        """Names of this layer's trainable adapter tensors (the saved state)."""
        names = ["lora_A", "lora_B", "router" if self.router is not None else "token_proj"]
        if self.rescale_mode == "learned":
            names.append("rescale")
        if self.shared_A is not None:
            names += ["shared_A", "shared_B"]
        return names

    def router_logits(self, xc: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """(N, E) router logits for the clean input xc (N, d_in); `keys` (N, E*r) = A x when already computed."""
        if self.router is not None:
            return F.linear(xc, self.router.to(xc.dtype))
        E, r = self.num_experts, self.rank
        if keys is None:
            keys = F.linear(xc, self.lora_A.reshape(E * r, self.d_in).to(xc.dtype))
        query = F.linear(xc, self.token_proj.to(xc.dtype))  # (N, r)
        return torch.einsum("ner,nr->ne", keys.view(-1, E, r), query) / math.sqrt(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.routing.k
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"active experts k={k}; allowed: 1..{self.num_experts}")
        lead = x.shape[:-1]
        xc = x.reshape(-1, self.d_in).to(compute_dtype(x))  # (N, d_in), cast once for every matmul
        n_tok = xc.shape[0]
        out = self.base_layer(xc)
        mask = self.routing.token_mask
        if mask is not None and mask.numel() != n_tok:
            mask = None  # e.g. cached generation steps: every token is real

        E, r = self.num_experts, self.rank
        xd = self.dropout(xc)
        h = F.linear(xd, self.lora_A.reshape(E * r, self.d_in).to(xc.dtype))  # (N, E*r)
        clean = xd is xc or not self.training  # dropout is the identity: A x is the key already
        route = top_k_router(self.router_logits(xc, h if clean else None), k, self.renormalize, mask)
        if self.training:
            self.aux_loss = route.aux_loss
        if self.routing.collect:
            self._count(route.indices, mask)
        # fold alpha/r and the tier scale into the (N, E) gates rather than the (N, d_out) output
        gates = route.gates * (self.scaling * self.rescale[k - 1])  # (N, E)

        h = (h.view(n_tok, E, r) * gates.unsqueeze(-1).to(h.dtype)).view(n_tok, E * r)
        b_cat = self.lora_B.permute(1, 0, 2).reshape(self.d_out, E * r)  # (d_out, E*r)
        out = out + F.linear(h, b_cat.to(h.dtype))  # (N, d_out)
        if self.shared_A is not None:
            shared = F.linear(F.linear(xd, self.shared_A.to(xd.dtype)), self.shared_B.to(xd.dtype))
            out = out + shared * self.scaling
        return out.view(*lead, self.d_out)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, experts={self.num_experts}, rank={self.rank}, "
            f"router={self.router_type}, rescale={self.rescale_mode}, renormalize={self.renormalize}, "
            f"shared={self.shared_A is not None}"
        )


def reference_forward(layer: MoLELinear, x: torch.Tensor) -> torch.Tensor:
    """Naive per-expert loop with the same maths as `MoLELinear.forward` (test oracle, benchmarks)."""
    out = layer.base_layer(x)
    k = layer.routing.k
    xf = x.reshape(-1, layer.d_in)
    if layer.router is not None:
        logits = xf @ layer.router.t()
    else:  # key router, one expert at a time
        query = xf @ layer.token_proj.t()  # (N, r)
        logits = torch.stack([((xf @ layer.lora_A[j].t()) * query).sum(-1) for j in range(layer.num_experts)], -1)
        logits = logits / math.sqrt(layer.rank)
    probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    vals, idx = probs.topk(k, dim=-1)
    if layer.renormalize:
        vals = vals / vals.sum(-1, keepdim=True)
    xd = layer.dropout(xf)
    delta = torch.zeros(xf.shape[0], layer.d_out, dtype=xf.dtype, device=xf.device)
    for j in range(layer.num_experts):
        sel = (idx == j)  # (N, k)
        rows = sel.any(-1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        g = (vals * sel).sum(-1)[rows].to(xf.dtype)  # (n_j,)
        y = (xd[rows] @ layer.lora_A[j].t()) @ layer.lora_B[j].t()  # (n_j, d_out)
        delta = delta.index_add(0, rows, y * g.unsqueeze(-1))
    delta = delta * layer.scaling * layer.rescale[k - 1]
    if layer.shared_A is not None:
        delta = delta + (xd @ layer.shared_A.t()) @ layer.shared_B.t() * layer.scaling
    return out + delta.view(*x.shape[:-1], layer.d_out)
