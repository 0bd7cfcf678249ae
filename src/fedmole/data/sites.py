"""A site's own data: one client's examples in a local file, split where they live.

In a real federation each Flower SuperNode holds its client's data and nothing
else. Its node config names the file and how to read it:

    data-path    the file (JSONL / JSON / CSV with instruction, input, output[, category, task])
    data-format  jsonl | json | csv (default: the file's suffix)
    split-seed   seed of the train / aux / val / test split (default: run.seed)
    name         the client's name in reports (default: its dominant task, else clientN)

`site_client` reads that file alone and splits it exactly as `build_clients` splits
client i's partition on one machine (seed (split-seed, i), the same fractions and caps),
so a site file holding the examples the local engine gives client i, in the same order,
makes the same client. `export_sites` writes such files from a config (the loopback
deployment and the tests use it; a real site brings its own file).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from fedmole.data.sources import DataError, definition_only, read_file
from fedmole.data.splits import split_examples
from fedmole.data.types import ClientData, Example

NODE_KEYS = ("data-path", "data-format", "split-seed", "name")


def site_client(cfg, client_id: int, path: str | Path, fmt: str | None = None, split_seed: int | None = None,
                name: str | None = None) -> ClientData:
    """Client `client_id` built from the file at `path` only (see the module docstring)."""
    d = cfg.data
    examples = read_file(path, fmt or None)
    if d.instruction_mode == "definition":
        examples = [dataclasses.replace(ex, instruction=definition_only(ex.instruction)) for ex in examples]
    seed = cfg.run.seed if split_seed is None else split_seed
    train, aux, val, test = split_examples(
        examples, (seed, client_id), val_frac=d.val_frac, test_frac=d.test_frac, aux_frac=d.aux_frac,
        aux_max=d.aux_max or None, max_train=d.max_train or None, max_val=d.max_val or None,
        max_test=d.max_test or None)
    counts = Counter(ex.task for ex in examples)
    task = min(counts, key=lambda t: (-counts[t], t))  # the most common; ties broken by name, as build_clients does
    return ClientData(client_id=client_id, name=name or task or f"client{client_id}", train=train, aux=aux,
                      val=val, test=test, tasks=sorted(counts))


def node_site(cfg, node_config: dict, client_id: int) -> ClientData | None:
    """The site data a SuperNode's node config names for `client_id`, or None when it names none."""
    if "data-path" not in node_config:
        return None
    unknown = sorted(k for k in node_config if k.startswith(("data-", "split-")) and k not in NODE_KEYS)
    if unknown:
        raise DataError(f"unknown node config key {unknown[0]!r}; site data keys: {', '.join(NODE_KEYS)}")
    seed = node_config.get("split-seed")
    return site_client(cfg, client_id, str(node_config["data-path"]), str(node_config.get("data-format", "")),
                       None if seed in (None, "") else int(seed), str(node_config.get("name", "")) or None)


def write_examples(examples: list[Example], path: str | Path) -> Path:
    """`examples` as a JSONL site file (the fields `read_file` reads back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": ex.instruction, "input": ex.input, "output": list(ex.outputs), "category": ex.category,
             "task": ex.task, "id": ex.id, **({"options": list(ex.options)} if ex.options else {})}
            for ex in examples]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def export_sites(cfg, out_dir: str | Path) -> list[Path]:
    """One site file per client, `out_dir/site_i/data.jsonl`, with client i's examples of `cfg`."""
    from fedmole.engine.setup import partitions_for

    return [write_examples(part, Path(out_dir) / f"site_{i}" / "data.jsonl")
            for i, part in enumerate(partitions_for(cfg))]
