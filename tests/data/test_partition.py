"""Client partitions: seeded, disjoint, complete; by-task picks distinct tasks;
Dirichlet skew grows as alpha shrinks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedmole.data.partition import by_task, dirichlet, iid
from fedmole.data.sources import DataError
from fedmole.data.types import Example


def pool(num_tasks=6, per_task=50, num_categories=3):
    """Unique examples: task t belongs to category t % num_categories."""
    return [
        Example(f"instr {t}", f"x{t}-{k}", ("y",), f"c{t % num_categories}", f"t{t}")
        for t in range(num_tasks)
        for k in range(per_task)
    ]


def assert_disjoint_cover(parts, examples):
    flat = [ex for p in parts for ex in p]
    assert len(flat) == len(set(flat)) == len(examples)
    assert set(flat) == set(examples)


def test_iid():
    exs = pool()
    parts = iid(exs, 7, seed=0)
    assert_disjoint_cover(parts, exs)
    assert sorted(len(p) for p in parts) == [42] + [43] * 6
    assert parts == iid(exs, 7, seed=0)
    assert parts != iid(exs, 7, seed=1)
    with pytest.raises(DataError, match="cannot split 300 examples across 301 clients"):
        iid(exs, 301, seed=0)


def test_by_task():
    exs = pool()
    parts = by_task(exs, 4, seed=0)
    tasks = [{ex.task for ex in p} for p in parts]
    assert all(len(t) == 1 for t in tasks) and len(set.union(*tasks)) == 4
    assert all(len(p) == 50 for p in parts)
    assert parts == by_task(exs, 4, seed=0)
    assert [p[0].task for p in by_task(exs, 2, seed=0, tasks=["t5", "t1", "t3"])] == ["t5", "t1"]
    with pytest.raises(DataError, match="8 clients but the data has only 6 task"):
        by_task(exs, 8, seed=0)
    with pytest.raises(DataError, match="3 clients but only 2 tasks given"):
        by_task(exs, 3, seed=0, tasks=["t0", "t1"])
    with pytest.raises(DataError, match=r"tasks \['t9'\] have no examples"):
        by_task(exs, 1, seed=0, tasks=["t9"])


def test_by_task_seed_changes_choice():
    exs = pool(num_tasks=20, per_task=2)
    picks = {tuple(p[0].task for p in by_task(exs, 3, seed=s)) for s in range(5)}
    assert len(picks) > 1


def test_dirichlet_covers_seeded_and_min_size():
    exs = pool()
    parts = dirichlet(exs, 5, alpha=0.5, seed=0, min_size=20)
    assert_disjoint_cover(parts, exs)
    assert min(len(p) for p in parts) >= 20
    assert parts == dirichlet(exs, 5, alpha=0.5, seed=0, min_size=20)
    assert parts != dirichlet(exs, 5, alpha=0.5, seed=1, min_size=20)
    by_t = dirichlet(exs, 3, alpha=1.0, seed=0, min_size=1, label="task")
    assert_disjoint_cover(by_t, exs)


def test_dirichlet_errors():
    exs = pool()
    with pytest.raises(DataError, match="10 clients x min_size 40 = 400 exceeds the 300 examples"):
        dirichlet(exs, 10, alpha=1.0, seed=0, min_size=40)
    with pytest.raises(DataError, match="no draw in 5 attempts"):
        dirichlet(exs, 10, alpha=0.01, seed=0, min_size=29, max_attempts=5)
    with pytest.raises(DataError, match="alpha must be > 0"):
        dirichlet(exs, 2, alpha=0, seed=0)
    with pytest.raises(DataError, match="label must be one of"):
        dirichlet(exs, 2, alpha=1, seed=0, label="input")


def _label_skew(parts, num_labels):
    """Mean total-variation distance between each client's label mix and uniform."""
    tv = []
    for p in parts:
        counts = Counter(ex.category for ex in p)
        mix = np.array([counts.get(f"c{j}", 0) for j in range(num_labels)]) / len(p)
        tv.append(0.5 * np.abs(mix - 1 / num_labels).sum())
    return float(np.mean(tv))


def test_dirichlet_alpha_controls_skew():
    exs = pool(num_tasks=8, per_task=250, num_categories=4)  # 4 categories x 500
    skewed = _label_skew(dirichlet(exs, 8, alpha=0.1, seed=0, min_size=5), 4)
    near_iid = _label_skew(dirichlet(exs, 8, alpha=100, seed=0, min_size=5), 4)
    assert skewed > 0.4  # most clients dominated by one or two categories
    assert near_iid < 0.1
