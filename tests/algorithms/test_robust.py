"""Robust aggregation helpers against naive oracles and hand-computed cases."""

import pytest
import torch

from fedmole.algorithms.aggregate import per_row_average, weighted_average
from fedmole.algorithms.flame import aggregate_flame
from fedmole.algorithms.robust import (
    clip_to_median,
    clip_update,
    leave_one_out_medians,
    update_norms,
    weighted_trimmed_mean,
)
from fedmole.messages import Reply


def naive_trimmed_mean(column: list[float], k: int) -> float:
    kept = sorted(column)[k:len(column) - k]
    return sum(kept) / len(kept)


def test_equal_weights_give_the_classic_trimmed_mean():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(10, 3, 4, generator=g)
    out = weighted_trimmed_mean(values, torch.ones(10), beta=0.2)  # cut 2 of 10 at each end
    for i in range(3):
        for j in range(4):
            assert out[i, j].item() == pytest.approx(naive_trimmed_mean(values[:, i, j].tolist(), 2))
    assert torch.allclose(weighted_trimmed_mean(values, torch.ones(10), 0.0), values.double().mean(0))


def test_integer_weights_act_as_repeated_values():
    values = torch.tensor([[1.0], [5.0], [100.0], [2.0]])
    weights = torch.tensor([3.0, 1.0, 1.0, 5.0])
    repeated = [1.0] * 3 + [5.0] + [100.0] + [2.0] * 5  # 10 values
    out = weighted_trimmed_mean(values, weights, beta=0.1)  # cut weight 1 at each end
    assert out.item() == pytest.approx(naive_trimmed_mean(repeated, 1))
    assert weighted_average(list(values), weights.tolist(), trim=0.1).item() == pytest.approx(out.item())


def test_one_extreme_client_cannot_move_a_trimmed_coordinate():
    honest = [torch.full((2, 2), v) for v in (1.0, 1.1, 0.9, 1.05)]
    attacker = torch.full((2, 2), 1e30)
    trimmed = weighted_average([*honest, attacker], [1.0] * 5, trim=0.2)
    assert trimmed.max().item() < 1.2
    assert weighted_average([*honest, attacker], [1.0] * 5).min().item() > 1e29


def test_per_row_trimmed_mean_keeps_unused_rows():
    rows = [torch.tensor([[1.0], [7.0]]), torch.tensor([[3.0], [7.0]]), torch.tensor([[1e9], [7.0]])]
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])  # nobody used row 1
    previous = torch.tensor([[0.0], [-5.0]])
    out = per_row_average(rows, weights, previous, trim=0.34)
    assert out[1, 0].item() == -5.0
    assert out[0, 0].item() == pytest.approx(3.0, abs=1e-6)  # the median client survives


def test_flame_with_trimming_shrugs_off_one_poisoned_expert():
    M = "m"

    def reply(cid, value):
        state = {f"{M}.lora_A": torch.full((2, 1, 2), value), f"{M}.lora_B": torch.full((2, 2, 1), value),
                 f"{M}.router": torch.full((2, 2), value), f"{M}.rescale": torch.tensor([1.0, 1.0])}
        return Reply(1, cid, state, 10, 1, 0.5, {M: torch.tensor([5.0, 5.0])}, {M: 10.0})

    previous = {k: torch.zeros_like(v) for k, v in reply(0, 0.0).state.items()}
    replies = [reply(0, 1.0), reply(1, 1.2), reply(2, 0.8), reply(3, 1.1), reply(4, 1e20)]
    plain = aggregate_flame(replies, previous, t=2)
    trimmed = aggregate_flame(replies, previous, t=2, trim=0.2)
    assert plain[f"{M}.lora_A"].max() > 1e19
    assert all(t.abs().max() < 1.3 for t in trimmed.values())


def test_update_lengths_clipping_and_leave_one_out_medians():
    start = {"a": torch.zeros(3), "b": torch.ones(2)}
    state = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([1.0, 5.0]), "new": torch.ones(1)}
    assert update_norms([state], [start]) == [pytest.approx(5.0)]  # keys without a start do not count
    clipped = clip_update(state, start, 1.0)
    assert update_norms([clipped], [start]) == [pytest.approx(1.0)]
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0, 0.0])) and torch.equal(clipped["new"], state["new"])
    assert clip_update(state, start, 10.0)["a"] is state["a"]  # within the bound: untouched
    huge = {"a": torch.full((3,), 3e38), "b": torch.ones(2)}
    assert update_norms([huge], [start])[0] == pytest.approx(3e38 * 3**0.5)  # finite: float64 sums

    assert leave_one_out_medians([1.0, 2.0, 100.0]) == [2.0, 1.0, 1.0]
    assert leave_one_out_medians([4.0], fallback=2.0) == [2.0] and leave_one_out_medians([4.0]) == [None]
    scaled = clip_to_median([{"a": torch.full((1,), v)} for v in (1.0, 2.0, 50.0)], [{"a": torch.zeros(1)}] * 3)
    assert [s["a"].item() for s in scaled] == [1.0, 2.0, 2.0]
