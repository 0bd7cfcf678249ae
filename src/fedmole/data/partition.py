"""Split a pool of examples across federated clients: one task per client,
Dirichlet over a label, or IID. Every partition is seeded and disjoint."""

from __future__ import annotations

import numpy as np

from fedmole.data.sources import DataError
from fedmole.data.types import Example

LABELS = ("category", "task")


def _groups(examples: list[Example], label: str) -> dict[str, list[int]]:
    """label value -> indices of its examples, in first-appearance order."""
    out: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        out.setdefault(getattr(ex, label), []).append(i)
    return out


def _check_clients(num_clients: int, num_examples: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_examples < num_clients:
        raise DataError(f"cannot split {num_examples} examples across {num_clients} clients")


def by_task(examples: list[Example], num_clients: int, seed: int, tasks: list[str] | None = None) -> list[list[Example]]:
    """One task per client: client i gets every example of its task.

    Tasks are `tasks[:num_clients]` when given, else a seeded sample of the tasks
    present. Examples of unchosen tasks are left out.
    """
    groups = _groups(examples, "task")
    _check_clients(num_clients, len(examples))
    if tasks is not None:
        unknown = [t for t in tasks if t not in groups]
        if unknown:
            raise DataError(f"by_task: tasks {unknown} have no examples; present: {sorted(groups)[:5]}...")
        if len(set(tasks)) != len(tasks):
            raise DataError(f"by_task: tasks lists a task twice: {tasks}")
        if len(tasks) < num_clients:
            raise DataError(f"by_task needs one task per client: {num_clients} clients but only {len(tasks)} tasks given")
        chosen = list(tasks[:num_clients])
    else:
        names = sorted(groups)
        if len(names) < num_clients:
            raise DataError(
                f"by_task needs one task per client: {num_clients} clients but the data has only "
                f"{len(names)} task(s); use fewer clients or a dirichlet/iid partition"
            )
        rng = np.random.default_rng(seed)
        chosen = [names[i] for i in rng.choice(len(names), size=num_clients, replace=False)]
    return [[examples[i] for i in groups[t]] for t in chosen]


def dirichlet(
    examples: list[Example],
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    label: str = "category",
    max_attempts: int = 100,
) -> list[list[Example]]:
    """Label-skewed partition: for each label value, client shares ~ Dir(alpha · 1).

    Small alpha concentrates each label on few clients; large alpha approaches IID.
    Draws again (same generator, so still seeded) until every client holds at least
    `min_size` examples, at most `max_attempts` times.
    """
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    if label not in LABELS:
        raise DataError(f"dirichlet label must be one of {LABELS}, got {label!r}")
    _check_clients(num_clients, len(examples))
    if num_clients * min_size > len(examples):
        raise DataError(
            f"dirichlet: {num_clients} clients x min_size {min_size} = {num_clients * min_size} "
            f"exceeds the {len(examples)} examples"
        )
    groups = list(_groups(examples, label).values())
    rng = np.random.default_rng(seed)
    smallest = 0
    for _ in range(max_attempts):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for idx in groups:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(shuffled, cuts)):
                parts[client].extend(chunk.tolist())
        smallest = min(len(p) for p in parts)
        if smallest >= min_size:
            return [[examples[i] for i in sorted(p)] for p in parts]
    raise DataError(
        f"dirichlet(alpha={alpha}): no draw in {max_attempts} attempts gave all {num_clients} clients "
        f"at least {min_size} examples (last draw's smallest client: {smallest}); "
        "lower min_size, raise alpha, or use fewer clients"
    )


def iid(examples: list[Example], num_clients: int, seed: int) -> list[list[Example]]:
    """Uniformly random partition into `num_clients` near-equal parts."""
    _check_clients(num_clients, len(examples))
    order = np.random.default_rng(seed).permutation(len(examples))
    return [[examples[i] for i in sorted(chunk.tolist())] for chunk in np.array_split(order, num_clients)]
