"""RSEA: the MILP optimum against exhaustive search, constraints on random instances,
infeasible settings rejected with the numbers, and the embedding noise."""

import itertools

import numpy as np
import pytest
import torch

from fedmole.algorithms.rsea import (
    check_feasible,
    preferences,
    privatize,
    random_assignment,
    rsea_assign,
    solve_assignment,
)


def satisfies(X, K, L, M):
    return bool((X.sum(1) == K).all() and (X.sum(0) >= L).all() and (X.sum(0) <= M).all())


def brute_force(P, K, L, M):
    """Best objective over every binary X (rows: each expert's K-subset of clients)."""
    N, C = P.shape
    rows = [np.isin(np.arange(C), s) for s in itertools.combinations(range(C), K)]
    best = -np.inf
    for choice in itertools.product(rows, repeat=N):
        X = np.stack(choice)
        if L <= X.sum(0).min() and X.sum(0).max() <= M:
            best = max(best, float((P * X).sum()))
    return best


@pytest.mark.parametrize("N,C,K,L,M", [(4, 3, 1, 1, 2), (4, 3, 2, 2, 3), (5, 3, 2, 3, 4), (3, 4, 2, 1, 2),
                                       (5, 4, 1, 1, 2)])
def test_rsea_reaches_the_exhaustive_optimum(N, C, K, L, M):
    rng = np.random.default_rng(N * 100 + C * 10 + K)
    for _ in range(3):
        e, t = rng.normal(size=(N, 4)), rng.normal(size=(C, 4)) * 3
        X = rsea_assign(torch.from_numpy(e), torch.from_numpy(t), K, L, M, r=4)
        assert X.dtype == torch.bool and X.shape == (N, C) and satisfies(X, K, L, M)
        P = preferences(e, t, 4)
        assert float((P * X.numpy()).sum()) == pytest.approx(brute_force(P, K, L, M), abs=1e-9)


def test_preferences_are_rowwise_softmax():
    e, t = np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    s = e @ t.T / np.sqrt(2)
    p = preferences(e, t, 2)
    np.testing.assert_allclose(p, np.exp(s) / np.exp(s).sum(1, keepdims=True))


def test_constraints_hold_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(25):
        C = int(rng.integers(2, 12))
        K = int(rng.integers(1, min(C, 4) + 1))
        N = int(rng.integers(2, 40))
        L = int(rng.integers(0, max(1, N * K // C) + 1))
        M = int(rng.integers(max(L, -(-N * K // C)), N + 3))
        X = rsea_assign(torch.randn(N, 8), torch.randn(C, 8), K, L, M, r=8)
        assert satisfies(X, K, L, M)
        Xr = random_assignment(N, C, K, L, M, rng)
        assert satisfies(Xr, K, L, M)


def test_random_assignment_is_seeded_and_varies():
    a = random_assignment(30, 8, 2, 2, 8, np.random.default_rng(1))
    b = random_assignment(30, 8, 2, 2, 8, np.random.default_rng(1))
    c = random_assignment(30, 8, 2, 2, 8, np.random.default_rng(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_solver_follows_strong_preferences():
    w = torch.eye(3, dtype=torch.float64).repeat_interleave(2, 0)  # experts 0,1 -> client 0, ...
    X = solve_assignment(w, K=1, L=2, M=2)
    assert torch.equal(X, w.bool())


@pytest.mark.parametrize(
    "args,message",
    [
        ((30, 6, 2, 2, 8), r"N\*K = 30\*2 = 60 expert slots exceed C\*M = 6\*8 = 48"),
        ((4, 6, 1, 1, 8), r"N\*K = 4\*1 = 4 expert slots cannot give C\*L = 6\*1 = 6"),
        ((10, 2, 3, 1, 20), r"K=3 distinct clients but there are only C=2"),
        ((10, 4, 2, 6, 5), r"minimum L=6 exceeds the maximum M=5"),
        ((3, 2, 2, 4, 4), r"L=4 distinct experts but the pool has only N=3"),
    ],
)
def test_infeasible_settings_are_rejected_with_the_numbers(args, message):
    with pytest.raises(ValueError, match=message):
        check_feasible(*args)
    with pytest.raises(ValueError, match="infeasible expert assignment"):
        random_assignment(*args, np.random.default_rng(0))


def test_privatize_noise_is_clipped_and_seeded():
    emb = torch.randn(5, 8)
    assert torch.equal(privatize(emb, 0.0, np.random.default_rng(0)), emb)
    noisy = privatize(emb, 5.0, np.random.default_rng(0))
    assert noisy.shape == emb.shape and not torch.allclose(noisy, emb)
    assert (noisy.norm(dim=1) <= emb.norm(dim=1) * (1 + 1e-5)).all()  # default bound: the clean norm
    assert torch.equal(noisy, privatize(emb, 5.0, np.random.default_rng(0)))
    bound = torch.full((5,), 0.5)
    assert (privatize(emb, 1.0, np.random.default_rng(0), bound).norm(dim=1) <= 0.5 + 1e-6).all()


def test_privatize_draws_gamma_with_rate_eta_per_coordinate():
    """|noise| per coordinate = m * |u|, m ~ Gamma(dim, rate eta), u ~ U[-1, 1]: mean dim / (2 eta)."""
    emb = torch.zeros(20000, 8)
    for eta in (2.0, 8.0):
        noise = privatize(emb, eta, np.random.default_rng(1), bound=torch.tensor(float("inf")))
        assert noise.abs().mean().item() == pytest.approx(8 / (2 * eta), rel=0.03)
        # every coordinate moves on its own: no common direction, no unit-length normalisation
        assert noise.norm(dim=1).std().item() > 0.1 * noise.norm(dim=1).mean().item()


def test_larger_eta_is_less_noise():
    emb = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    cosines = []
    for eta in (1.0, 10.0, 50.0, 100.0):
        noisy = privatize(emb, eta, np.random.default_rng(0))
        cosines.append(torch.nn.functional.cosine_similarity(noisy, emb, dim=1).mean().item())
    assert cosines == sorted(cosines) and len(set(cosines)) == 4
    assert cosines[0] < 0.3 and cosines[-1] > 0.99
