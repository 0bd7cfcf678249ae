"""LoRA on MoE experts: every supported family against the unadapted model and a naive per-token oracle,
top-k capping with the rescaler, gradients, counts, and compute skipping."""

import copy

import pytest
import torch

from fedmole.adapters import moe_lora
from fedmole.adapters.inject import MoLEConfig
from fedmole.adapters.moe_lora import MoELoRABlock, find_moe_blocks, inject_moe_lora, is_moe_model
from fedmole.adapters.moe_models import TINY_MOE_MODELS, tiny_moe
from fedmole.algorithms.validate import check_reply
from fedmole.messages import Reply
from fedmole.models import tiny_llama

FAMILIES = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"]
RENORMALIZES = {"olmoe": False, "qwen2_moe": False, "qwen3_moe": True, "mixtral": True}
VOCAB, TOP_K, E = 64, 4, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy grouped matmuls gain nothing from threads, and on a busy machine a descheduled
    OpenMP thread stalls every one of them (seen: 5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(family, rescale="learned", train_router=False, dropout=0.0):
    model = tiny_moe(family, VOCAB, seed=1, hidden=32, layers=2, num_experts=E, top_k=TOP_K, intermediate=16)
    model.eval()
    base = copy.deepcopy(model)
    cfg = MoLEConfig(rank=4, alpha=8.0, dropout=dropout, rescale=rescale, init_seed=0)
    adapter = inject_moe_lora(model, cfg, k_max=TOP_K, train_router=train_router)
    return base, model, adapter


def randomise_lora(adapter, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.layers.values():
            for name in ("lora_gate_up_B", "lora_down_B"):
                p = getattr(block, name)
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def naive_block(block: MoELoRABlock, x: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, per selected expert, with merged weights W + (a/r) B A: the independent oracle."""
    ex = block.experts
    router = block.router if block.router is not None else block.gate.weight
    w_gu = ex.gate_up_proj + block.scaling * block.lora_gate_up_B @ block.lora_gate_up_A  # (E, 2I, H)
    w_d = ex.down_proj + block.scaling * block.lora_down_B @ block.lora_down_A  # (E, H, I)
    rows = []
    for t in range(x.shape[0]):
        probs = torch.softmax(x[t] @ router.t(), dim=-1)
        vals, idx = probs.topk(k)
        if block.renormalize:
            vals = vals / vals.sum()
        y = torch.zeros_like(x[t])
        for v, j in zip(vals, idx.tolist()):
            g, u = (w_gu[j] @ x[t]).chunk(2)
            y = y + v * (w_d[j] @ (ex.act_fn(g) * u))
        y = y * block.rescale[k - 1]
        if block.shared_expert is not None:
            y = y + torch.sigmoid(block.shared_expert_gate(x[t])) * block.shared_expert(x[t])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_k_with_zero_B_equals_unadapted_model(family):
    base, model, adapter = make(family)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        with adapter.route(TOP_K):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert list(adapter.layers) == find_moe_blocks(base)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_matches_naive_oracle_outputs_and_grads(family):
    _, model, adapter = make(family)
    randomise_lora(adapter)
    block = next(iter(adapter.layers.values()))
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    params = [getattr(block, n) for n in block.adapter_names()]
    for k in (1, TOP_K):
        adapter.routing.k = k
        y = block(x)
        y_ref = naive_block(block, x, k)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        grads = torch.autograd.grad(y.square().sum(), params)
        grads_ref = torch.autograd.grad(y_ref.square().sum(), params)
        for name, g, g_ref in zip(block.adapter_names(), grads, grads_ref):
            atol = 1e-5 * float(g_ref.abs().max()) + 1e-6  # float32 sums of differently ordered terms
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=atol, msg=f"{family} k={k} {name}")


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
@pytest.mark.parametrize("rescale", ["learned", "fixed", "off"])
def test_top_k_cap_scales_as_the_rescaler_predicts(family, rescale):
    """With B = 0, tier k gives s_k times the family's own expert sum over the top-k gates,
    computed here by the transformers experts module itself (renormalised over k where the family does)."""
    _, model, adapter = make(family, rescale=rescale)
    block = next(iter(adapter.layers.values()))
    x = torch.randn(12, 32, generator=torch.Generator().manual_seed(3))
    expected_scale = {
        "learned": 1.0 if RENORMALIZES[family] else TOP_K / 2,
        "fixed": 1.0 if RENORMALIZES[family] else TOP_K / 2,
        "off": 1.0,
    }[rescale]
    with torch.no_grad(), adapter.route(2):
        y = block(x)
        probs = torch.softmax(x @ block.gate.weight.t(), -1)
        vals, idx = probs.topk(2, dim=-1)
        if RENORMALIZES[family]:
            vals = vals / vals.sum(-1, keepdim=True)
        y_ref = block.experts(x, idx, vals) * expected_scale
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert ("rescale" in block.adapter_names()) == (rescale == "learned")


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_only_adapter_tensors(family):
    _, model, adapter = make(family, train_router=True, dropout=0.1)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with adapter.route(2, collect=True):
        out = model(ids, labels=ids)
        (out.loss + 1e-3 * adapter.aux_loss()).backward()
    adapter_ids = {id(p) for p in adapter.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name
    for block in adapter.layers.values():
        assert block.lora_gate_up_B.grad.abs().sum() > 0 and block.router.grad.abs().sum() > 0
        assert not block.gate.weight.requires_grad


def test_counts_sum_to_tokens_times_k_and_pass_the_reply_check():
    _, model, adapter = make("olmoe")
    ids = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    for k in (1, 3):
        adapter.reset_counts()
        with torch.no_grad(), adapter.route(k, token_mask=mask, collect=True):
            model(ids, attention_mask=mask)
        counts, tokens = adapter.counts()
        for name in adapter.layers:
            assert tokens[name] == mask.sum().item()
            assert counts[name].sum().item() == mask.sum().item() * k
        reply = Reply(round=1, client_id=0, state=adapter.state_dict(), num_examples=3, tier=k, train_loss=1.0,
                      expert_counts=counts, tokens=tokens)
        nums = {n: b.num_experts for n, b in adapter.layers.items()}
        assert check_reply(reply, adapter.shapes(), num_experts=nums) is None
    adapter.reset_counts()
    with torch.no_grad(), adapter.route(2):  # collect off: evaluation passes are not counted
        model(ids)
    assert all(c.sum() == 0 for c in adapter.counts()[0].values())


@pytest.mark.parametrize("k", [1, 2])
def test_each_expert_computes_only_its_routed_tokens(monkeypatch, k):
    _, model, adapter = make("qwen2_moe")
    block = next(iter(adapter.layers.values()))
    base_weights = {id(block.experts.gate_up_proj), id(block.experts.down_proj)}
    calls = []
    real = moe_lora.grouped_linear

    def recording(x, weight, offs):
        if id(weight) in base_weights:
            calls.append((x.detach().clone(), offs.clone(), weight.shape[-1]))
        return real(x, weight, offs)

    monkeypatch.setattr(moe_lora, "grouped_linear", recording)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), adapter.route(k):
        block(x)
    idx = torch.softmax(x @ block.gate.weight.t(), -1).topk(k, dim=-1).indices  # (N, k)
    assert len(calls) == 2  # gate_up then down
    rows, offs, d_in = calls[0]
    assert d_in == 32
    bounds = [0, *offs.tolist()]
    for j in range(E):
        routed = (idx == j).any(-1).nonzero().flatten()
        block_rows = rows[bounds[j] : bounds[j + 1]]
        # the expert's routed tokens, then zero rows up to the next multiple of ROW_BUCKET (CPU kernel reuse)
        padded = -(-routed.numel() // moe_lora.ROW_BUCKET) * moe_lora.ROW_BUCKET
        assert block_rows.shape[0] == padded
        torch.testing.assert_close(block_rows[: routed.numel()], x[routed])
        assert not block_rows[routed.numel() :].any()
    assert calls[1][0].shape[0] == rows.shape[0]


def test_lora_dropout_shares_one_mask_per_token_across_its_experts(monkeypatch):
    """In training, LoRA dropout masks the token's input to the gate/up A and its expert's
    hidden activations to the down A with one 0/1 mask per token and layer input, rescaled by
    1/(1-p); the frozen path and the evaluation path see no dropout."""
    p = 0.5
    _, model, adapter = make("qwen2_moe", rescale="off", dropout=p)
    randomise_lora(adapter)
    block = next(iter(adapter.layers.values()))
    x = torch.randn(10, 32, generator=torch.Generator().manual_seed(6))
    masks = {}

    def fixed_mask(n, width, p_, dtype):
        gen = torch.Generator().manual_seed(width)
        masks[width] = (torch.rand(n, width, generator=gen) >= p_).to(dtype)
        return masks[width]

    monkeypatch.setattr(block, "_keep_mask", fixed_mask)
    adapter.routing.k = 2
    block.train()
    y = block(x)
    block.eval()
    y_eval = block(x)
    assert not torch.allclose(y, y_eval)
    # oracle: per token, per selected expert, LoRA inputs masked by that token's rows of the masks
    ex, s = block.experts, block.scaling / (1 - p)
    m_in, m_hid = masks[32][:10], masks[block.intermediate][:10]
    probs = torch.softmax(x @ block.gate.weight.t(), -1)
    vals, idx = probs.topk(2, dim=-1)
    ref = torch.zeros_like(x)
    for t in range(10):
        for v, j in zip(vals[t], idx[t].tolist()):
            gu = ex.gate_up_proj[j] @ x[t] + s * block.lora_gate_up_B[j] @ (block.lora_gate_up_A[j] @ (x[t] * m_in[t]))
            g, u = gu.chunk(2)
            h = ex.act_fn(g) * u
            ref[t] += v * (ex.down_proj[j] @ h + s * block.lora_down_B[j] @ (block.lora_down_A[j] @ (h * m_hid[t])))
        ref[t] += torch.sigmoid(block.shared_expert_gate(x[t])) * block.shared_expert(x[t])  # untouched by dropout
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_loop_fallback_matches_grouped_matmul(monkeypatch):
    _, model, adapter = make("olmoe")
    randomise_lora(adapter)
    block = next(iter(adapter.layers.values()))
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    adapter.routing.k = 2
    y = block(x)
    g = torch.autograd.grad(y.square().sum(), block.lora_down_A)[0]
    monkeypatch.setattr(moe_lora, "_grouped_mm_supported", lambda x, w: False)
    y_loop = block(x)
    g_loop = torch.autograd.grad(y_loop.square().sum(), block.lora_down_A)[0]
    torch.testing.assert_close(y, y_loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, g_loop, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_runs_close_to_fp32():
    _, model, adapter = make("olmoe")
    randomise_lora(adapter)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), adapter.route(2):
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids).logits
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    model.train()  # a copy cached under inference mode (generation) must serve a training step
    for b in adapter.layers.values():
        b._cast_cache.clear()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    with adapter.route(2), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids).loss.backward()
    block = next(iter(adapter.layers.values()))  # the cached bf16 copy follows in-place base updates
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        block.experts.down_proj.mul_(2.0)
        assert torch.equal(block._base_weight("down_proj", torch.bfloat16),
                           block.experts.down_proj.to(torch.bfloat16))


def test_rescaler_init_state_keys_and_round_trip():
    _, model, adapter = make("olmoe")
    block = next(iter(adapter.layers.values()))
    torch.testing.assert_close(block.rescale.detach(), torch.tensor([4.0, 2.0, 4 / 3, 1.0]))
    for family in ("qwen3_moe", "mixtral"):
        renorm = next(iter(make(family)[2].layers.values()))
        assert renorm.renormalize and torch.all(renorm.rescale == 1)
    state = adapter.state_dict()
    for key, value in state.items():  # every `lora_` tensor is indexed by expert along dim 0
        name = key.rsplit(".", 1)[1]
        assert name in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B", "rescale")
        if name.startswith("lora_"):
            assert value.shape[0] == E
        else:
            assert value.shape == (TOP_K,)
    randomise_lora(adapter, seed=9)
    changed = adapter.state_dict()
    adapter.load_state_dict(state)
    assert all(torch.equal(adapter.state_dict()[k], state[k]) for k in state)
    assert not torch.equal(changed[next(k for k in state if k.endswith("lora_down_B"))],
                           state[next(k for k in state if k.endswith("lora_down_B"))])


def test_aux_loss_is_one_for_a_uniform_trained_router_and_absent_for_a_frozen_one():
    _, model, adapter = make("olmoe", train_router=True)
    for block in adapter.layers.values():
        block.router.data.zero_()
    model.train()
    with adapter.route(2):
        model(torch.randint(0, VOCAB, (2, 6)))
    assert all(torch.isclose(b.aux_loss, torch.tensor(1.0)) for b in adapter.layers.values())
    # a frozen base router has nothing to balance: its gradient would only reach the LoRA tensors
    _, model, adapter = make("olmoe")
    model.train()
    with adapter.route(2):
        model(torch.randint(0, VOCAB, (2, 6)))
    assert all(b.aux_loss is None for b in adapter.layers.values()) and float(adapter.aux_loss()) == 0.0


def test_generation_with_a_capped_k():
    _, model, adapter = make("olmoe")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with adapter.route(1):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
    assert out.shape == (2, 8)


def test_detection_and_errors():
    dense = tiny_llama(VOCAB)
    assert not is_moe_model(dense)
    assert all(is_moe_model(tiny_moe(f, VOCAB)) for f in TINY_MOE_MODELS.values())
    with pytest.raises(ValueError, match="'llama'.*supported: olmoe, qwen2_moe, qwen3_moe, mixtral"):
        inject_moe_lora(dense, MoLEConfig())
    with pytest.raises(ValueError, match="tiers must be in 1..4"):
        inject_moe_lora(tiny_moe("olmoe", VOCAB), MoLEConfig(), k_max=8)
    _, model, adapter = make("olmoe")
    with pytest.raises(ValueError, match="already adapted"):
        inject_moe_lora(model, MoLEConfig())
    with pytest.raises(ValueError, match="allowed: 1..4"), adapter.route(5):
        model(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keep_mask_keeps_one_minus_p_of_entries_uniformly(p):
    torch.manual_seed(0)
    m = moe_lora.keep_mask(400, 300, p, torch.bfloat16)
    assert m.shape == (400, 300) and m.dtype == torch.bfloat16
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    kept = m.float().mean().item()
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / m.numel()) ** 0.5 + 1e-4
    # every 16-bit lane of the generator's words is used alike: columns keep the same share
    col = m.float().mean(0)
    assert abs(col[0::4].mean() - col[3::4].mean()) < 0.02
    assert moe_lora.dropout_rate(0.05) == round(0.05 * 65536) / 65536
