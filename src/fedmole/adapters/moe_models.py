"""Random-initialised sparse MoE causal LMs of the supported families (tests, smoke runs, benchmarks).

No MoE weights can be downloaded here, so the MoE path is exercised on toy
configurations of the real transformers architectures: OLMoE, Qwen2-MoE
(with its gated shared expert), Qwen3-MoE (renormalised top-k, as its
released checkpoints set) and Mixtral (always renormalised).
"""

from __future__ import annotations

import torch
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

# model spec name (fedmole.models.load_base) -> family
TINY_MOE_MODELS = {
    "tiny-olmoe": "olmoe",
    "tiny-qwen2-moe": "qwen2_moe",
    "tiny-qwen3-moe": "qwen3_moe",
    "tiny-mixtral": "mixtral",
}


def tiny_moe(
    family: str,
    vocab_size: int,
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 2,
    num_experts: int = 8,
    top_k: int = 4,
    intermediate: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
) -> PreTrainedModel:
    """A random-initialised causal LM of one MoE family (weights seeded, global RNG untouched).

    `intermediate` is the FFN width of one expert (Qwen-MoE: `moe_intermediate_size`).
    """
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False,
        bos_token_id=None,  # the family defaults point outside a toy vocabulary; the tokenizer supplies them
        eos_token_id=None,
        pad_token_id=None,
    )
    if family == "olmoe":
        config = OlmoeConfig(**common, num_experts=num_experts, intermediate_size=intermediate,
                             norm_topk_prob=False)
        cls = OlmoeForCausalLM
    elif family == "qwen2_moe":
        config = Qwen2MoeConfig(**common, num_experts=num_experts, moe_intermediate_size=intermediate,
                                intermediate_size=2 * intermediate, shared_expert_intermediate_size=2 * intermediate,
                                norm_topk_prob=False)
        cls = Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(**common, num_experts=num_experts, moe_intermediate_size=intermediate,
                                intermediate_size=2 * intermediate, head_dim=hidden // heads, norm_topk_prob=True)
        cls = Qwen3MoeForCausalLM
    elif family == "mixtral":
        config = MixtralConfig(**common, num_local_experts=num_experts, intermediate_size=intermediate)
        cls = MixtralForCausalLM
    else:
        raise ValueError(f"unknown MoE family {family!r}; supported: olmoe, qwen2_moe, qwen3_moe, mixtral")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(state)
    return model
