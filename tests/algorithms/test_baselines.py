"""Aggregation rules of the LoRA baselines against independent oracles (numpy, hand-computed cases)."""

import shutil

import numpy as np
import pytest
import torch

from fedmole.adapters.lora import LoRAConfig, inject_lora
from fedmole.algorithms.fedit import FedIT, FedITOptions, aggregate_fedit
from fedmole.algorithms.flexlora import aggregate_flexlora, client_factors, factored_svd
from fedmole.algorithms.flora import FLoRA, FLoRAOptions, apply_base_update, fresh_lora
from fedmole.algorithms.hetlora import HetLoRA, HetLoRAOptions, aggregate_hetlora, product_norm
from fedmole.algorithms.lora_common import stack_lora
from fedmole.config import load_config
from fedmole.engine.local import LocalEngine
from fedmole.messages import Reply
from fedmole.models import tiny_llama

ALPHA = 16.0
MODULES = {"m.q": (12, 10), "m.v": (12, 6)}  # module -> (d_in, d_out)


def lora_state(rank, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, (d_in, d_out) in MODULES.items():
        out[f"{m}.lora_A"] = torch.randn(rank, d_in, generator=g)
        out[f"{m}.lora_B"] = torch.randn(d_out, rank, generator=g)
    return out


def np_weighted_sum(states, sizes, module):
    """sum_i p_i (alpha/r_i) B_i A_i in numpy float64, p_i = n_i / sum n."""
    p = np.asarray(sizes, dtype=np.float64) / sum(sizes)
    total = 0.0
    for p_i, s in zip(p, states):
        A, B = s[f"{module}.lora_A"].double().numpy(), s[f"{module}.lora_B"].double().numpy()
        total = total + p_i * (ALPHA / A.shape[0]) * (B @ A)
    return total


RANKS, SIZES = [2, 5, 3], [30, 10, 60]


def test_flora_stack_is_the_exact_weighted_sum_for_mixed_ranks():
    states = [lora_state(r, seed=i) for i, r in enumerate(RANKS)]
    stacks = stack_lora(states, SIZES, ALPHA)
    for m, (A_s, B_s) in stacks.items():
        assert A_s.shape == (sum(RANKS), MODULES[m][0]) and B_s.shape == (MODULES[m][1], sum(RANKS))
        np.testing.assert_allclose((B_s @ A_s).numpy(), np_weighted_sum(states, SIZES, m), rtol=1e-12, atol=1e-12)


def test_flora_client_base_sync_adds_stacks_or_replaces_with_the_merged_delta():
    states = [lora_state(r, seed=i) for i, r in enumerate(RANKS)]
    (A_s, B_s) = stack_lora(states, SIZES, ALPHA)["m.q"]
    stack = {"m.q.stack_A": A_s, "m.q.stack_B": B_s}
    base, v = apply_base_update({}, 0, stack, target=1)
    np.testing.assert_allclose(base["m.q"].double().numpy(), np_weighted_sum(states, SIZES, "m.q"), rtol=1e-5)
    assert v == 1
    again, v2 = apply_base_update(base, 1, stack, target=1)  # a retried round: already current
    assert again is base and v2 == 1
    twice, _ = apply_base_update(base, 1, stack, target=2)
    torch.testing.assert_close(twice["m.q"], 2 * base["m.q"])
    replaced, v3 = apply_base_update({}, 0, {"m.q.merged": base["m.q"]}, target=5)
    torch.testing.assert_close(replaced["m.q"], base["m.q"])
    assert v3 == 5
    with pytest.raises(RuntimeError, match="out of sync"):
        apply_base_update({}, 0, stack, target=3)
    fresh = fresh_lora({"m.q.lora_A": (4, 12), "m.q.lora_B": (10, 4)}, seed=0, rnd=1)
    assert fresh["m.q.lora_B"].abs().sum() == 0 and fresh["m.q.lora_A"].abs().max() <= 12 ** -0.5


def test_flexlora_gives_each_client_the_best_rank_r_approximation():
    states = [lora_state(r, seed=10 + i) for i, r in enumerate(RANKS)]
    r_max = 5
    previous = {k: v.float() for k, v in lora_state(r_max, seed=99).items()}
    glob = aggregate_flexlora(states, SIZES, ALPHA, r_max, previous)
    assert {k: v.shape for k, v in glob.items()} == {k: v.shape for k, v in previous.items()}
    for m in MODULES:
        dW = np_weighted_sum(states, SIZES, m)
        U, S, Vh = np.linalg.svd(dW)
        for r in (1, 2, 3, 5):
            view = client_factors(glob, r, r_max)
            A, B = view[f"{m}.lora_A"].double().numpy(), view[f"{m}.lora_B"].double().numpy()
            assert A.shape == (r, MODULES[m][0]) and B.shape == (MODULES[m][1], r)
            approx = (ALPHA / r) * B @ A
            best = (U[:, :r] * S[:r]) @ Vh[:r]  # Eckart-Young: truncated SVD
            np.testing.assert_allclose(approx, best, atol=1e-4)
            err2 = np.linalg.norm(dW - approx) ** 2
            np.testing.assert_allclose(err2, (S[r:] ** 2).sum(), rtol=1e-4, atol=1e-4)


def test_factored_svd_matches_a_dense_svd():
    g = torch.Generator().manual_seed(0)
    A_s = torch.randn(4, 30, generator=g, dtype=torch.float64)  # R = 4 < min(d_out, d_in): the QR route
    B_s = torch.randn(20, 4, generator=g, dtype=torch.float64)
    U, S, Vh = factored_svd(A_s, B_s)
    np.testing.assert_allclose(S.numpy(), np.linalg.svd((B_s @ A_s).numpy(), compute_uv=False)[:4], rtol=1e-10)
    torch.testing.assert_close((U * S) @ Vh, B_s @ A_s)


def test_hetlora_pads_and_weights_by_product_norm_hand_computed():
    # client 1: rank 1, B1 A1 = [[2, 0], [0, 0]], norm 2; client 2: rank 2, B2 A2 = diag(0, 6), norm 6
    s1 = {"m.lora_A": torch.tensor([[1.0, 0.0]]), "m.lora_B": torch.tensor([[2.0], [0.0]])}
    s2 = {"m.lora_A": torch.eye(2), "m.lora_B": torch.tensor([[0.0, 0.0], [0.0, 6.0]])}
    out = aggregate_hetlora([s1, s2], sizes=[1000, 1], max_rank=2)  # sizes play no part
    # weights 2/8 and 6/8; client 1's missing row/column count as zeros
    torch.testing.assert_close(out["m.lora_A"], torch.tensor([[1.0, 0.0], [0.0, 0.75]]))
    torch.testing.assert_close(out["m.lora_B"], torch.tensor([[0.5, 0.0], [0.0, 4.5]]))


def test_hetlora_product_norm_and_zero_update_fallback():
    s = lora_state(3, seed=4)
    A, B = s["m.q.lora_A"], s["m.q.lora_B"]
    assert product_norm(A, B) == pytest.approx(float(torch.linalg.norm(B.double() @ A.double())), rel=1e-10)
    z1 = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in lora_state(1, 1).items()}
    z2 = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in lora_state(2, 2).items()}
    out = aggregate_hetlora([z1, z2], sizes=[1, 3], max_rank=2)  # no client moved B: FedAvg by size
    expected = 0.25 * torch.nn.functional.pad(z1["m.q.lora_A"], (0, 0, 0, 1)) + 0.75 * z2["m.q.lora_A"]
    torch.testing.assert_close(out["m.q.lora_A"], expected)


def test_fedit_is_data_weighted_fedavg():
    states = [lora_state(4, seed=i) for i in range(3)]
    out = aggregate_fedit(states, SIZES)
    for key in states[0]:
        expected = sum(n * s[key].double().numpy() for n, s in zip(SIZES, states)) / sum(SIZES)
        np.testing.assert_allclose(out[key].double().numpy(), expected, rtol=1e-6, atol=1e-6)


def lora_adapter(rank_per_tier=2, tiers=(4, 2, 1)):
    model = tiny_llama(64)
    return inject_lora(model, LoRAConfig(rank=rank_per_tier * max(tiers), rank_per_tier=rank_per_tier,
                                         targets=["q_proj"]))


def reply_for(method, instruction, state=None):
    rank = method.ranks[instruction.client_id]
    state = state if state is not None else {
        k: torch.ones(rank, s[1]) if k.endswith("lora_A") else torch.ones(s[0], rank) for k, s in method.shapes.items()}
    return Reply(instruction.round, instruction.client_id, state, 10, instruction.tier, 1.0)


def test_rank_views_and_reply_checks_follow_each_clients_rank():
    tiers = [4, 2, 1]
    method = HetLoRA(HetLoRAOptions(), lora_adapter(), tiers, seed=0)
    assert method.ranks == [8, 4, 2]
    glob = method.initial_state(lora_adapter())
    instructions = method.configure(1, [0, 1, 2], glob)
    for ins, r in zip(instructions, [8, 4, 2]):
        assert all(v.shape[0 if k.endswith("lora_A") else 1] == r for k, v in ins.state.items())
        assert method.check(reply_for(method, ins), ins) is None
    wrong = {k: v[:, :3] if k.endswith("lora_B") else v[:3] for k, v in instructions[0].state.items()}
    assert "shape" in method.check(reply_for(method, instructions[0], wrong), instructions[0])

    fedit = FedIT(FedITOptions(), lora_adapter(), tiers, seed=0)  # default: the lowest tier's rank for all
    assert fedit.ranks == [2, 2, 2] and fedit.server_rank == 2


def test_flora_sends_stacks_to_synced_clients_and_the_merged_delta_to_stale_ones():
    tiers = [2, 1, 1]
    method = FLoRA(FLoRAOptions(), lora_adapter(tiers=tiers), tiers, seed=0)
    glob = method.initial_state(lora_adapter(tiers=tiers))
    ins = method.configure(1, [0, 1, 2], glob)
    assert all(set(i.state) == set(glob) and i.config["base_version"] == 0 for i in ins)
    g = torch.Generator().manual_seed(0)
    replies = [reply_for(method, i, {k: torch.randn(v.shape, generator=g) for k, v in i.state.items()}) for i in ins]
    glob = method.aggregate(1, replies[:2], glob)  # client 2's reply was rejected
    assert all(v.abs().sum() == 0 for k, v in glob.items() if k.endswith("lora_B"))  # fresh LoRA
    ins = method.configure(2, [0, 1, 2], glob)
    assert any(k.endswith(".stack_A") for k in ins[0].state) and not any(k.endswith(".merged") for k in ins[0].state)
    assert not any(k.endswith(".merged") for k in ins[2].state)  # one merge behind too: the stack
    method.aggregate(2, [reply_for(method, i) for i in ins[:2]], glob)
    ins = method.configure(3, [2], glob)
    assert any(k.endswith(".merged") for k in ins[0].state)  # two merges behind: the whole delta
    restored = FLoRA(FLoRAOptions(), lora_adapter(tiers=tiers), tiers, seed=0)
    restored.load_state_dict(method.state_dict())
    assert restored.version == 2 and restored.synced == [1, 1, 0]
    for m, d in method.merged.items():
        torch.testing.assert_close(restored.merged[m], d)


@pytest.mark.parametrize("method", ["flora", "centralized", "local"])
def test_server_and_client_state_survive_a_resume(method, tmp_path):
    cfg = load_config("configs/tiny.toml", [f"method={method}", "rounds=2", "run.progress=false", "run.threads=1",
                                            "train.local_steps=1", "data.max_test=2", "eval.max_new_tokens=2"])
    ref = LocalEngine(cfg, tmp_path / "ref")
    expected = ref.run()
    LocalEngine(cfg, tmp_path / "cut").run()
    (tmp_path / "cut" / "summary.json").unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "round_0002")  # as if killed during round 2
    resumed = LocalEngine(cfg, tmp_path / "cut")
    summary = resumed.run(resume=True)
    assert summary["final_state_sha256"] == expected["final_state_sha256"]
    assert summary["metrics"] == expected["metrics"] and summary["comm_bytes"] == expected["comm_bytes"]
    if method == "flora":
        assert resumed.method.version == 2 and ref.method.merged.keys() == resumed.method.merged.keys()
        for m, d in ref.method.merged.items():
            torch.testing.assert_close(resumed.method.merged[m], d)
    if method == "local":
        for c in range(cfg.data.num_clients):  # every client's personal adapter, at rest in each run directory
            (a, _), (b, _) = ref.states.load(c), resumed.states.load(c)
            for k, v in a["personal"].items():
                torch.testing.assert_close(b["personal"][k], v)
