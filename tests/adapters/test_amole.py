"""AMoLE layer: vectorised routing and output against a naive per-token loop, held subsets,
gradients, pool-indexed counts, held views and the embedding pass."""

import math

import pytest
import torch
from torch import nn

from fedmole.adapters.amole import (
    AMoLEConfig,
    AMoLELinear,
    EmbeddingSums,
    held_experts,
    held_view,
    inject_amole,
    parse_key,
    reference_forward,
)
from fedmole.adapters.mole import Routing
from fedmole.models import tiny_llama


def make_layer(k=2, N=8, r=4, d_in=12, d_out=10, shared=True, held=(1, 4, 6), seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = AMoLELinear(base, Routing(k=k), pool_size=N, rank=r, alpha=8.0, shared_expert=shared,
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B starts at zero; give it values so the test sees the experts
        layer.lora_B.normal_()
        if shared:
            layer.shared_B.normal_()
    layer.set_held(list(held))
    return layer.double()


@pytest.mark.parametrize("k,held,shared", [(2, (1, 4, 6), True), (1, (0, 7), False), (4, (2, 3, 5), True),
                                           (2, (5,), True), (2, tuple(range(8)), False)])
def test_vectorised_matches_naive_loop_outputs_and_grads(k, held, shared):
    layer = make_layer(k=k, held=held, shared=shared)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.token_proj] + ([layer.shared_A, layer.shared_B] if shared else [])

    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params + [x])
    y_ref = reference_forward(layer, x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params + [x])

    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_routing_is_key_query_top2_renormalised():
    layer = make_layer(k=2, held=(1, 4, 6))
    x = torch.randn(7, 12, dtype=torch.float64)
    # hand routing for one token
    t = 3
    q = layer.token_proj @ x[t]
    s = torch.stack([(layer.lora_A[j] @ x[t]) @ q for j in (1, 4, 6)]) / math.sqrt(4)
    p = torch.softmax(s, 0)
    top = p.topk(2)
    gates = top.values / top.values.sum()
    expect = sum(g * layer.lora_B[(1, 4, 6)[i]] @ (layer.lora_A[(1, 4, 6)[i]] @ x[t])
                 for g, i in zip(gates, top.indices.tolist()))
    expect = layer.base_layer(x[t]) + layer.scaling * (expect + layer.shared_B @ (layer.shared_A @ x[t]))
    torch.testing.assert_close(layer(x)[t], expect)


def test_gradients_reach_only_held_experts():
    layer = make_layer(k=2, held=(1, 4, 6))
    y = layer(torch.randn(30, 12, dtype=torch.float64))
    y.square().sum().backward()
    touched_a = layer.lora_A.grad.abs().sum((1, 2)) > 0
    touched_b = layer.lora_B.grad.abs().sum((1, 2)) > 0
    held = torch.zeros(8, dtype=torch.bool)
    held[[1, 4, 6]] = True
    assert torch.equal(touched_a, held)  # keys: every held expert is scored for every token
    assert not (touched_b & ~held).any() and touched_b[held].any()


def test_counts_use_pool_indices_and_skip_padding():
    layer = make_layer(k=2, held=(2, 5, 7))
    layer.routing.collect = True
    layer.routing.token_mask = torch.tensor([True] * 9 + [False] * 3)
    layer(torch.randn(12, 12, dtype=torch.float64))
    counts = layer.expert_counts
    assert counts.shape == (8,) and counts.sum() == 9 * 2 and float(layer.tokens_seen) == 9
    assert counts[[0, 1, 3, 4, 6]].sum() == 0


def test_set_held_rejects_bad_subsets():
    layer = make_layer()
    for bad in ([], [1, 1], [8], [-1]):
        with pytest.raises(ValueError):
            layer.set_held(bad)


def test_inject_state_keys_held_view_round_trip():
    model = tiny_llama(64, hidden=32, layers=1)
    adapter = inject_amole(model, AMoLEConfig(pool_size=6, rank=2, targets=["q_proj", "v_proj"]))
    assert adapter.pool_size == 6
    q = "model.layers.0.self_attn.q_proj"
    shapes = adapter.shapes()
    assert shapes[f"{q}.lora_A"] == (6, 2, 32) and shapes[f"{q}.token_proj"] == (2, 32)
    assert {parse_key(k)[1] for k in shapes} == {"lora_A", "lora_B", "token_proj", "shared_A", "shared_B"}
    assert all(p.requires_grad for p in adapter.parameters())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)

    pool = {k: torch.randn(v) for k, v in shapes.items()}
    held = {m: [1, 4] if m == q else [0, 2, 5] for m in adapter.layers}
    view = held_view(pool, held)
    assert f"{q}.lora_A.4" in view and f"{q}.lora_A.0" not in view and f"{q}.shared_B" in view
    assert view[f"{q}.lora_B.1"].shape == pool[f"{q}.lora_B"].shape[1:]
    assert held_experts(view) == held

    adapter.load_held_state(view)
    assert adapter.held() == held
    torch.testing.assert_close(adapter.state_dict()[f"{q}.lora_A"][4], pool[f"{q}.lora_A"][4])
    out = adapter.held_state()
    assert set(out) == set(view) and all(torch.equal(out[k], view[k]) for k in view)

    with pytest.raises(KeyError, match="missing"):
        adapter.load_held_state({k: v for k, v in view.items() if not k.endswith("token_proj")})
    with pytest.raises(KeyError, match="missing"):  # expert A without its B
        adapter.load_held_state({k: v for k, v in view.items() if k != f"{q}.lora_B.4"})
    bad = dict(view)
    bad[f"{q}.lora_A.1"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        adapter.load_held_state(bad)


def test_embedding_pass_means_over_real_tokens():
    layer = make_layer(k=2, held=(0, 3))
    x = torch.randn(10, 12, dtype=torch.float64)
    mask = torch.tensor([True] * 6 + [False] * 4)
    layer.embedding = EmbeddingSums(torch.zeros(4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
    layer.routing.token_mask = mask
    with torch.no_grad():
        layer(x)
    real = x[mask]
    torch.testing.assert_close(layer.embedding.query / layer.embedding.tokens, (real @ layer.token_proj.t()).mean(0))
    for row, j in enumerate((0, 3)):
        torch.testing.assert_close(layer.embedding.keys[row] / 6, (real @ layer.lora_A[j].t()).mean(0))
    # a second batch: the clip bounds are the largest batch-mean norms
    y = 3 * torch.randn(4, 12, dtype=torch.float64)
    layer.routing.token_mask = None
    with torch.no_grad():
        layer(y)
    with torch.no_grad():
        means = [real @ layer.token_proj.t(), y @ layer.token_proj.t()]
    assert layer.embedding.query_bound == pytest.approx(max(float(m.mean(0).norm()) for m in means))
    for row, j in enumerate((0, 3)):
        expected = max(float((z @ layer.lora_A[j].detach().t()).mean(0).norm()) for z in (real, y))
        assert float(layer.embedding.key_bounds[row]) == pytest.approx(expected)
