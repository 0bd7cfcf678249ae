"""Estimated training FLOPs per token of a model with its adapter at a tier (analytic, matmuls only).

A frozen base matmul costs 2x its forward FLOPs in training (forward plus the input gradient); an
adapter matmul 3x (forward plus input and weight gradients). A multiply-add counts 2 FLOPs.
Counted per token of a `seq_len`-token sequence:

- every frozen linear layer of the base (the vocabulary head excluded: training projects only
  the answer positions through it, a few tokens of each sequence);
- attention scores and values over the causal average of seq_len / 2 keys;
- MoLE layers compute every expert (the dense path: lower tiers save nothing), plus the router;
- LoRA layers and per-expert LoRA compressed by rank run their tier's rank;
- sparse MoE blocks run k experts (a tier-k FLAME client) or the model's full top-k (the rank-based
  baselines), each expert's FFN and LoRA pairs, plus the router.

The estimate is what `summary.json` reports per tier next to the measured step seconds.
"""

from __future__ import annotations

import torch
from torch import nn


def _linear_flops(module: nn.Module) -> float:
    w = module.weight
    return 2.0 * w.shape[0] * w.shape[1]


def flops_per_token(model: nn.Module, adapter, k: int, seq_len: int) -> float:
    """Training FLOPs per token at tier k (see the module docstring); `adapter` is the model's handle."""
    from fedmole.adapters.amole import AMoLELinear
    from fedmole.adapters.lora import LoRALinear
    from fedmole.adapters.moe_lora import MoELoRABlock
    from fedmole.adapters.mole import MoLELinear

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrappers = (MoLELinear, LoRALinear, MoELoRABlock, AMoLELinear)
    total, inside = 0.0, []
    with adapter.route(k):
        for name, module in model.named_modules():
            if any(name.startswith(p + ".") for p in inside):
                continue
            if isinstance(module, wrappers):
                inside.append(name)
                total += _wrapper_flops(module, k)
            elif isinstance(module, nn.Linear) and module is not head:
                total += 2 * _linear_flops(module)
    config = model.config
    heads = getattr(config, "num_attention_heads", 0)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    layers = getattr(config, "num_hidden_layers", 0)
    total += 2 * layers * 2 * 2 * heads * head_dim * seq_len / 2  # scores + values, forward and input grad
    return total


def _wrapper_flops(module: nn.Module, k: int) -> float:
    from fedmole.adapters.amole import AMoLELinear
    from fedmole.adapters.lora import LoRALinear
    from fedmole.adapters.moe_lora import MoELoRABlock
    from fedmole.adapters.mole import MoLELinear

    if isinstance(module, MoELoRABlock):
        H, I, E = module.hidden, module.intermediate, module.num_experts
        experts = module.top_k if module.active is not None else k
        rank = module.active.rank if module.active is not None else module.rank
        ffn = 2.0 * (H * 2 * I + I * H)
        lora = 2.0 * rank * (H + 2 * I) + 2.0 * rank * (I + H)
        router = 2.0 * H * E
        shared = 0.0
        if module.has_shared:
            shared = 2 * sum(_linear_flops(m) for m in module.shared_expert.modules() if isinstance(m, nn.Linear))
        return experts * (2 * ffn + 3 * lora) + 2 * router + shared
    if not isinstance(module, (LoRALinear, MoLELinear, AMoLELinear)):
        raise TypeError(f"no FLOPs rule for {type(module).__name__}")
    base = 2 * _linear_flops(module.base_layer)
    if isinstance(module, LoRALinear):
        return base + 3 * 2.0 * module.active.rank * (module.d_in + module.d_out)
    if isinstance(module, MoLELinear):
        E, r = module.num_experts, module.rank
        router = 2.0 * module.d_in * (E if module.router is not None else r) + (0 if module.router is not None
                                                                                else 2.0 * E * r)
        shared = 2.0 * r * (module.d_in + module.d_out) if module.shared_A is not None else 0.0
        return base + 3 * (2.0 * E * r * (module.d_in + module.d_out) + router + shared)
    held, r = int(module.held.numel()), module.rank  # AMoLE: every held expert runs, plus the key router
    experts = 2.0 * held * r * (module.d_in + module.d_out) + 2.0 * module.d_in * r + 2.0 * held * r
    shared = 2.0 * r * (module.d_in + module.d_out) if module.shared_A is not None else 0.0
    return base + 3 * (experts + shared)


@torch.no_grad()
def tier_flops(model: nn.Module, adapter, tiers: list[int], seq_len: int) -> dict[str, float]:
    """{str(k): training FLOPs per token} for every tier in use."""
    return {str(k): flops_per_token(model, adapter, k, seq_len) for k in sorted(set(tiers), reverse=True)}
