"""Reverse selection-based expert assignment (RSEA, FedAMoLE): experts choose clients.

For one adapted module with N pool experts and C clients:

    S[j, c] = <e_j, t_c> / sqrt(r)            e_j: expert embedding, t_c: client embedding
    P[j, :] = softmax_c S[j, :]               each expert's preference over clients
    max_X  sum_{j,c} P[j, c] X[j, c]
    s.t.   sum_c X[j, c] = K        (each expert serves exactly K clients)
           L <= sum_j X[j, c] <= M  (each client holds L..M experts)
           X binary

solved exactly as a mixed-integer program with `scipy.optimize.milp` (HiGHS).
The constraint matrix is that of a bipartite degree-constrained matching
(totally unimodular), so the root LP is already integral and the solve is fast.
All functions here are pure.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

ArrayLike = torch.Tensor | np.ndarray


def check_feasible(N: int, C: int, K: int, L: int, M: int) -> None:
    """Raise ValueError, with the numbers, unless some X satisfies the RSEA constraints.

    A feasible X exists iff 1 <= K <= C, L <= M, L <= N and C*L <= N*K <= C*M (with
    all experts of equal degree K, the Gale-Ryser conditions reduce to these).
    """
    problems = []
    if min(N, C, K) < 1 or L < 0 or M < 1:
        problems.append(f"need N, C, K, M >= 1 and L >= 0 (got N={N}, C={C}, K={K}, L={L}, M={M})")
    if K > C:
        problems.append(f"each expert must go to K={K} distinct clients but there are only C={C}")
    if L > M:
        problems.append(f"the per-client minimum L={L} exceeds the maximum M={M}")
    if L > N:
        problems.append(f"each client must hold L={L} distinct experts but the pool has only N={N}")
    if N * K > C * M:
        problems.append(f"N*K = {N}*{K} = {N * K} expert slots exceed C*M = {C}*{M} = {C * M} client places")
    if N * K < C * L:
        problems.append(f"N*K = {N}*{K} = {N * K} expert slots cannot give C*L = {C}*{L} = {C * L} client places")
    if problems:
        raise ValueError("infeasible expert assignment: " + "; ".join(problems))


def preferences(expert_emb: ArrayLike, client_emb: ArrayLike, r: int) -> np.ndarray:
    """P (N, C): row-wise softmax over clients of <e_j, t_c>/sqrt(r)."""
    e = np.asarray(torch.as_tensor(expert_emb, dtype=torch.float64))  # (N, r)
    t = np.asarray(torch.as_tensor(client_emb, dtype=torch.float64))  # (C, r)
    s = e @ t.T / math.sqrt(r)  # (N, C)
    s = s - s.max(axis=1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(axis=1, keepdims=True)


def solve_assignment(weights: ArrayLike, K: int, L: int, M: int) -> torch.Tensor:
    """X (N, C) bool maximising sum(weights * X) under the RSEA constraints."""
    w = np.asarray(torch.as_tensor(weights, dtype=torch.float64))
    N, C = w.shape
    check_feasible(N, C, K, L, M)
    per_expert = sparse.kron(sparse.eye(N), np.ones((1, C)))  # (N, N*C): x[j*C + c] = X[j, c]
    per_client = sparse.kron(np.ones((1, N)), sparse.eye(C))  # (C, N*C)
    res = milp(
        c=-w.ravel(),
        constraints=[LinearConstraint(per_expert, K, K), LinearConstraint(per_client, L, M)],
        integrality=np.ones(N * C),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0},
    )
    if not res.success or res.x is None:
        raise RuntimeError(f"RSEA solver failed on N={N}, C={C}, K={K}, L={L}, M={M}: {res.message}")
    return torch.from_numpy(res.x.reshape(N, C) > 0.5)


def rsea_assign(expert_emb: ArrayLike, client_emb: ArrayLike, K: int, L: int, M: int, r: int) -> torch.Tensor:
    """X (N, C) bool: RSEA's assignment from expert embeddings (N, r) and client embeddings (C, r)."""
    return solve_assignment(preferences(expert_emb, client_emb, r), K, L, M)


def random_assignment(N: int, C: int, K: int, L: int, M: int, rng: np.random.Generator) -> torch.Tensor:
    """A random feasible X (N, C) bool: the optimum for i.i.d. uniform preferences."""
    check_feasible(N, C, K, L, M)
    return solve_assignment(rng.random((N, C)), K, L, M)


def privatize(emb: torch.Tensor, eta: float, rng: np.random.Generator,
              bound: torch.Tensor | None = None) -> torch.Tensor:
    """Noisy copy of each vector along the last dim: FedAMoLE's embedding DP, as its official code draws it.

    Every coordinate gets its own noise m * u with m ~ Gamma(shape=dim, rate=eta)
    (numpy's scale = 1/eta) and u ~ U[-1, 1], so eta is a privacy budget: larger eta,
    less noise (E|noise| per coordinate = dim / (2 eta)). A noisy vector longer than its
    `bound` (..., one per vector; default: the clean vector's norm) is scaled down to it.
    eta = 0 turns the noise off.
    """
    if eta <= 0:
        return emb.clone()
    x = emb.detach().to(torch.float64)
    dim = x.shape[-1]
    flat = x.reshape(-1, dim)  # (V, dim)
    mag = torch.from_numpy(rng.gamma(shape=dim, scale=1.0 / eta, size=flat.shape))
    sign = torch.from_numpy(rng.uniform(-1.0, 1.0, size=flat.shape))
    noisy = flat + mag * sign
    limit = flat.norm(dim=1) if bound is None else torch.as_tensor(bound, dtype=torch.float64).reshape(-1)
    limit = limit.expand(flat.shape[0])  # (V,)
    noisy = noisy * torch.clamp(limit / noisy.norm(dim=1).clamp_min(1e-12), max=1.0)[:, None]
    return noisy.reshape(x.shape).to(emb.dtype)
