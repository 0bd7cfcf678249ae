"""The rank-based baselines on a sparse MoE base: per-expert LoRA compressed by rank, full top-k for every
tier, and each aggregation rule applied per expert (against per-expert loops and numpy)."""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmole.adapters.inject import MoLEConfig
from fedmole.adapters.lora import lora_pairs, truncate_lora
from fedmole.adapters.moe_lora import inject_moe_lora_ranked
from fedmole.adapters.moe_models import tiny_moe
from fedmole.algorithms.flexlora import aggregate_flexlora, factored_svd
from fedmole.algorithms.flora import merge_stacks
from fedmole.algorithms.hetlora import aggregate_hetlora, product_norm
from fedmole.algorithms.lora_common import stack_lora
from fedmole.config import load_config
from fedmole.engine.local import run_local

VOCAB, E, TOP_K, H, I, ALPHA = 64, 8, 4, 32, 16, 16.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(rank=8):
    model = tiny_moe("qwen2_moe", VOCAB, seed=1, hidden=H, layers=2, num_experts=E, top_k=TOP_K, intermediate=I)
    model.eval()
    base = copy.deepcopy(model)
    adapter = inject_moe_lora_ranked(model, MoLEConfig(rank=rank, alpha=ALPHA, dropout=0.0), seed=0, k_max=TOP_K)
    return base, model, adapter


def expert_state(rank, seed, experts=E):
    g = torch.Generator().manual_seed(seed)
    return {
        "b.lora_gate_up_A": torch.randn(experts, rank, H, generator=g),
        "b.lora_gate_up_B": torch.randn(experts, 2 * I, rank, generator=g),
        "b.lora_down_A": torch.randn(experts, rank, I, generator=g),
        "b.lora_down_B": torch.randn(experts, H, rank, generator=g),
    }


def test_tiers_compress_rank_and_run_the_full_top_k():
    base, model, adapter = make()
    assert [adapter.rank_of(k) for k in (4, 2, 1)] == [8, 4, 2]
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in (4, 1):  # B = 0: every tier is the base model at its full top-k
            with adapter.route(k):
                torch.testing.assert_close(model(ids).logits, base(ids).logits)
    with torch.no_grad():
        for block in adapter.layers.values():
            block.lora_down_B.normal_(0, 0.5)
    model.train()
    with adapter.route(1):
        model(ids).logits.sum().backward()
    for block in adapter.layers.values():
        assert block.routing.k == TOP_K
        g = block.lora_down_B.grad
        assert g[..., :2].abs().sum() > 0 and g[..., 2:].abs().sum() == 0  # only the tier's 2 components train
        assert block.lora_gate_up_A.grad[:, 2:].abs().sum() == 0


def test_a_truncated_view_equals_a_block_that_holds_only_that_rank():
    _, model, adapter = make()
    with torch.no_grad():
        for block in adapter.layers.values():
            for name in ("lora_gate_up_B", "lora_down_B"):
                getattr(block, name).normal_(0, 0.3)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapter.route(2):
        out = model(ids).logits
    view = truncate_lora(adapter.state_dict(), 4)
    _, small_model, small = make(rank=4)
    small.load_state_dict(view)
    with torch.no_grad(), small.route(4):  # rank 4 of a rank-4 adapter: the whole of it
        torch.testing.assert_close(small_model(ids).logits, out)


def test_merged_deltas_change_every_expert_and_undo_exactly():
    _, model, adapter = make()
    block = next(iter(adapter.layers.values()))
    w0 = block.experts.down_proj.detach().clone()
    delta = torch.randn(E, H, I)
    name = next(iter(adapter.layers))
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), adapter.route(TOP_K):
        plain = model(ids).logits
        adapter.set_merged({f"{name}.down": delta})
        merged = model(ids).logits
        torch.testing.assert_close(block.merged_weight("down_proj"), w0 + delta)
        assert torch.equal(block.experts.down_proj, w0)  # W0 is never written: no copy is kept to restore it
        block.experts.down_proj.copy_(w0 + delta)  # the delta folded by hand gives the same model
        adapter.set_merged(None)
        torch.testing.assert_close(model(ids).logits, merged)
        block.experts.down_proj.copy_(w0)
        assert not torch.allclose(merged, plain)
        adapter.set_merged({f"{name}.down": delta})
        adapter.set_merged({f"{name}.down": 2 * delta})  # replaces, never accumulates
        torch.testing.assert_close(block.merged_weight("down_proj"), w0 + 2 * delta)
        adapter.set_merged(None)
        torch.testing.assert_close(block.merged_weight("down_proj"), w0)
        torch.testing.assert_close(model(ids).logits, plain)
    with pytest.raises(KeyError, match="unknown LoRA pair"):
        adapter.set_merged({"nowhere.down": delta})


def test_stacks_flexlora_and_hetlora_act_per_expert():
    ranks, sizes = [2, 4], [30, 10]
    states = [expert_state(r, seed=i) for i, r in enumerate(ranks)]
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    stacks = stack_lora(states, sizes, ALPHA)
    assert set(stacks) == {"b.gate_up", "b.down"}
    A_s, B_s = stacks["b.down"]
    assert A_s.shape == (E, 6, I) and B_s.shape == (E, H, 6)
    for e in range(E):
        expected = sum(p_i * ALPHA / s["b.lora_down_A"].shape[1] * (s["b.lora_down_B"][e].double().numpy()
                       @ s["b.lora_down_A"][e].double().numpy()) for p_i, s in zip(p, states))
        np.testing.assert_allclose((B_s[e] @ A_s[e]).numpy(), expected, rtol=1e-10, atol=1e-10)
        U, S, Vh = factored_svd(A_s[e], B_s[e])  # the batched SVD equals the per-expert one
        Ub, Sb, Vhb = factored_svd(A_s, B_s)
        torch.testing.assert_close(Sb[e], S)
    merged = merge_stacks({}, stacks, {"b.gate_up": (E, 2 * I, H), "b.down": (E, H, I)})
    torch.testing.assert_close(merged["b.down"].double(), B_s @ A_s, rtol=1e-5, atol=1e-5)

    glob = aggregate_flexlora(states, sizes, ALPHA, 4, like=expert_state(4, seed=9))
    for e in range(E):  # the rank-4 global factors are the best rank-4 approximation of each expert's sum
        target = (B_s[e] @ A_s[e]).numpy()
        got = (ALPHA / 4) * (glob["b.lora_down_B"][e].double() @ glob["b.lora_down_A"][e].double()).numpy()
        sv = np.linalg.svd(target, compute_uv=False)
        assert np.linalg.norm(target - got) == pytest.approx(np.sqrt((sv[4:] ** 2).sum()), rel=1e-4, abs=1e-6)

    out = aggregate_hetlora(states, sizes, max_rank=4)
    w = torch.stack([product_norm(s["b.lora_down_A"], s["b.lora_down_B"]) for s in states])  # (C, E)
    assert w.shape == (2, E)
    e = 3
    padded0 = torch.nn.functional.pad(states[0]["b.lora_down_A"][e], (0, 0, 0, 2))
    expected = (w[0, e] * padded0 + w[1, e] * states[1]["b.lora_down_A"][e]) / w[:, e].sum()
    torch.testing.assert_close(out["b.lora_down_A"][e], expected.float())


@pytest.mark.parametrize("method", ["fedit", "hetlora", "flexlora", "flora", "local", "centralized"])
def test_every_lora_baseline_runs_on_a_tiny_moe_base(method, tmp_path):
    cfg = load_config("configs/tiny-moe.toml", [
        f"method={method}", "model.name=tiny-qwen2-moe", "rounds=2", "run.progress=false", "train.local_steps=1",
        "data.max_test=2", "eval.max_new_tokens=2", "data.num_clients=3", "fed.tiers=[4,2,1]",
    ])
    summary = run_local(cfg, tmp_path)
    state = load_file(str(tmp_path / "adapter.safetensors"))
    pairs = lora_pairs(state)
    assert pairs and all(A.dim() == 3 for A, _ in pairs.values())
    assert summary["rounds"] == 2 and 0 <= summary["metrics"]["rouge_l"] <= 100
