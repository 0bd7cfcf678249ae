"""Plain LoRA layer and handle: direct computation, active-rank truncation, zero B, views, merged base."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fedmole.adapters.lora import (
    ActiveRank,
    LoRAConfig,
    LoRALinear,
    inject_lora,
    pad_lora,
    truncate_lora,
)
from fedmole.models import tiny_llama

D_IN, D_OUT, R_MAX, ALPHA = 12, 10, 8, 16.0


def make_layer(active=R_MAX, base=None, seed=0):
    torch.manual_seed(seed)
    base = base if base is not None else nn.Linear(D_IN, D_OUT)
    base.requires_grad_(False)
    layer = LoRALinear(base, ActiveRank(active), rank=R_MAX, alpha=ALPHA, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer.double()


@pytest.mark.parametrize("r", [1, 3, R_MAX])
def test_forward_matches_direct_computation_at_each_active_rank(r):
    layer = make_layer(active=r)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A[:r], layer.lora_B[:, :r]
    expected = x @ W.t() + b + (ALPHA / r) * (x @ A.t() @ B.t())
    torch.testing.assert_close(layer(x), expected)


def test_truncation_leaves_unused_components_without_gradient():
    layer = make_layer(active=3)
    y = layer(torch.randn(7, D_IN, dtype=torch.float64))
    gA, gB = torch.autograd.grad(y.square().sum(), [layer.lora_A, layer.lora_B])
    assert gA[:3].abs().sum() > 0 and gB[:, :3].abs().sum() > 0
    assert gA[3:].abs().sum() == 0 and gB[:, 3:].abs().sum() == 0


def test_zero_B_gives_the_base_output():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B.zero_()
    x = torch.randn(4, D_IN, dtype=torch.float64)
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_conv1d_base_and_merged_delta():
    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)  # GPT-2 style: weight (d_in, d_out)
    layer = make_layer(base=conv)
    x = torch.randn(3, D_IN, dtype=torch.float64)
    A, B = layer.lora_A, layer.lora_B
    w0 = conv.weight.clone()
    torch.testing.assert_close(layer(x), x @ w0 + conv.bias + (ALPHA / R_MAX) * (x @ A.t() @ B.t()))
    delta = torch.randn(D_OUT, D_IN, dtype=torch.float64)
    layer.set_delta(delta)
    torch.testing.assert_close(layer(x), x @ (w0 + delta.t()) + conv.bias + (ALPHA / R_MAX) * (x @ A.t() @ B.t()))
    layer.set_delta(2 * delta)  # idempotent: replaces, never accumulates
    torch.testing.assert_close(conv.weight, w0 + 2 * delta.t())
    layer.set_delta(None)
    torch.testing.assert_close(conv.weight, w0)


def test_handle_maps_tiers_to_ranks_and_loads_views():
    model = tiny_llama(64)
    adapter = inject_lora(model, LoRAConfig(rank=16, rank_per_tier=4, alpha=8.0, targets=["q_proj", "v_proj"]))
    assert [adapter.rank_of(k) for k in (1, 2, 4, 8)] == [4, 8, 16, 16]
    ids = torch.randint(0, 64, (2, 6))
    with adapter.route(2):
        assert adapter.active.rank == 8
        model(input_ids=ids)
    assert adapter.active.rank == 16  # restored after the call
    assert adapter.aux_loss() == 0 and adapter.counts() == ({}, {})
    assert all(p.requires_grad for p in adapter.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    full = adapter.state_dict()
    view = truncate_lora(full, 4)
    assert all(v.shape[0 if k.endswith("lora_A") else 1] == 4 for k, v in view.items())
    adapter.load_state_dict(view)  # a rank-4 view loads zero-padded
    assert adapter.state_dict().keys() == full.keys()
    assert all(torch.equal(a, b) for a, b in zip(pad_lora(view, 16).values(), adapter.state_dict().values()))
    with pytest.raises(KeyError, match="missing"):
        adapter.load_state_dict(dict(list(view.items())[1:]))
    adapter.fix_rank(4)
    assert {adapter.rank_of(k) for k in (1, 2, 4)} == {4}
    with pytest.raises(ValueError, match="allowed: 1..16"):
        adapter.fix_rank(17)
