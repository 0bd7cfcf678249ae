"""Bootstrap intervals and claim verdicts for studies (see docs/evidence.md).

- A mean over test examples gets a 95% percentile interval from a bootstrap
  that resamples examples with replacement *within each stratum* (a stratum is
  one client of one seed), so every replicate keeps each client's and seed's
  share of the examples; the point estimate is the plain mean over all
  examples (pooled over clients and seeds).
- A difference between two arms is the mean of per-example differences over
  the examples both arms scored (paired by seed, client, example id and tier),
  bootstrapped the same way: what the two arms have in common (which examples
  are hard) cancels, so the interval is much narrower than that of two
  independent means.
- A ratio of medians (measured compute) resamples each side's samples
  independently.

Replicates are drawn from a generator seeded by the caller's seed and a stable
hash of what is being estimated, so results do not depend on the order in
which quantities are computed. Everything is vectorised: resampling counts are
an integer (B, N) matrix and each statistic is one matrix product.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Sequence

import numpy as np

LEVEL = 0.95
SUPPORTED, REFUTED, INCONCLUSIVE = "supported", "refuted", "inconclusive"
_CHUNK = 512  # bootstrap replicates per matrix product (bounds the float copy of the counts)


def stable_seed(seed: int, *parts: object) -> list[int]:
    """A generator seed from `seed` and a stable (process-independent) hash of `parts`."""
    return [int(seed), zlib.crc32(repr(parts).encode())]


class StratifiedBootstrap:
    """Resampling counts for N items in strata: replicate b draws, within each stratum of size
    n_s, n_s items with replacement. `mean(values)` then gives each replicate's mean."""

    def __init__(self, strata: Sequence[Hashable], replicates: int, seed: Sequence[int] | int):
        if replicates < 1:
            raise ValueError(f"replicates must be >= 1, got {replicates}")
        labels = list(strata)
        self.n = len(labels)
        self.replicates = replicates
        groups: dict[Hashable, list[int]] = {}
        for i, s in enumerate(labels):
            groups.setdefault(s, []).append(i)
        rng = np.random.default_rng(seed)
        self.counts = np.zeros((replicates, self.n), dtype=np.uint16 if self.n < 2**16 else np.uint32)  # (B, N)
        rows = np.arange(replicates)[:, None]
        for s in sorted(groups, key=repr):  # a fixed order: the draws depend only on the strata
            idx = np.asarray(groups[s])
            draws = rng.integers(0, len(idx), size=(replicates, len(idx)))  # (B, n_s)
            flat = (rows * len(idx) + draws).ravel()
            self.counts[:, idx] = np.bincount(flat, minlength=replicates * len(idx)).reshape(replicates, len(idx))

    def means(self, values: np.ndarray) -> np.ndarray:
        """Replicate means of `values` (N,) -> (B,), or (N, M) -> (B, M)."""
        v = np.asarray(values, dtype=np.float64)
        if v.shape[0] != self.n:
            raise ValueError(f"values hold {v.shape[0]} items, the bootstrap {self.n}")
        out = np.empty((self.replicates, *v.shape[1:]))
        for start in range(0, self.replicates, _CHUNK):
            out[start : start + _CHUNK] = self.counts[start : start + _CHUNK].astype(np.float64) @ v / self.n
        return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap replicates (B,)."""
    lo, hi = np.quantile(np.asarray(replicates, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def mean_interval(values: Sequence[float], strata: Sequence[Hashable], replicates: int = 2000,
                  seed: Sequence[int] | int = 0) -> dict:
    """{"mean", "ci95": [lo, hi], "n"} of `values` by the stratified bootstrap; with no values
    the mean and interval are None."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    boot = StratifiedBootstrap(strata, replicates, seed)
    return {"mean": float(v.mean()), "ci95": list(interval(boot.means(v))), "n": int(v.size)}


def median_interval(samples: Sequence[float], replicates: int = 2000, seed: Sequence[int] | int = 0) -> dict:
    """{"median", "ci95", "n"} of `samples`, resampled with replacement."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        return {"median": None, "ci95": None, "n": 0}
    rng = np.random.default_rng(seed)
    boot = np.median(x[rng.integers(0, x.size, size=(replicates, x.size))], axis=1)  # (B,)
    return {"median": float(np.median(x)), "ci95": list(interval(boot)), "n": int(x.size)}


def ratio_of_medians(numerator: Sequence[float], denominator: Sequence[float], replicates: int = 2000,
                     seed: Sequence[int] | int = 0) -> dict:
    """{"ratio", "ci95", "n": [n_num, n_den]}: median(numerator) / median(denominator), each side
    resampled independently."""
    x, y = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return {"ratio": None, "ci95": None, "n": [int(x.size), int(y.size)]}
    rng = np.random.default_rng(seed)
    bx = np.median(x[rng.integers(0, x.size, size=(replicates, x.size))], axis=1)  # (B,)
    by = np.median(y[rng.integers(0, y.size, size=(replicates, y.size))], axis=1)
    return {"ratio": float(np.median(x) / np.median(y)), "ci95": list(interval(bx / by)),
            "n": [int(x.size), int(y.size)]}


def verdict_positive(ci95: Sequence[float] | None) -> str:
    """A claim that a difference is > 0: supported if its interval lies above 0, refuted if below,
    inconclusive if it touches or straddles 0 (or there is no interval)."""
    if ci95 is None:
        return INCONCLUSIVE
    lo, hi = ci95
    return SUPPORTED if lo > 0 else REFUTED if hi < 0 else INCONCLUSIVE


def verdict_bound(ci95: Sequence[float] | None, op: str, bound: float) -> str:
    """A claim `value <= bound` or `value >= bound`: supported if the whole interval satisfies it,
    refuted if the whole interval violates it, else inconclusive."""
    if op not in ("<=", ">="):
        raise ValueError(f"op must be '<=' or '>=', got {op!r}")
    if ci95 is None:
        return INCONCLUSIVE
    lo, hi = ci95
    if op == "<=":
        return SUPPORTED if hi <= bound else REFUTED if lo > bound else INCONCLUSIVE
    return SUPPORTED if lo >= bound else REFUTED if hi < bound else INCONCLUSIVE
