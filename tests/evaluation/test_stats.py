"""Bootstrap intervals and verdicts against cases computed by hand, a naive loop and simulation."""

import numpy as np
import pytest

from fedmole.evaluation.stats import (
    INCONCLUSIVE,
    REFUTED,
    SUPPORTED,
    StratifiedBootstrap,
    interval,
    mean_interval,
    median_interval,
    ratio_of_medians,
    stable_seed,
    verdict_bound,
    verdict_positive,
)


def test_counts_match_a_naive_loop_over_the_same_draws():
    strata = ["b", "a", "b", "a", "a", "b", "b"]
    boot = StratifiedBootstrap(strata, replicates=6, seed=[3, 4])
    rng = np.random.default_rng([3, 4])
    expected = np.zeros((6, 7), dtype=int)
    for s in ("a", "b"):  # the strata in their sorted order, as the class draws them
        idx = [i for i, x in enumerate(strata) if x == s]
        draws = rng.integers(0, len(idx), size=(6, len(idx)))
        for b in range(6):
            for d in draws[b]:
                expected[b, idx[d]] += 1
    np.testing.assert_array_equal(boot.counts, expected)
    values = np.arange(7.0)
    np.testing.assert_allclose(boot.means(values), expected @ values / 7)
    # every replicate keeps each stratum's size
    assert (boot.counts[:, [1, 3, 4]].sum(1) == 3).all() and (boot.counts[:, [0, 2, 5, 6]].sum(1) == 4).all()


def test_hand_computed_intervals():
    # constant values: no spread at all
    assert mean_interval([2.0] * 5, ["c"] * 5) == {"mean": 2.0, "ci95": [2.0, 2.0], "n": 5}
    # strata that are constant inside: the stratified mean never moves (an unstratified one would)
    res = mean_interval([0.0] * 30 + [100.0] * 10, ["x"] * 30 + ["y"] * 10, replicates=500)
    assert res["mean"] == 25.0 and res["ci95"] == pytest.approx([25.0, 25.0])
    assert mean_interval([], []) == {"mean": None, "ci95": None, "n": 0}
    assert interval(np.arange(1001.0)) == pytest.approx((25.0, 975.0))


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    rates = np.array([0.2, 0.5, 0.9])  # three clients of 60 examples, 0/100 scores
    strata = np.repeat([0, 1, 2], 60)
    truth = 100 * rates.mean()
    hits = 0
    trials = 300
    for t in range(trials):
        values = 100.0 * (rng.random(180) < rates[strata])
        lo, hi = mean_interval(values, strata, replicates=1000, seed=t)["ci95"]
        hits += lo <= truth <= hi
    assert 0.90 <= hits / trials <= 0.99


def test_paired_interval_is_much_narrower_for_correlated_arms():
    rng = np.random.default_rng(1)
    difficulty = rng.normal(50, 30, size=400)  # what both arms share: how hard each example is
    a = difficulty + rng.normal(0, 3, size=400)
    b = difficulty + 2 + rng.normal(0, 3, size=400)
    strata = np.repeat(np.arange(8), 50)
    paired = mean_interval(b - a, strata, seed=5)
    boot_a, boot_b = StratifiedBootstrap(strata, 2000, [5, 1]), StratifiedBootstrap(strata, 2000, [5, 2])
    unpaired = interval(boot_b.means(b) - boot_a.means(a))
    width = paired["ci95"][1] - paired["ci95"][0]
    assert width < 0.2 * (unpaired[1] - unpaired[0])
    assert verdict_positive(paired["ci95"]) == SUPPORTED and verdict_positive(unpaired) == INCONCLUSIVE
    assert paired["ci95"][0] < 2 < paired["ci95"][1]


def test_ratio_of_medians():
    assert ratio_of_medians([1.0] * 5, [2.0] * 7) == {"ratio": 0.5, "ci95": [0.5, 0.5], "n": [5, 7]}
    x, y = np.linspace(0.9, 1.1, 21), np.linspace(1.8, 2.2, 31)
    res = ratio_of_medians(x, y, seed=stable_seed(0, "r"))
    assert res["ratio"] == pytest.approx(0.5) and res["ci95"][0] < 0.5 < res["ci95"][1]
    assert res == ratio_of_medians(x, y, seed=stable_seed(0, "r"))  # deterministic
    assert ratio_of_medians([], [1.0])["ratio"] is None
    assert median_interval([3.0, 1.0, 2.0]) | {"ci95": None} == {"median": 2.0, "ci95": None, "n": 3}
    lo, hi = median_interval([3.0, 1.0, 2.0])["ci95"]
    assert 1.0 <= lo <= 2.0 <= hi <= 3.0


def test_verdicts_at_their_boundaries():
    assert verdict_positive([1e-9, 1.0]) == SUPPORTED
    assert verdict_positive([0.0, 1.0]) == INCONCLUSIVE  # touching zero is not "above zero"
    assert verdict_positive([-1.0, 0.0]) == INCONCLUSIVE
    assert verdict_positive([-1.0, -1e-9]) == REFUTED
    assert verdict_positive(None) == INCONCLUSIVE
    assert verdict_bound([0.3, 0.5], "<=", 0.5) == SUPPORTED
    assert verdict_bound([0.3, 0.51], "<=", 0.5) == INCONCLUSIVE
    assert verdict_bound([0.5, 0.7], "<=", 0.5) == INCONCLUSIVE
    assert verdict_bound([0.51, 0.7], "<=", 0.5) == REFUTED
    assert verdict_bound([0.8, 0.9], ">=", 0.8) == SUPPORTED
    assert verdict_bound([0.79, 0.9], ">=", 0.8) == INCONCLUSIVE
    assert verdict_bound([0.7, 0.79], ">=", 0.8) == REFUTED
    with pytest.raises(ValueError):
        verdict_bound([0, 1], "<", 1)


def test_same_seed_same_interval_and_seeds_are_stable():
    values, strata = np.arange(50.0), np.arange(50) % 5
    assert mean_interval(values, strata, seed=stable_seed(1, "x", 2)) == mean_interval(values, strata,
                                                                                       seed=stable_seed(1, "x", 2))
    assert stable_seed(1, "x", 2) == [1, 2890942299]  # crc32: the same in every process (no hash salt)
    assert stable_seed(1, "x") != stable_seed(1, "y")
