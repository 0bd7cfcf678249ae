"""MoLE layer: stacked computation against the naive per-expert loop, routing, rescaler, counts."""

import pytest
import torch
from torch import nn

from fedmole.adapters.inject import MoLEConfig, inject_mole
from fedmole.adapters.mole import MoLELinear, Routing, reference_forward, top_k_router
from fedmole.models import tiny_llama


def make_layer(k=2, E=8, r=4, d_in=24, d_out=20, renormalize=False, rescale="learned", shared=False, seed=0,
               router="linear"):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    base.requires_grad_(False)
    layer = MoLELinear(base, Routing(k=k), num_experts=E, rank=r, alpha=8.0, router=router, renormalize=renormalize,
                       rescale=rescale, k_max=E, shared_expert=shared, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # B starts at zero; give it values so the test sees the experts
        layer.lora_B.normal_()
        if router == "linear":
            layer.router.normal_()
        if shared:
            layer.shared_B.normal_()
    return layer


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("renormalize,shared", [(False, False), (True, True)])
def test_stacked_matches_naive_loop_outputs_and_grads(k, renormalize, shared):
    layer = make_layer(k=k, renormalize=renormalize, shared=shared).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.router, layer.rescale] + (
        [layer.shared_A, layer.shared_B] if shared else [])

    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params + [x])
    y_ref = reference_forward(layer, x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params + [x])

    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("k,dropout", [(1, 0.0), (3, 0.0), (2, 0.3)])
def test_key_router_matches_naive_loop_outputs_and_grads(k, dropout):
    layer = make_layer(k=k, router="key").double()
    assert layer.router is None and "token_proj" in layer.adapter_names() and "router" not in layer.adapter_names()
    layer.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
    layer.eval()  # dropout off for the comparison; the train-mode key path is checked below
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    params = [layer.lora_A, layer.lora_B, layer.token_proj, layer.rescale]
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), params + [x])
    y_ref = reference_forward(layer, x)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), params + [x])
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    if dropout:  # in training the keys still come from the clean input: routing ignores dropout
        layer.train()
        xf = x.detach().reshape(-1, 24)
        keys = torch.einsum("erd,nd->ner", layer.lora_A, xf)
        logits = (keys * (xf @ layer.token_proj.t())[:, None, :]).sum(-1) / 2.0
        torch.testing.assert_close(layer.router_logits(xf), logits)
        layer.routing.collect = True
        layer(x)
        layer.routing.collect = False
        assert torch.equal(layer.expert_counts, torch.bincount(logits.topk(k, -1).indices.flatten(), minlength=8)
                           .double())


def test_per_call_k_changes_which_experts_run():
    layer = make_layer(k=1)
    x = torch.randn(40, 24)
    layer.routing.k = 1
    y1 = layer(x)
    g1 = torch.autograd.grad(y1.sum(), layer.lora_B)[0]
    used1 = (g1.abs().sum((1, 2)) > 0).sum()
    layer.routing.k = 4
    y4 = layer(x)
    g4 = torch.autograd.grad(y4.sum(), layer.lora_B)[0]
    # a token's gradient reaches exactly its k chosen experts
    probs = torch.softmax(x @ layer.router.t(), -1)
    assert set(probs.topk(1, -1).indices.unique().tolist()) == set((g1.abs().sum((1, 2)) > 0).nonzero().flatten().tolist())
    assert used1 <= (g4.abs().sum((1, 2)) > 0).sum()
    assert not torch.allclose(y1, y4)


def test_unselected_experts_get_no_gradient():
    layer = make_layer(k=2)
    x = torch.randn(1, 24)  # one token: exactly 2 experts chosen
    y = layer(x)
    gA, gB = torch.autograd.grad(y.sum(), [layer.lora_A, layer.lora_B])
    assert int((gA.abs().sum((1, 2)) > 0).sum()) == 2
    assert int((gB.abs().sum((1, 2)) > 0).sum()) == 2


def test_rescaler_init_and_modes():
    learned = make_layer(k=2, rescale="learned")
    assert torch.allclose(learned.rescale, torch.tensor([8 / k for k in range(1, 9)]))
    renorm = make_layer(k=2, renormalize=True)
    assert torch.allclose(renorm.rescale, torch.ones(8))
    fixed = make_layer(k=2, rescale="fixed")
    assert "rescale" not in fixed.adapter_names() and not isinstance(fixed.rescale, nn.Parameter)
    assert torch.allclose(fixed.rescale, learned.rescale)
    # renormalised gates already sum to one at every k: a fixed rescaler must not scale them
    assert torch.all(make_layer(k=2, rescale="fixed", renormalize=True).rescale == 1)
    off = make_layer(k=2, rescale="off")
    assert torch.all(off.rescale == 1)


def test_rescaler_scales_the_mixture_and_only_its_tier_learns():
    layer = make_layer(k=2)
    x = torch.randn(6, 24)
    base = layer.base_layer(x)
    with torch.no_grad():
        layer.rescale[1] = 1.0
    d1 = layer(x) - base
    with torch.no_grad():
        layer.rescale[1] = 3.0
    d3 = layer(x) - base
    torch.testing.assert_close(d3, 3 * d1)
    g = torch.autograd.grad(layer(x).sum(), layer.rescale)[0]
    assert g[1] != 0 and torch.count_nonzero(g) == 1


def test_router_aux_loss_and_padding_mask():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    uniform = top_k_router(torch.zeros(4, 2), 1, False, None)
    assert torch.isclose(uniform.aux_loss, torch.tensor(1.0))  # balanced: E * sum(1/E * 1/E) * E... = 1
    skewed = top_k_router(logits, 1, False, torch.tensor([True, True, False]))
    # only the two real tokens count: both pick expert 0 with p ~ 0.993
    p0 = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0]
    assert torch.isclose(skewed.aux_loss, 2 * p0 * 1.0, atol=1e-6)
    renorm = top_k_router(logits, 2, True, None)
    torch.testing.assert_close(renorm.gates.sum(-1), torch.ones(3))


def test_counts_follow_mask_and_k():
    layer = make_layer(k=3)
    layer.routing.collect = True
    layer.routing.token_mask = torch.tensor([True] * 7 + [False] * 3)
    layer(torch.randn(10, 24))
    assert layer.tokens_seen == 7
    assert layer.expert_counts.sum() == 21


def test_inject_into_tiny_llama_starts_as_identity_and_roundtrips(tmp_path):
    model = tiny_llama(320, seed=0)
    ids = torch.randint(0, 320, (2, 7))
    before = model(ids).logits
    adapter = inject_mole(model, MoLEConfig(num_experts=4, rank=2), k_max=4)
    assert len(adapter.layers) == 4  # 2 layers x (q_proj, v_proj)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n or "lora" not in n and "router" not in n and "rescale" not in n)
    with adapter.route(2):
        torch.testing.assert_close(model(ids).logits, before)  # B = 0
    state = adapter.state_dict()
    assert set(state) == set(adapter.shapes())
    assert "model.layers.0.self_attn.q_proj.lora_A" in state
    path = tmp_path / "adapter.safetensors"
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1)
    adapter.save(path)
    other = inject_mole(tiny_llama(320, seed=0), MoLEConfig(num_experts=4, rank=2), k_max=4)
    other.load(path)
    for key, value in other.state_dict().items():
        torch.testing.assert_close(value, adapter.state_dict()[key])


def test_inject_errors_name_the_problem():
    with pytest.raises(ValueError, match="match no linear layer.*q_proj"):
        inject_mole(tiny_llama(320), MoLEConfig(targets=["nonexistent"]))
    adapter = inject_mole(tiny_llama(320), MoLEConfig(num_experts=4, rank=2))
    with pytest.raises(ValueError, match="active experts k=5; allowed: 1..4"):
        with adapter.route(5):
            adapter.model(torch.zeros(1, 3, dtype=torch.long))
    bad = adapter.state_dict()
    key = next(iter(bad))
    bad[key] = torch.zeros(1)
    with pytest.raises(ValueError, match="shape"):
        adapter.load_state_dict(bad)


def test_all_linear_and_conv1d_targets():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    ids = torch.randint(0, 50, (1, 6))
    before = gpt2(ids).logits
    adapter = inject_mole(gpt2, MoLEConfig(num_experts=2, rank=2, targets=["all-linear"]))
    assert {n.rsplit(".", 1)[-1] for n in adapter.layers} == {"c_attn", "c_proj", "c_fc"}
    torch.testing.assert_close(gpt2(ids).logits, before)
    layer = adapter.layers["transformer.h.0.attn.c_attn"]
    assert (layer.d_in, layer.d_out) == (32, 96)
