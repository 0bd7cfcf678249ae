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
def mlp_inputs(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
               autocast: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per decoder layer, the MLP inputs (n_tokens, H), float32, of every real (non-padding) token of
    `batches` (the forward runs under `autocast` when given: the routers need directions, not digits)."""
    import contextlib

    layers = model.model.layers
    found: list[list[torch.Tensor]] = [[] for _ in layers]
    mask: list[torch.Tensor] = []

    def hook(i):
        return lambda module, args, out: found[i].append(args[0].reshape(-1, args[0].shape[-1])[mask[0]].float())

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].reshape(-1).bool()]
            with ctx:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(x) for x in found]


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Unit-norm centroids (k, H) of the unit-normalised rows of x (n, H) by cosine similarity."""
    if x.shape[0] < k:
        raise ValueError(f"k-means with {k} clusters needs at least {k} points, got {x.shape[0]}")
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids = xn[torch.randperm(xn.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (xn @ centroids.t()).argmax(-1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, xn)  # (k, H)
        filled = torch.bincount(assign, minlength=k) > 0  # an empty cluster keeps its centroid
        centroids[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
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
def upcycle_layer(layer: nn.Module, x: torch.Tensor, spec: SparsifySpec,
                  index: int) -> tuple[dict[str, torch.Tensor], float]:
    """Qwen2-MoE block tensors for one dense layer, E copies of its MLP and a k-means router, and the
    down-projection scale 1 / (mean kept gate mass at top-k)."""
    gate, up, down = _mlp_weights(layer)
    E = spec.num_experts
    centroids = spherical_kmeans(x, E, spec.kmeans_iters, seed=spec.seed * 1009 + index)
    router = _scaled_router(centroids, x, spec.router_spread)
    scale = 1.0 / float(_kept_mass(router, x, spec.top_k))
    return {
        "gate.weight": router,
        "experts.gate_up_proj": torch.cat([gate, up], 0).unsqueeze(0).repeat(E, 1, 1),  # (E, 2I, H)
        "experts.down_proj": (down * scale).unsqueeze(0).repeat(E, 1, 1),  # (E, H, I)
    }, scale


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
def split_layer(layer: nn.Module, x: torch.Tensor, spec: SparsifySpec,
                index: int) -> tuple[dict[str, torch.Tensor], float]:
    """Qwen2-MoE block tensors for one dense layer, its neurons split into E co-activation clusters, and
    the down-projection scale (E: uniform gates of 1/E at top-k = E)."""
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
    }, float(E)


@torch.no_grad()
def sparsify(dense: nn.Module, calibration: Iterable[dict[str, torch.Tensor]],
             spec: SparsifySpec, autocast: torch.dtype | None = None) -> tuple[nn.Module, list[float]]:
    """A Qwen2-MoE model made from `dense` (an eval-mode Llama causal LM) with `spec` (module docstring),
    and each layer's expert down-projection scale.

    `calibration`: padded token batches (input_ids, attention_mask) of text like the target data;
    they decide the routers (and the split's clusters), nothing else.
    """
    from transformers import Qwen2MoeForCausalLM

    spec.check()
    _check_dense(dense)
    xs = mlp_inputs(dense, calibration, autocast)
    inter = dense.config.intermediate_size
    width = inter if spec.construction == "upcycle" else inter // spec.num_experts
    config = qwen2_moe_config(dense.config, spec, width)
    build = upcycle_layer if spec.construction == "upcycle" else split_layer
    state, scales = {}, []
    for key, value in dense.state_dict().items():
        if ".mlp." not in key:
            state[key] = value
    for i, (layer, x) in enumerate(zip(dense.model.layers, xs)):
        tensors, scale = build(layer, x, spec, i)
        scales.append(scale)
        for name, tensor in tensors.items():
            state[f"model.layers.{i}.mlp.{name}"] = tensor.contiguous()
        state[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, dense.config.hidden_size)
    import warnings

    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # the width-0 shared expert
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
    return model.eval(), scales


# --------------------------------------------------------------------------- the embedded smollm2-moe

SMOLLM2_MOE = SparsifySpec(construction="upcycle", num_experts=8, top_k=4, router_spread=0.1, seed=0)
CALIBRATION = {"lines": (0, 40), "per_task": 2, "seed": 0, "max_len": 192}  # router fitting
HELD_OUT = {"lines": (40, 80), "per_task": 1, "seed": 1, "max_len": 128, "limit": 40}  # the card's losses


def ni_sample(root, lines: tuple[int, int], per_task: int, seed: int, limit: int | None = None) -> list:
    """A deterministic sample of Natural Instructions examples: `per_task` rows drawn (seeded) from
    lines [lines[0], lines[1]) of every subtask file, Definition-only instructions."""
    import json
    import random
    from pathlib import Path

    from fedmole.data.sources import definition_only, row_to_example
    from fedmole.data.types import Example

    root = Path(root)
    rng = random.Random(seed)
    out = []
    for task in sorted(json.loads((root / "index.json").read_text())):
        with open(root / f"{task}.jsonl", encoding="utf-8") as f:
            rows = [line for i, line in zip(range(lines[1]), f) if i >= lines[0]]
        for line in rng.sample(rows, min(per_task, len(rows))):
            ex = row_to_example(json.loads(line), f"{task}.jsonl")
            out.append(Example(definition_only(ex.instruction), ex.input, ex.outputs, ex.category, ex.task))
    return out[:limit] if limit else out


def token_batches(tokenizer, examples: list, max_len: int, batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Padded (input_ids, attention_mask, labels over every real token) batches of prompt + answer text."""
    from fedmole.data.tokenize import collate_train, encode_train

    items = [encode_train(tokenizer, ex, max_len=max_len, max_answer_tokens=64) for ex in examples]
    batches = []
    for i in range(0, len(items), batch_size):
        b = collate_train(items[i:i + batch_size], tokenizer.pad_token_id)
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
        batches.append(b)
    return batches


@torch.no_grad()
def lm_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], autocast: torch.dtype | None = None) -> float:
    """Mean next-token cross-entropy over every real token of `batches`."""
    import contextlib

    total, count = 0.0, 0
    for b in batches:
        ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        labels = b["labels"][:, 1:]
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels,
                                                         ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def tier_losses(model: nn.Module, batches: list[dict[str, torch.Tensor]], tiers: list[int],
                autocast: torch.dtype | None = None, adapter=None) -> dict[int, dict[str, float]]:
    """Held-out loss of a sparse model capped at each tier k: with FLAME's rescaler at its start value
    (top_k / k without renormalisation) and without it. Uses `adapter` (a fresh MoE LoRA adapter, B = 0)
    or wraps `model`'s MoE blocks in place with one."""
    from fedmole.adapters.inject import MoLEConfig
    from fedmole.adapters.moe_lora import inject_moe_lora

    if adapter is None:
        adapter = inject_moe_lora(model, MoLEConfig(rank=1, dropout=0.0, rescale="fixed"), k_max=max(tiers))
    model.eval()
    out = {}
    for k in tiers:
        with adapter.route(k):
            rescaled = lm_loss(model, batches, autocast)
            if all(float(layer.rescale[k - 1]) == 1.0 for layer in adapter.layers.values()):
                out[k] = {"rescaled": rescaled, "unscaled": rescaled}  # nothing to undo (k = top_k)
                continue
            saved = [layer.rescale.clone() for layer in adapter.layers.values()]
            for layer in adapter.layers.values():
                layer.rescale.fill_(1.0)
            plain = lm_loss(model, batches, autocast)
            for layer, s in zip(adapter.layers.values(), saved):
                layer.rescale.copy_(s)
        out[k] = {"rescaled": rescaled, "unscaled": plain}
    return out


def forward_flops(config, k: int, seq_len: int) -> float:
    """Forward FLOPs per token of a Llama / Qwen2-MoE decoder running k experts (matmuls only; the
    vocabulary head excluded: training projects only answer positions through it)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attention = 2 * h * head_dim * (2 * heads + 2 * kv) + 2 * 2 * heads * head_dim * seq_len / 2
    width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    experts = k if getattr(config, "num_experts", 0) else 1
    mlp = experts * 2 * 3 * h * width + (2 * h * config.num_experts if getattr(config, "num_experts", 0) else 0)
    return layers * (attention + mlp)


def model_card(spec: SparsifySpec, dense_name: str, losses: dict, dense_loss: float, config, scales: list[float],
               n_tokens: int) -> str:
    """README.md of the built checkpoint: how it was made, what each tier costs and loses."""
    rows = []
    top = max(losses)
    for k in sorted(losses, reverse=True):
        f = forward_flops(config, k, 128)
        rows.append(f"| {k} | {f / 1e6:.0f} | {f / forward_flops(config, top, 128):.2f} | "
                    f"{losses[k]['rescaled']:.4f} ({losses[k]['rescaled'] / dense_loss:.3f}x) | "
                    f"{losses[k]['unscaled']:.4f} ({losses[k]['unscaled'] / dense_loss:.3f}x) |")
    return f"""# smollm2-moe

A sparse mixture-of-experts version of {dense_name}, made offline by fedmole
(`fedmole prepare`, `fedmole.sparsify`) so that FLAME's own setting (a sparse base
model whose clients activate fewer experts per token) runs without downloading an MoE.
It is a standard transformers Qwen2-MoE checkpoint: `AutoModelForCausalLM.from_pretrained(path)`.

## How it was made
- Sparse upcycling (Komatsuzaki et al., ICLR 2023): each of the {config.num_hidden_layers} MLPs became
  {spec.num_experts} experts, every one a copy of the dense MLP ({config.moe_intermediate_size} SwiGLU neurons);
  attention, norms and embeddings are the dense model's (Qwen2-MoE with q/k/v bias off, a shared
  expert of width 0).
- Router: per layer, the centroids of a spherical k-means ({spec.kmeans_iters} iterations, seed {spec.seed}) over
  the MLP inputs of {n_tokens} calibration tokens of Natural Instructions (definition-only prompts with
  answers), scaled so the router logits have standard deviation {spec.router_spread}: tokens go to the
  experts whose centroids they are closest to, with gates close to uniform.
- Gates: softmax, top-{spec.top_k}, **not renormalised** (`norm_topk_prob=False`). The expert down-projections
  are scaled per layer by 1 / (mean kept gate mass at top-{spec.top_k}) = {min(scales):.3f}..{max(scales):.3f},
  so the native top-{spec.top_k} reproduces the dense model; a tier of k < {spec.top_k} keeps about k/{spec.top_k}
  of the mass, the output-magnitude mismatch FLAME's rescaler (start value {spec.top_k}/k) corrects.
- The experts start identical; fine-tuning (a LoRA per expert, fedmole's FLAME on an MoE base) is what
  makes them differ. Compute grows with k: a tier-k client runs k expert MLPs per token.

## What each tier costs and loses
Forward FLOPs per token (matmuls, 128-token sequences, vocabulary head excluded) and the mean token
loss on {HELD_OUT['limit']} held-out Natural Instructions examples (lines {HELD_OUT['lines'][0]}-{HELD_OUT['lines'][1]} of every
subtask file; the dense model: {dense_loss:.4f}), with the rescaler's start value and without any rescaling:

| tier k | MFLOP / token | vs top tier | loss, rescaled (vs dense) | loss, unscaled (vs dense) |
|---|---|---|---|---|
{chr(10).join(rows)}

Measured step times per tier: `python benchmarks/sparse_model.py` (it also measures the constructions
that were not chosen).
"""


def build_smollm2_moe(dense_dir, ni_root, out_dir, spec: SparsifySpec = SMOLLM2_MOE, log=print) -> dict:
    """Build the embedded `smollm2-moe` from the cached dense SmolLM2 into `out_dir`; return its facts.

    Deterministic: the calibration and held-out samples, the k-means and the model are fixed by `spec`.
    """
    import time
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmole.engine.setup import pick_autocast

    started = time.perf_counter()
    autocast = pick_autocast("auto", torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    c = CALIBRATION
    calibration = token_batches(tokenizer, ni_sample(ni_root, c["lines"], c["per_task"], c["seed"]), c["max_len"])
    n_tokens = sum(int(b["attention_mask"].sum()) for b in calibration)
    log(f"fitting routers on {n_tokens} calibration tokens ...")
    model, scales = sparsify(dense, calibration, spec, autocast)
    log(f"built the sparse model ({time.perf_counter() - started:.0f} s so far)")
    h = HELD_OUT
    held = token_batches(tokenizer, ni_sample(ni_root, h["lines"], h["per_task"], h["seed"], h["limit"]), h["max_len"])
    dense_loss = lm_loss(dense, held, autocast)
    del dense
    out = Path(out_dir)
    log(f"saving the sparse model to {out} ...")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log(f"measuring the held-out loss at every tier ({time.perf_counter() - started:.0f} s so far) ...")
    losses = tier_losses(model, held, list(range(spec.top_k, 0, -1)), autocast)
    return {"spec": spec, "losses": losses, "dense_loss": dense_loss, "config": model.config,
            "calibration_tokens": n_tokens, "seconds": time.perf_counter() - started, "scales": scales}
