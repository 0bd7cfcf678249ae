"""FLAME activation-aware aggregation against hand-computed cases."""

import pytest
import torch

from fedmole.algorithms.aggregate import weighted_average
from fedmole.algorithms.flame import activation_weights, aggregate_flame, tier_weight_shares
from fedmole.algorithms.validate import check_reply
from fedmole.messages import Reply

M = "layers.0.q_proj"


def reply(cid, n, tier, a_scale, b_scale, counts, tokens, rescale=None, router=0.0):
    E = len(counts)
    state = {
        f"{M}.lora_A": torch.full((E, 1, 2), float(a_scale)) * torch.arange(1, E + 1).view(E, 1, 1),
        f"{M}.lora_B": torch.full((E, 2, 1), float(b_scale)),
        f"{M}.router": torch.full((E, 2), float(router)),
        f"{M}.rescale": torch.tensor(rescale if rescale is not None else [1.0] * E),
    }
    return Reply(1, cid, state, n, tier, 0.5, {M: torch.tensor(counts, dtype=torch.float64)}, {M: float(tokens)})


def previous(E=3):
    return {
        f"{M}.lora_A": torch.full((E, 1, 2), -7.0),
        f"{M}.lora_B": torch.full((E, 2, 1), -7.0),
        f"{M}.router": torch.zeros(E, 2),
        f"{M}.rescale": torch.tensor([9.0, 9.0, 9.0]),
    }


def test_activation_weights_by_hand():
    # client 0: 10 tokens, top-1 -> counts (6, 4, 0); client 1: 5 tokens, top-2 -> counts (5, 0, 5)
    g = activation_weights([torch.tensor([6.0, 4, 0]), torch.tensor([5.0, 0, 5])], [10, 5], [100, 300], t=2)
    expected = torch.tensor([[0.36 * 100, 0.16 * 100, 0.0], [1.0 * 300, 0.0, 1.0 * 300]], dtype=torch.float64)
    torch.testing.assert_close(g, expected)


def test_tier_weight_shares_by_hand():
    # gammas as above: expert 0: 36 vs 300, expert 1: 16 vs 0, expert 2: 0 vs 300 (tier 1 vs tier 2)
    replies = [reply(0, 100, 1, 1, 1, [6, 4, 0], 10), reply(1, 300, 2, 1, 1, [5, 0, 5], 5)]
    shares = tier_weight_shares(replies, t=2)
    assert shares["1"] == pytest.approx((36 / 336 + 1.0 + 0.0) / 3)
    assert shares["2"] == pytest.approx((300 / 336 + 0.0 + 1.0) / 3)
    assert list(shares) == ["2", "1"]
    assert tier_weight_shares(replies, t=0) == pytest.approx({"2": 0.75, "1": 0.25})  # t = 0: FedAvg by size


def test_hand_computed_expert_average_and_unused_expert_keeps_previous():
    r0 = reply(0, 100, 1, a_scale=1.0, b_scale=1.0, counts=[6, 4, 0], tokens=10, rescale=[2.0, 0, 0], router=1.0)
    r1 = reply(1, 300, 1, a_scale=3.0, b_scale=5.0, counts=[5, 5, 0], tokens=10, rescale=[4.0, 0, 0], router=2.0)
    new = aggregate_flame([r0, r1], previous(), t=2)
    # expert 0: gamma = (0.36*100, 0.25*300) = (36, 75); B = (36*1 + 75*5) / 111
    # expert 1: gamma = (0.16*100, 0.25*300) = (16, 75); B = (16*1 + 75*5) / 91
    # expert 2: nobody routed to it -> previous value
    B = new[f"{M}.lora_B"]
    assert B[0, 0, 0].item() == pytest.approx((36 + 75 * 5) / 111)
    assert B[1, 0, 0].item() == pytest.approx((16 + 75 * 5) / 91)
    assert B[2, 0, 0].item() == -7.0
    A = new[f"{M}.lora_A"]  # A_j = scale * (j + 1)
    assert A[1, 0, 0].item() == pytest.approx(2 * (16 * 1 + 75 * 3) / 91)
    assert A[2, 0, 0].item() == -7.0
    # router: FedAvg by |D_i| = (100*1 + 300*2)/400
    assert new[f"{M}.router"][0, 0].item() == pytest.approx(700 / 400)
    # rescale entry k-1 = 0 averaged over tier-1 clients by |D_i|, the others keep their value
    assert new[f"{M}.rescale"].tolist() == pytest.approx([(200 + 1200) / 400, 9.0, 9.0])


def test_t_zero_is_data_size_fedavg():
    r0 = reply(0, 100, 2, 1.0, 1.0, counts=[10, 0, 10], tokens=10)
    r1 = reply(1, 300, 2, 3.0, 5.0, counts=[1, 9, 10], tokens=10)
    new = aggregate_flame([r0, r1], previous(), t=0)
    for key in (f"{M}.lora_A", f"{M}.lora_B", f"{M}.router"):
        torch.testing.assert_close(new[key], weighted_average([r0.state[key], r1.state[key]], [100, 300]))


def test_rescalers_average_within_their_tier_only():
    r_full = reply(0, 100, 3, 1, 1, counts=[10, 10, 10], tokens=10, rescale=[0, 0, 1.5])
    r_low = reply(1, 50, 1, 1, 1, counts=[10, 0, 0], tokens=10, rescale=[5.0, 0, 0])
    r_low2 = reply(2, 150, 1, 1, 1, counts=[0, 10, 0], tokens=10, rescale=[1.0, 0, 0])
    new = aggregate_flame([r_full, r_low, r_low2], previous(), t=2)
    assert new[f"{M}.rescale"].tolist() == pytest.approx([(250 + 150) / 200, 9.0, 1.5])


def test_no_replies_keeps_previous_and_previous_is_untouched():
    prev = previous()
    snapshot = {k: v.clone() for k, v in prev.items()}
    assert all(torch.equal(aggregate_flame([], prev, 2)[k], prev[k]) for k in prev)
    aggregate_flame([reply(0, 10, 1, 1, 1, [10, 0, 0], 10)], prev, 2)
    assert all(torch.equal(prev[k], snapshot[k]) for k in prev)


def test_check_reply_rejects_bad_updates():
    good = reply(0, 100, 1, 1, 1, counts=[6, 4, 0], tokens=10)
    shapes = {k: tuple(v.shape) for k, v in good.state.items()}
    E = {M: 3}
    assert check_reply(good, shapes, num_experts=E) is None
    nan = reply(0, 100, 1, float("nan"), 1, counts=[6, 4, 0], tokens=10)
    assert "non-finite" in check_reply(nan, shapes, num_experts=E)
    missing = reply(0, 100, 1, 1, 1, counts=[6, 4, 0], tokens=10)
    del missing.state[f"{M}.router"]
    assert "missing" in check_reply(missing, shapes, num_experts=E)
    wrong = reply(0, 100, 1, 1, 1, counts=[6, 4, 0], tokens=10)
    wrong.state[f"{M}.lora_B"] = torch.zeros(3, 2, 2)
    assert "shape" in check_reply(wrong, shapes, num_experts=E)
    counts = reply(0, 100, 1, 1, 1, counts=[6, 4, 5], tokens=10)
    assert "counts sum" in check_reply(counts, shapes, num_experts=E)
    size = reply(0, 0, 1, 1, 1, counts=[6, 4, 0], tokens=10)
    assert "example count" in check_reply(size, shapes, num_experts=E)
    ints = reply(0, 100, 1, 1, 1, counts=[6, 4, 0], tokens=10)
    ints.state[f"{M}.router"] = torch.zeros(3, 2, dtype=torch.int64)
    assert "dtype" in check_reply(ints, shapes, num_experts=E)
