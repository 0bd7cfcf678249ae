"""Per-client seeded train / aux / validation / test splits."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fedmole.data.sources import DataError
from fedmole.data.types import ClientData, Example


def _held_out(n: int, frac: float) -> int:
    """Size of a held-out split: round(n·frac), at least 1 when frac > 0 and n >= 10."""
    size = round(n * frac)
    return max(size, 1) if frac > 0 and n >= 10 else size


def split_examples(
    examples: list[Example],
    seed: int | tuple[int, ...],
    val_frac: float = 0.1,
    test_frac: float = 0.1,
    aux_frac: float = 0.04,
    aux_max: int | None = 200,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
) -> tuple[list[Example], list[Example], list[Example], list[Example]]:
    """Disjoint seeded (train, aux, val, test).

    One permutation is cut test | val | aux | train, so the `max_*` caps only shorten
    a split and never change which examples the other splits hold. aux (for no-grad
    passes such as FedAMoLE's embeddings) is ~aux_frac of the data, capped at aux_max (None: no cap).
    """
    for name, frac in (("val_frac", val_frac), ("test_frac", test_frac), ("aux_frac", aux_frac)):
        if not 0 <= frac < 1:
            raise DataError(f"{name} must be in [0, 1), got {frac}")
    if val_frac + test_frac + aux_frac >= 1:
        raise DataError(f"val_frac + test_frac + aux_frac must be < 1, got {val_frac + test_frac + aux_frac:.3f}")
    n = len(examples)
    n_test, n_val = _held_out(n, test_frac), _held_out(n, val_frac)
    n_aux = _held_out(n, aux_frac) if aux_max is None else min(_held_out(n, aux_frac), aux_max)
    if n - n_test - n_val - n_aux < 1:
        raise DataError(f"{n} examples leave no training data after test {n_test}, val {n_val}, aux {n_aux}")
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([n_test, n_val, n_aux])
    test, val, aux, train = ([examples[i] for i in part] for part in np.split(order, cuts))
    return train[:max_train], aux, val[:max_val], test[:max_test]


def _dominant_task(part: list[Example]) -> str:
    counts = Counter(ex.task for ex in part)
    # most common; ties broken by name so the choice is stable
    return min(counts, key=lambda t: (-counts[t], t))


def build_clients(partitions: list[list[Example]], seed: int, **split_kwargs) -> list[ClientData]:
    """Split each partition into a ClientData (client i's splits seeded by (seed, i)).

    A client is named after its dominant task when that task is non-empty and no
    other client has the same dominant task, else "client{i}".
    """
    dominant = [_dominant_task(p) if p else "" for p in partitions]
    repeated = {t for t, c in Counter(dominant).items() if c > 1}
    clients = []
    for i, part in enumerate(partitions):
        if not part:
            raise DataError(f"client {i} has no examples")
        train, aux, val, test = split_examples(part, (seed, i), **split_kwargs)
        name = dominant[i] if dominant[i] and dominant[i] not in repeated else f"client{i}"
        tasks = sorted({ex.task for ex in part})
        clients.append(ClientData(client_id=i, name=name, train=train, aux=aux, val=val, test=test, tasks=tasks))
    return clients
