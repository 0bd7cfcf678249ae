"""What each client got: the `data` block of summary.json, the console's start-up
lines and report.md's partition table."""

from __future__ import annotations

from collections import Counter

from fedmole.data.types import ClientData


def client_sizes(client: ClientData, tier: int) -> dict:
    """name, id, tier, split sizes and the category mix (over all of the client's splits) of one client."""
    rows = [*client.train, *client.aux, *client.val, *client.test]
    mix = Counter(ex.category or "(none)" for ex in rows)
    return {
        "client_id": client.client_id,
        "name": client.name,
        "tier": tier,
        "train": len(client.train),
        "val": len(client.val),
        "test": len(client.test),
        "aux": len(client.aux),
        "tasks": list(client.tasks),
        "categories": dict(sorted(mix.items(), key=lambda kv: (-kv[1], kv[0]))),
    }


def data_summary(source: str, partition: str, rows_loaded: int, rows_assigned: int,
                 clients: list[ClientData], tiers: list[int]) -> dict:
    """rows loaded (after data.max_per_task), assigned to a client by the partition, and used
    (after the max_train / max_test caps), plus `client_sizes` of every client."""
    per_client = [client_sizes(c, tiers[c.client_id]) for c in clients]
    return {
        "source": source,
        "partition": partition,
        "rows_loaded": rows_loaded,
        "rows_assigned": rows_assigned,
        "rows_used": sum(c["train"] + c["val"] + c["test"] + c["aux"] for c in per_client),
        "clients": per_client,
    }
