"""Estimated training FLOPs per token: what each tier of each adapter kind computes."""

import pytest
import torch

from fedmole.adapters.inject import MoLEConfig, inject_mole
from fedmole.adapters.lora import LoRAConfig, inject_lora
from fedmole.adapters.moe_lora import inject_moe_lora, inject_moe_lora_ranked
from fedmole.adapters.moe_models import tiny_moe
from fedmole.compute import flops_per_token, tier_flops
from fedmole.models import tiny_llama

H, I, E, TOP_K, LAYERS, SEQ = 32, 16, 8, 4, 2, 10


def test_dense_mole_costs_the_same_at_every_tier_and_lora_follows_its_rank():
    model = tiny_llama(64, hidden=H, layers=LAYERS)
    plain = tier_flops(model, inject_lora(model, LoRAConfig(rank=8, rank_per_tier=2, targets=["q_proj"])), [4, 1], SEQ)
    # q_proj is H x H: tier 4 runs rank 8, tier 1 rank 2; 3 x 2 r (d_in + d_out) per layer for the LoRA
    assert plain["4"] - plain["1"] == pytest.approx(LAYERS * 3 * 2 * (8 - 2) * (H + H))
    model = tiny_llama(64, hidden=H, layers=LAYERS)
    mole = tier_flops(model, inject_mole(model, MoLEConfig(num_experts=4, rank=2, targets=["q_proj"])), [4, 1], SEQ)
    assert mole["4"] == mole["1"]  # the dense path computes every expert whatever k


def test_sparse_moe_tiers_save_whole_experts_and_rank_baselines_do_not():
    model = tiny_moe("qwen2_moe", 64, hidden=H, layers=LAYERS, num_experts=E, top_k=TOP_K, intermediate=I)
    flame = tier_flops(model, inject_moe_lora(model, MoLEConfig(rank=4), k_max=TOP_K), [4, 2, 1], SEQ)
    per_expert = 2 * 2 * (H * 2 * I + I * H) + 3 * (2 * 4 * (H + 2 * I) + 2 * 4 * (I + H))
    assert flame["4"] - flame["2"] == pytest.approx(LAYERS * 2 * per_expert)
    assert flame["2"] - flame["1"] == pytest.approx(LAYERS * per_expert)
    model = tiny_moe("qwen2_moe", 64, hidden=H, layers=LAYERS, num_experts=E, top_k=TOP_K, intermediate=I)
    ranked = tier_flops(model, inject_moe_lora_ranked(model, MoLEConfig(rank=8), seed=0, k_max=TOP_K), [4, 1], SEQ)
    lora_saving = LAYERS * TOP_K * 3 * 2 * (8 - 2) * ((H + 2 * I) + (I + H))  # rank 8 -> 2 on 4 experts
    assert ranked["4"] - ranked["1"] == pytest.approx(lora_saving)
    assert ranked["1"] / ranked["4"] > flame["1"] / flame["4"]  # compressing rank saves less than experts


def test_unknown_wrapper_kinds_fail_loudly():
    from fedmole.compute import _wrapper_flops

    with pytest.raises(TypeError, match="no FLOPs rule"):
        _wrapper_flops(torch.nn.ReLU(), 1)
