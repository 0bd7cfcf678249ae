"""LoRA on the experts of a sparse MoE base model, with a per-call top-k cap (spec 1.2, 1.4).

FLAME's own setting: the base model is a sparse mixture of experts (OLMoE:
64 experts, top-8, gates not renormalised). Every pretrained expert FFN gets
its own LoRA on its fused gate/up projection and on its down projection; a
client of tier k keeps the base router but runs only its top-k experts per
token (k <= the model's top-k), so the skipped experts cost nothing:

    y = s_k * sum_{j in topk(p(x), k)} g_j(x) * FFN_j(x)        (+ gated shared expert, Qwen2-MoE)
    FFN_j(x) = (W^d_j + (a/r) B^d_j A^d_j) (act(gate) * up),
    [gate; up] = (W^gu_j + (a/r) B^gu_j A^gu_j) x

with g the softmax gates kept at top-k, renormalised exactly as the family
does at full top-k (OLMoE and Qwen2-MoE: no, Mixtral: yes, Qwen3-MoE: as
`norm_topk_prob`), and s_k the tier rescaler (init top_k/k when the gates are
not renormalised, 1 otherwise).

The gate and up projections are one fused weight in transformers 5 ([gate; up],
2I x H), and they get one LoRA pair: A^gu (r x H) is shared by both halves and
B^gu (2I x r) has a gate half and an up half. That is a rank-r update of the
fused matrix (PEFT's separate gate_proj and up_proj pairs would be two rank-r
updates, rank up to 2r, with twice the A parameters); the choice keeps one
grouped matmul per projection and the per-expert tensors the aggregation
averages.

The frozen base router gets no load-balancing loss: its only gradient would
reach the LoRA tensors of earlier layers through the hidden states. With
`train_router` the trained copy does.

For the rank-based baselines (`inject_moe_lora_ranked`) the same block runs the
model's full top-k and compresses each expert's LoRA by rank instead.

Routed (token, slot) rows are sorted by expert and each projection runs as
one grouped matmul over the experts' row blocks (`torch.nn.functional.
grouped_mm`; a per-expert loop over experts that received rows where it is
unavailable), so only selected experts compute and no Python loop runs over
experts on CPU. On CPU each block is padded with zero rows to a multiple of
`ROW_BUCKET`, so that the matmul kernels oneDNN compiles per shape are reused.
The gate/up LoRA A runs once per token for all experts (r columns each, a
small dense matmul) instead of once per routed row.

LoRA dropout (spec: dropout on the LoRA input) draws one mask per token and
layer input, which the token's k experts share, as the dense MoLE layer's
experts share theirs; p is rounded to a multiple of 1/65536 (`keep_mask`).

Saved tensors (names keyed by FLAME's aggregation: a `lora_` prefix marks a
first dimension that indexes experts): `lora_gate_up_A` (E, r, H),
`lora_gate_up_B` (E, 2I, r), `lora_down_A` (E, r, I), `lora_down_B` (E, H, r),
`rescale` (top_k,) when learned, `router` (E, H) when the router is trained.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fedmole.adapters.inject import MoLEAdapter, MoLEConfig, wrap_modules
from fedmole.adapters.lora import ActiveRank, LoRAAdapter, LoRAConfig
from fedmole.adapters.mole import RESCALE_MODES, ExpertCounter, Routing, compute_dtype, init_rescaler, top_k_router

# model_type -> (module, sparse block class) of the supported transformers families
FAMILIES = {
    "olmoe": ("transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
}

EXPERT_TENSORS = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")

# On CPU each expert's block of routed rows is padded with zero rows to a multiple of this. oneDNN
# compiles a kernel for every new matmul shape (ONEDNN_VERBOSE=2 shows about 0.4 ms each); unpadded,
# nearly every expert of every layer has a row count of its own, and compiling kernels took about
# an eighth of a k = 1 training step of smollm2-moe. Padded, the shapes come from a small set that
# its primitive cache keeps (fedmole raises that cache's capacity: see fedmole/__init__.py).
ROW_BUCKET = 16


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands: its kernels want rows of a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm") or any(d * x.element_size() % 16 for d in weight.shape[1:]):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group linear map over rows sorted by group.

    x: (M, d_in), rows offs[g-1]:offs[g] belong to group g; weight: (G, d_out, d_in);
    offs: (G,) int32 cumulative row counts. Returns (M, d_out); groups with no
    rows cost nothing.
    """
    weight = weight.to(x.dtype)
    if _grouped_mm_supported(x, weight):
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offs)
    bounds = [0, *offs.tolist()]
    parts = [F.linear(x[a:b], weight[g]) for g, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])) if b > a]
    return torch.cat(parts) if parts else x.new_zeros(0, weight.shape[1])


def dropout_rate(p: float) -> float:
    """The dropout rate `keep_mask` draws: p rounded to a multiple of 1/65536."""
    return round(p * 65536) / 65536


def keep_mask(n: int, width: int, p: float, dtype: torch.dtype, device=None) -> torch.Tensor:
    """(n, width) Bernoulli(1 - p) keep-mask of 0/1 values in `dtype`, p rounded as `dropout_rate`.

    Four 16-bit uniform integers come from each 64-bit draw of torch's generator: a quarter of
    the generator calls of `bernoulli_`, whose per-element draws cost a sparse block's lowest
    tier a noticeable share of its training step on CPU (and run on one thread).
    """
    words = torch.empty((n * width + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[: n * width].view(n, width)  # uniform over -32768..32767
    return (lanes >= -32768 + round(p * 65536)).to(dtype)


class MoELoRABlock(ExpertCounter, nn.Module):
    """A frozen sparse MoE block (router + stacked experts) with per-expert LoRA and a top-k cap.

    The base submodules keep their names (`gate`, `experts`, and Qwen2-MoE's
    `shared_expert`, `shared_expert_gate`), so the base weights keep their
    state-dict keys. Input and output: (..., H).
    """

    def __init__(
        self,
        block: nn.Module,
        routing: Routing,
        *,
        top_k: int,
        renormalize: bool,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rescale: str = "learned",
        train_router: bool = False,
        active: ActiveRank | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if rescale not in RESCALE_MODES:
            raise ValueError(f"rescale={rescale!r}; allowed: {', '.join(RESCALE_MODES)}")
        self.gate = block.gate
        self.experts = block.experts
        self.shared_expert = getattr(block, "shared_expert", None)
        self.shared_expert_gate = getattr(block, "shared_expert_gate", None)
        # a shared expert of width 0 (as in fedmole's sparsified models) adds nothing: skip its call
        self.has_shared = self.shared_expert is not None and getattr(self.shared_expert, "intermediate_size", 1) > 0
        self.jitter_noise = float(getattr(block, "jitter_noise", 0.0))
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        E, two_i, H = gate_up.shape
        if down.shape != (E, H, two_i // 2) or self.gate.weight.shape != (E, H):
            raise ValueError(
                f"unexpected expert layout: gate_up_proj {tuple(gate_up.shape)}, down_proj {tuple(down.shape)}, "
                f"router {tuple(self.gate.weight.shape)}; expected (E, 2I, H), (E, H, I), (E, H)"
            )
        self.routing = routing
        self.num_experts, self.hidden, self.intermediate = E, H, two_i // 2
        self.top_k, self.rank, self.alpha, self.scaling = top_k, rank, alpha, alpha / rank
        self.active = active  # rank-truncation mode (the LoRA baselines): every call runs the full top-k
        self.renormalize = renormalize
        self.rescale_mode = rescale
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout={dropout}; allowed: 0 <= dropout < 1")
        self.dropout_p = float(dropout)
        dev = gate_up.device

        def lora_a(d_in: int) -> nn.Parameter:  # kaiming-uniform (a=sqrt(5)) as in PEFT: U(+-1/sqrt(d_in))
            bound = 1.0 / math.sqrt(d_in)
            return nn.Parameter(torch.empty(E, rank, d_in).uniform_(-bound, bound, generator=generator).to(dev))

        self.lora_gate_up_A = lora_a(H)  # (E, r, H)
        self.lora_gate_up_B = nn.Parameter(torch.zeros(E, two_i, rank, device=dev))  # (E, 2I, r)
        self.lora_down_A = lora_a(self.intermediate)  # (E, r, I)
        self.lora_down_B = nn.Parameter(torch.zeros(E, H, rank, device=dev))  # (E, H, r)

        init_rescaler(self, rescale, top_k, top_k, renormalize, dev)  # (top_k,): entry k-1 scales tier k
        # a trained router starts from the base gate, which then stays untouched
        self.router = nn.Parameter(self.gate.weight.detach().float().clone()) if train_router else None

        self._init_counts(E)
        self.aux_loss: torch.Tensor | None = None
        self._cast_cache: dict[tuple[str, torch.dtype], tuple[tuple, torch.Tensor]] = {}
        self._deltas: dict[str, torch.Tensor] = {}  # projection -> merged base delta (FLoRA), see set_delta

    def adapter_names(self) -> list[str]:
        """Names of this block's trainable adapter tensors (the saved state)."""
        names = list(EXPERT_TENSORS)
        if self.rescale_mode == "learned":
            names.append("rescale")
        if self.router is not None:
            names.append("router")
        return names

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        k = self.top_k if self.active is not None else self.routing.k
        if not 1 <= k <= self.top_k:
            raise ValueError(f"active experts k={k}; allowed: 1..{self.top_k} (the base model's top-k)")
        lead = hidden_states.shape[:-1]
        flat = hidden_states.reshape(-1, self.hidden)  # (N, H)
        x = flat
        if self.training and self.jitter_noise > 0:  # Mixtral's multiplicative router/expert input noise
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        mask = self.routing.token_mask
        if mask is not None and mask.numel() != x.shape[0]:
            mask = None  # e.g. cached generation steps: every token is real

        weight = self.router if self.router is not None else self.gate.weight
        route = top_k_router(F.linear(x, weight.to(compute_dtype(x))), k, self.renormalize, mask)
        if self.training and self.router is not None:  # a frozen router has nothing to balance
            self.aux_loss = route.aux_loss
        if self.routing.collect:
            self._count(route.indices, mask)
        gates = route.gates.gather(-1, route.indices) * self.rescale[k - 1]  # (N, k) float32, s_k folded in
        out = self._experts(x, route.indices, gates)  # (N, H)

        if self.has_shared:  # Qwen2-MoE: an always-on expert behind a sigmoid gate
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.view(*lead, self.hidden)

    def _experts(self, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """sum_slots gate * FFN_expert(x) computing only the selected (token, expert) rows.

        x: (N, H); indices, gates: (N, k). Returns (N, H) in x's dtype.

        The frozen projections run as grouped matmuls over the M = N*k routed
        rows. The LoRA A of the gate/up pair runs once per token for all E
        experts (N x E*r outputs, a few percent of one expert's gate/up cost)
        and each routed row takes its expert's r columns: that reads x once
        instead of k times. LoRA dropout draws one mask per token and layer
        input, shared by the token's experts (as the dense MoLE layer shares it
        across its experts), and its 1/(1-p) and alpha/r scales act on the
        r-wide LoRA activations, not on 2I-wide outputs.
        """
        n, k = indices.shape
        E, H = self.num_experts, self.hidden
        flat = indices.reshape(-1)  # (N*k,)
        order = flat.argsort(stable=True)  # (M,) routed rows grouped by expert, M = N*k
        expert_of = flat[order]  # (M,)
        counts = torch.bincount(flat, minlength=E)  # (E,)
        bucket = ROW_BUCKET if x.device.type == "cpu" else 1
        padded = (counts + bucket - 1).div(bucket, rounding_mode="floor") * bucket  # (E,) rows per expert
        ends = padded.cumsum(0)
        m_pad = int(ends[-1])
        # each routed row's place in the padded layout; padding rows point at token N, a zero row
        rank_in_block = torch.arange(flat.numel(), device=x.device) - (counts.cumsum(0) - counts)[expert_of]
        place = (ends - padded)[expert_of] + rank_in_block
        token = torch.full((m_pad,), n, dtype=torch.long, device=x.device)
        token[place] = order.div(k, rounding_mode="floor")
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), padded)  # (M',)
        row_gate = gates.new_zeros(m_pad)
        row_gate[place] = gates.reshape(-1)[order]
        offs = ends.to(torch.int32)

        dt = compute_dtype(x)
        xe = torch.cat([x.to(dt), x.new_zeros(1, H, dtype=dt)])  # (N+1, H)
        xs = xe.index_select(0, token)  # (M', H)
        rank, scaling, a_gu, b_gu, a_d, b_d = self._lora_tensors(dt)
        p = dropout_rate(self.dropout_p) if self.training else 0.0
        scaling = scaling / (1.0 - p)

        # gate/up: LoRA A of every expert on each token once, then each row's expert block of r columns
        z_all = F.linear(self._token_dropout(xe, p), a_gu.reshape(-1, H))  # (N+1, E*r)
        z = z_all.view(-1, rank).index_select(0, token * E + expert)  # (M', r)
        gu = grouped_linear(xs, self._base_weight("gate_up_proj", dt), offs)  # (M', 2I)
        gu = gu + grouped_linear(self._pad_rank(z * scaling), b_gu, offs)
        g, u = gu.chunk(2, dim=-1)
        h = self.experts.act_fn(g) * u  # (M', I)

        # down: per-row LoRA A (its input differs per expert), with the token's dropout mask
        hd = h if p == 0.0 else h * self._keep_mask(n + 1, self.intermediate, p, dt).index_select(0, token)
        zd = grouped_linear(hd, a_d, offs) * scaling  # (M', r + pad)
        ys = grouped_linear(h, self._base_weight("down_proj", dt), offs)  # (M', H)
        ys = ys + grouped_linear(zd, b_d, offs)

        ys = ys * row_gate.unsqueeze(-1).to(ys.dtype)
        return x.new_zeros(n + 1, H).index_add(0, token, ys.to(x.dtype))[:n]

    def _keep_mask(self, n: int, width: int, p: float, dtype: torch.dtype) -> torch.Tensor:
        """(n, width) 0/1 dropout keep-mask in `dtype` (unscaled: the 1/(1-p) acts on the LoRA activations)."""
        return keep_mask(n, width, p, dtype, self.lora_down_A.device)

    def _token_dropout(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return x if p == 0.0 else x * self._keep_mask(x.shape[0], x.shape[1], p, x.dtype)

    def _lora_tensors(self, dtype: torch.dtype) -> tuple[int, float, *tuple[torch.Tensor, ...]]:
        """(rank, alpha/rank, A_gu (E, r, H), B_gu, A_d, B_d) in `dtype`, the B and A_d ranks zero-padded.

        In rank-truncation mode only the first `active.rank` components run, scaled by alpha / that rank.
        Zero rank padding keeps the grouped-matmul rows 16-byte aligned.
        """
        rank, scaling = self.rank, self.scaling
        a_gu, b_gu, a_d, b_d = (getattr(self, n).to(dtype) for n in EXPERT_TENSORS)
        if self.active is not None:
            rank = self.active.rank
            if not 1 <= rank <= self.rank:
                raise ValueError(f"active LoRA rank {rank}; allowed: 1..{self.rank}")
            a_gu, b_gu, a_d, b_d, scaling = a_gu[:, :rank], b_gu[..., :rank], a_d[:, :rank], b_d[..., :rank], \
                self.alpha / rank
        pad = self._rank_pad(rank, dtype)
        if pad:
            b_gu, a_d, b_d = F.pad(b_gu, (0, pad)), F.pad(a_d, (0, 0, 0, pad)), F.pad(b_d, (0, pad))
        return rank, scaling, a_gu, b_gu, a_d, b_d

    @staticmethod
    def _rank_pad(rank: int, dtype: torch.dtype) -> int:
        return -rank % (16 // dtype.itemsize)

    def _pad_rank(self, z: torch.Tensor) -> torch.Tensor:
        pad = self._rank_pad(z.shape[-1], z.dtype)
        return F.pad(z, (0, pad)) if pad else z

    def _base_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A frozen expert weight (plus its merged delta, `set_delta`) in the compute dtype, made
        once and reused while neither changes.

        Under autocast every call would otherwise re-cast all E experts (autocast
        caches only weights that require grad), a cost that does not shrink with
        k; the price is one copy of the expert weights in the autocast dtype.
        """
        w = getattr(self.experts, name)
        delta = self._deltas.get(name)
        if delta is None and (w.dtype == dtype or w.requires_grad):
            return w
        stamp = (w.data_ptr(), w._version, None if delta is None else delta._version)
        hit = self._cast_cache.get((name, dtype))
        if hit is None or hit[0] != stamp:
            with torch.inference_mode(False):  # a copy made while generating must still serve training
                base = w.detach() if delta is None else w.detach() + delta.to(device=w.device, dtype=w.dtype)
                hit = (stamp, base.to(dtype))
            self._cast_cache[(name, dtype)] = hit
        return hit[1]

    def merged_weight(self, name: str) -> torch.Tensor:
        """`experts.<name>` with its merged delta, in the weight's own dtype (what the forward uses)."""
        w = getattr(self.experts, name).detach()
        delta = self._deltas.get(name)
        return w if delta is None else w + delta.to(device=w.device, dtype=w.dtype)

    @torch.no_grad()
    def set_delta(self, delta: torch.Tensor | None, pair: str) -> None:
        """Make one projection of every expert W0_e + delta_e (FLoRA's merged base), or W0 for None.

        pair: "lora_gate_up_A" (delta (E, 2I, H)) or "lora_down_A" (delta (E, H, I)).
        The block keeps a reference to `delta` (the caller must not change it in place) and
        leaves the frozen weights W0 untouched: the sum is made in the compute dtype when the
        forward first needs it, so no copy of W0 is held to restore it.
        """
        name = {"lora_gate_up_A": "gate_up_proj", "lora_down_A": "down_proj"}[pair]
        if delta is not None:
            w = getattr(self.experts, name)
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"merged delta for {name} has shape {tuple(delta.shape)}, expected {tuple(w.shape)}")
        if self._deltas.get(name) is delta:
            return
        if delta is None:
            self._deltas.pop(name, None)
        else:
            self._deltas[name] = delta
        for key in [k for k in self._cast_cache if k[0] == name]:  # made from the previous delta
            del self._cast_cache[key]

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden}, "
            f"intermediate={self.intermediate}, rank={self.rank}, renormalize={self.renormalize}, "
            f"rescale={self.rescale_mode}, train_router={self.router is not None}, "
            f"shared_expert={self.shared_expert is not None}"
        )


def is_moe_model(model: nn.Module) -> bool:
    """True for a sparse MoE causal LM (a supported family, or any config with experts per token)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) in FAMILIES or bool(getattr(config, "num_experts_per_tok", 0))


def _family(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"LoRA on MoE experts does not support model type {model_type!r} ({type(model).__name__}); "
            f"supported: {', '.join(FAMILIES)}"
        )
    return model_type


def _renormalizes(family: str, config) -> bool:
    """Whether the family renormalises its kept top-k gates (read as the family's router does)."""
    return True if family == "mixtral" else bool(config.norm_topk_prob)


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Full names of the sparse MoE blocks of a supported model (dense MLP layers are skipped)."""
    family = _family(model)
    module_name, class_name = FAMILIES[family]
    block_cls = getattr(importlib.import_module(module_name), class_name)
    names = [n for n, m in model.named_modules() if isinstance(m, block_cls)]
    if not names:
        raise ValueError(f"{type(model).__name__} ({family}) has no {class_name} to adapt (already adapted?)")
    return names


def inject_moe_lora(
    model: nn.Module, cfg: MoLEConfig, k_max: int | None = None, *, train_router: bool | None = None
) -> MoLEAdapter:
    """Wrap every sparse MoE block of `model` with per-expert LoRA (in place) and freeze the base.

    Uses cfg.rank, alpha, dropout, rescale, init_seed. The experts, their gate
    normalisation and any shared expert come from the model, so cfg.num_experts,
    targets, router, renormalize and shared_expert do not apply. `k_max` (the
    largest tier) must not exceed the model's top-k; `train_router` defaults to
    `cfg.train_router` where the config has that field, else False.
    """
    family = _family(model)
    if cfg.rescale not in RESCALE_MODES:
        raise ValueError(f"adapter.rescale={cfg.rescale!r}; allowed: {', '.join(RESCALE_MODES)}")
    top_k = int(model.config.num_experts_per_tok)
    if k_max is not None and not 1 <= k_max <= top_k:
        raise ValueError(
            f"largest tier k={k_max} does not fit this {family} model, which routes each token to "
            f"{top_k} experts; tiers must be in 1..{top_k}"
        )
    if train_router is None:
        train_router = bool(getattr(cfg, "train_router", False))
    renormalize = _renormalizes(family, model.config)
    names = find_moe_blocks(model)
    model.requires_grad_(False)
    routing = Routing(k=k_max or top_k)
    gen = torch.Generator().manual_seed(cfg.init_seed)
    layers = wrap_modules(model, names, lambda base: MoELoRABlock(
        base,
        routing,
        top_k=top_k,
        renormalize=renormalize,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        rescale=cfg.rescale,
        train_router=train_router,
        generator=gen,
    ))
    return MoLEAdapter(model, layers, routing, cfg)


def inject_moe_lora_ranked(model: nn.Module, cfg: MoLEConfig, seed: int, k_max: int | None = None) -> LoRAAdapter:
    """Per-expert LoRA for the rank-based baselines on a sparse MoE base (in place; base frozen).

    Every expert of every sparse block gets a LoRA of rank cfg.rank, as FLAME does, but a client
    of tier k compresses rank instead of experts: it runs the model's full top-k with the first
    cfg.rank * k / top_k components of each expert's LoRA, the same number of active adapter
    parameters per token as a FLAME client activating k rank-cfg.rank experts. The returned
    `LoRAAdapter` maps tiers to ranks (`rank_of`) for the LoRA methods.
    """
    family = _family(model)
    top_k = int(model.config.num_experts_per_tok)
    if k_max is not None and not 1 <= k_max <= top_k:
        raise ValueError(f"largest tier k={k_max} does not fit this {family} model, which routes each token to "
                         f"{top_k} experts; tiers must be in 1..{top_k}")
    if cfg.rank % top_k:
        raise ValueError(f"on an MoE base a tier-k LoRA baseline runs per-expert rank adapter.rank * k / top_k; "
                         f"adapter.rank = {cfg.rank} must be a multiple of the model's top-k ({top_k})")
    names = find_moe_blocks(model)
    model.requires_grad_(False)
    routing = Routing(k=top_k)
    active = ActiveRank(rank=cfg.rank)
    gen = torch.Generator().manual_seed(seed)
    layers = wrap_modules(model, names, lambda base: MoELoRABlock(
        base, routing, top_k=top_k, renormalize=_renormalizes(family, model.config), rank=cfg.rank,
        alpha=cfg.alpha, dropout=cfg.dropout, rescale="off", train_router=False, active=active, generator=gen,
    ))
    lora_cfg = LoRAConfig(rank=cfg.rank, rank_per_tier=cfg.rank // top_k, alpha=cfg.alpha, dropout=cfg.dropout,
                          targets=[], init_seed=seed)
    return LoRAAdapter(model, layers, active, lora_cfg)
