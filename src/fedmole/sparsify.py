"""Make a sparse mixture-of-experts checkpoint from a dense Llama-architecture causal LM.

No pretrained MoE can be downloaded here, so FLAME's own setting (a sparse
base model whose clients activate fewer experts per token) runs on a sparse
model made from SmolLM2. The result is a standard transformers Qwen2-MoE
model (q/k/v bias off, shared expert of width 0, `norm_topk_prob=False`)
that plain `AutoModelForCausalLM.from_pretrained` loads. Two constructions:

- **upcycle** (sparse upcycling, Komatsuzaki et al., ICLR 2023): every one of
  the E experts starts as a copy of the layer's dense MLP. The router's rows
  are the centroids of a spherical k-means over the layer's MLP inputs on
  calibration text, scaled so that router logits spread by `router_spread`
  (routing then follows the input, while the gates stay close to uniform).
  With un-renormalised softmax gates the block's output is the kept gate mass
  times the dense MLP; the expert down-projections are scaled by 1 / (mean
  kept mass at the native top-k), so the native top-k reproduces the dense
  model, and a tier of k < top-k sees about k / top-k of the MLP output: the
  magnitude mismatch FLAME's rescaler (init top_k / k) corrects.
- **split** (MoEfication-style neuron split): each MLP's intermediate neurons
  are clustered by co-activation into E equal groups, one expert each; the
  router is a least-squares fit of each expert's output norm on the MLP input,
  scaled to tiny logits so that the native top-k = E gates are uniform, and the
  down-projections are scaled by E. Exact with every expert active; lower k
  keeps the experts with the largest predicted output.

Both are deterministic for a seed. `fedmole.assets.prepare_smollm2_moe` builds
the embedded `smollm2-moe` with `upcycle`; `benchmarks/sparse_model.py`
measures both constructions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

CONSTRUCTIONS = ("upcycle", "split")


@dataclass
class SparsifySpec:
    """How to build the sparse model."""

    construction: str = "upcycle"  # upcycle | split
    num_experts: int = 8  # experts per layer (E)
    top_k: int = 4  # experts per token at full compute (the model's num_experts_per_tok)
    router_spread: float = 0.1  # upcycle: std of the router logits over tokens and experts
    kmeans_iters: int = 25  # upcycle: spherical k-means iterations for the router rows
    seed: int = 0

    def check(self) -> None:
        if self.construction not in CONSTRUCTIONS:
            raise ValueError(f"construction={self.construction!r}; allowed: {', '.join(CONSTRUCTIONS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..num_experts ({self.num_experts})")
        if self.construction == "split" and self.top_k != self.num_experts:
            raise ValueError("the neuron split is exact only with every expert active: set top_k = num_experts")
        if self.router_spread <= 0:
            raise ValueError(f"router_spread={self.router_spread} must be > 0")


def _check_dense(model: nn.Module) -> None:
    cfg = model.config
    if cfg.model_type != "llama" or getattr(cfg, "mlp_bias", False) or getattr(cfg, "attention_bias", False):
        raise ValueError(
            f"sparsify needs a bias-free Llama-architecture model (SmolLM2 is one); got model_type "
            f"{cfg.model_type!r}, mlp_bias={getattr(cfg, 'mlp_bias', None)}, "
            f"attention_bias={getattr(cfg, 'attention_bias', None)}"
        )


def qwen2_moe_config(dense_config, spec: SparsifySpec, expert_width: int):
    """A Qwen2-MoE config whose attention, norms and embeddings reproduce the dense Llama's."""
    from transformers import Qwen2MoeConfig

    c = dense_config
    return Qwen2MoeConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        qkv_bias=False,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=expert_width,
        shared_expert_intermediate_size=0,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        norm_topk_prob=False,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    )


@torch.no_grad()
def mlp_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Per decoder layer, the MLP inputs (n_tokens, H) of every real (non-padding) token of `batches`."""
    layers = model.model.layers
    found: list[list[torch.Tensor]] = [[] for _ in layers]
    mask: list[torch.Tensor] = []

    def hook(i):
        return lambda module, args, out: found[i].append(args[0].reshape(-1, args[0].shape[-1])[mask[0]].float())

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].reshape(-1).bool()]
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in found]


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Unit-norm centroids (k, H) of the unit-normalised rows of x (n, H) by cosine similarity."""
    if x.shape[0] < k:
        raise ValueError(f"k-means with {k} clusters needs at least {k} points, got {x.shape[0]}")
    xn = torch.nn.functional.normalize(x.double(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = xn[torch.randperm(xn.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (xn @ centroids.t()).argmax(-1)  # (n,)
        for j in range(k):
            members = xn[assign == j]
            if members.shape[0]:
                centroids[j] = torch.nn.functional.normalize(members.sum(0), dim=0)
    return centroids.float()


def _mlp_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = layer.mlp
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj.weight.detach()


def _scaled_router(centroids: torch.Tensor, x: torch.Tensor, spread: float) -> torch.Tensor:
    """Router weight (E, H) along `centroids` whose logits on x have standard deviation `spread`."""
    logits = x @ centroids.t()  # (n, E)
    return centroids * (spread / logits.std().clamp_min(1e-12))


def _kept_mass(router: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over tokens of the top-k softmax gate mass."""
    probs = torch.softmax(x @ router.t(), dim=-1)
    return probs.topk(k, dim=-1).values.sum(-1).mean()


@torch.no_grad()
def upcycle_layer(layer: nn.Module, x: torch.Tensor, spec: SparsifySpec, index: int) -> dict[str, torch.Tensor]:
    """Qwen2-MoE block tensors for one dense layer: E copies of its MLP and a k-means router."""
    gate, up, down = _mlp_weights(layer)
    E = spec.num_experts
    centroids = spherical_kmeans(x, E, spec.kmeans_iters, seed=spec.seed * 1009 + index)
    router = _scaled_router(centroids, x, spec.router_spread)
    scale = 1.0 / float(_kept_mass(router, x, spec.top_k))
    return {
        "gate.weight": router,
        "experts.gate_up_proj": torch.cat([gate, up], 0).unsqueeze(0).repeat(E, 1, 1),  # (E, 2I, H)
        "experts.down_proj": (down * scale).unsqueeze(0).repeat(E, 1, 1),  # (E, H, I)
    }


def _balanced_assign(scores: torch.Tensor, size: int) -> torch.Tensor:
    """Give each row of scores (n, E) one column, at most `size` rows per column, best scores first."""
    n, E = scores.shape
    order = scores.flatten().argsort(descending=True)
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(E, dtype=torch.long)
    for flat in order.tolist():
        row, col = divmod(flat, E)
        if assign[row] < 0 and load[col] < size:
            assign[row] = col
            load[col] += 1
    return assign


@torch.no_grad()
def split_layer(layer: nn.Module, x: torch.Tensor, spec: SparsifySpec, index: int) -> dict[str, torch.Tensor]:
    """Qwen2-MoE block tensors for one dense layer: its neurons split into E co-activation clusters."""
    gate, up, down = _mlp_weights(layer)
    E, inter = spec.num_experts, gate.shape[0]
    if inter % E:
        raise ValueError(f"cannot split {inter} neurons into {E} equal experts")
    size = inter // E
    act = torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())  # (n, I)
    profile = torch.nn.functional.normalize(act.abs().t(), dim=-1)  # (I, n): each neuron's activation pattern
    centroids = spherical_kmeans(profile, E, spec.kmeans_iters, seed=spec.seed * 1009 + index)
    groups = _balanced_assign(profile @ centroids.t(), size)  # (I,)
    idx = [torch.nonzero(groups == j).flatten() for j in range(E)]
    # router: least-squares fit of each expert's output norm on the MLP input, then tiny logits
    norms = torch.stack([(act[:, ij] @ down[:, ij].t()).norm(dim=-1) for ij in idx], -1)  # (n, E)
    xb = torch.cat([x, torch.ones(x.shape[0], 1)], -1).double()
    sol = torch.linalg.lstsq(xb, (norms - norms.mean(0)).double()).solution[:-1].t().float()  # (E, H)
    router = sol * (1e-3 / (x @ sol.t()).std().clamp_min(1e-12))
    return {
        "gate.weight": router,
        "experts.gate_up_proj": torch.stack([torch.cat([gate[ij], up[ij]], 0) for ij in idx]),  # (E, 2I/E, H)
        "experts.down_proj": torch.stack([down[:, ij] * E for ij in idx]),  # (E, H, I/E)
    }


@torch.no_grad()
def sparsify(dense: nn.Module, calibration: Iterable[dict[str, torch.Tensor]], spec: SparsifySpec) -> nn.Module:
    """A Qwen2-MoE model made from `dense` (an eval-mode Llama causal LM) with `spec` (module docstring).

    `calibration`: padded token batches (input_ids, attention_mask) of text like the target data;
    they decide the routers (and the split's clusters), nothing else.
    """
    from transformers import Qwen2MoeForCausalLM

    spec.check()
    _check_dense(dense)
    xs = mlp_inputs(dense, calibration)
    inter = dense.config.intermediate_size
    width = inter if spec.construction == "upcycle" else inter // spec.num_experts
    config = qwen2_moe_config(dense.config, spec, width)
    build = upcycle_layer if spec.construction == "upcycle" else split_layer
    state = {}
    for key, value in dense.state_dict().items():
        if ".mlp." not in key:
            state[key] = value
    for i, (layer, x) in enumerate(zip(dense.model.layers, xs)):
        for name, tensor in build(layer, x, spec, i).items():
            state[f"model.layers.{i}.mlp.{name}"] = tensor.contiguous()
        state[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, dense.config.hidden_size)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if "shared_expert." not in k and k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"sparse model state mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, module in model.named_modules():  # the width-0 shared experts and anything else left on meta
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, pname, nn.Parameter(torch.zeros(p.shape, dtype=torch.float32)))
    if config.tie_word_embeddings:
        model.tie_weights()
    rotary = model.model.rotary_emb
    if any(b.is_meta for b in rotary.buffers()):
        model.model.rotary_emb = type(rotary)(config=config)
    model.generation_config = dense.generation_config
    return model.eval()
