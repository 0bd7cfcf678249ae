"""Client state at rest: what a client keeps between rounds, in files, not in RAM.

A client's state is its runtime store (`ClientRuntime.store`: optimizer moments when
kept, personal tensors, FLoRA's merged base and its version; any nested dicts, lists
and tuples of tensors and scalars) and its batch position (`TrainBatches.state_dict`).
`StateFiles` writes one version of it as

    records/c<client>-r<version>.json   the structure and scalars (JSON), one per version
    blobs/<sha256>.safetensors          the tensors of one top-level store key

Blobs are named by the SHA-256 of their bytes: a blob is written once however many
records use it (FLoRA clients of one merge version share their merged base, which
is encoded and hashed once while it is the same unchanged tensors), and reading one
checks it. Every file is written to a temporary name and renamed, so it
exists whole or not at all; blobs are written before the record that names them.

Two policies sit on top:

- `RunClientStates` (local engine, RUN_DIR/client_state/): version = the round a client
  trained in. A checkpoint's `clients.json` names each client's version and record
  hash; records stay until no kept checkpoint names them, and a resume deletes what a
  killed round wrote after its checkpoint. A round writes only its clients' files.
- `NodeClientState` (a Flower node, one folder per client): the newest version only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedmole.reporting.rundir import file_sha256

RECORD = re.compile(r"c(\d+)-r(\d+)\.json")
FORMAT = 1  # record layout version


class StateError(RuntimeError):
    """A client's state on disk is missing, damaged, or not what was asked for."""


# -- nested values <-> (JSON structure, tensors) ----------------------------------------


def encode_tree(obj, where: str = "store") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors by name) of a nested value.

    Dicts keep non-string keys and tuples keep their type (`{"$d": [[k, v], ...]}`,
    `{"$tuple": [...]}`); a tensor becomes `{"$t": name}`; non-finite floats `{"$f": "nan"}`.
    Python ints of any size (a batch position's RNG state) stay exact.
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(x, path: str):
        if isinstance(x, torch.Tensor):
            name = str(len(tensors))
            tensors[name] = x
            return {"$t": name}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: enc(v, f"{path}.{k}") for k, v in x.items()}
            return {"$d": [[enc(k, path), enc(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"$tuple": [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if isinstance(x, float) and not math.isfinite(x):
            return {"$f": repr(x)}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"client state {path} is a {type(x).__name__}; state kept between rounds may hold "
                        "dicts, lists, tuples, tensors, numbers, strings, booleans and None")

    return enc(obj, where), tensors


def decode_tree(structure, tensors: dict[str, torch.Tensor]):
    """The inverse of `encode_tree`."""

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "$t" in x:
                return tensors[x["$t"]]
            if "$d" in x:
                return {dec(k): dec(v) for k, v in x["$d"]}
            if "$tuple" in x:
                return tuple(dec(v) for v in x["$tuple"])
            if "$f" in x:
                return float(x["$f"])
            return {k: dec(v) for k, v in x.items()}
        return x

    return dec(structure)


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- files ---------------------------------------------------------------------------


class StateFiles:
    """Records and content-addressed blobs under `root` (see the module docstring).

    Blob reference counts are kept in memory for the records this instance wrote or
    adopted (`adopt`); `delete` drops a record and every blob no other record uses.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.records = self.root / "records"
        self.blobs = self.root / "blobs"
        self.refs: Counter[str] = Counter()  # blob -> records using it
        self.blobs_of: dict[tuple[int, int], list[str]] = {}  # (client, version) -> its blobs
        self.bytes_written = 0  # record and new blob bytes, since this instance was made
        # blob written from these very tensor objects (ids, checked by weak reference and version
        # counter): clients sharing one tensor (FLoRA's merged base) encode and hash it once
        self._known: dict[tuple, tuple[str, list]] = {}

    def record_path(self, client: int, version: int) -> Path:
        return self.records / f"c{client:06d}-r{version:05d}.json"

    def write(self, client: int, version: int, store: dict, batches: dict | None) -> str:
        """Write (client, version), replacing an earlier write of the same version; return the
        record's SHA-256."""
        self.records.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(parents=True, exist_ok=True)
        entries, names = {}, []
        for key, value in store.items():
            if not isinstance(key, str):
                raise TypeError(f"client state keys must be strings, got {key!r}")
            tree, tensors = encode_tree(value, f"store.{key}")
            blob = self._put_blob(tensors) if tensors else None
            if blob:
                names.append(blob)
            entries[key] = {"tree": tree, "blob": blob}
        encoded_batches, stray = encode_tree(batches, "batches")
        if stray:
            raise TypeError("a batch position holds no tensors")
        record = {"format": FORMAT, "client": client, "version": version, "store": entries,
                  "batches": encoded_batches}
        data = json.dumps(record, allow_nan=False).encode()
        self.refs.update(names)
        old = self.blobs_of.pop((client, version), None)
        _write_atomic(self.record_path(client, version), data)
        self.bytes_written += len(data)
        self.blobs_of[(client, version)] = names
        if old is not None:
            self._unref(old)
        return _sha256(data)

    def _put_blob(self, tensors: dict[str, torch.Tensor]) -> str:
        names = sorted(tensors)
        key = tuple((n, id(tensors[n])) for n in names)
        known = self._known.get(key)
        if known is not None and all(ref() is tensors[n] and tensors[n]._version == v
                                     for n, (ref, v) in zip(names, known[1])):
            path = self.blobs / f"{known[0]}.safetensors"
            if path.exists():  # the very tensors, unchanged since: same bytes, no need to encode them again
                return known[0]
        tmp = self.blobs / f".new.{os.getpid()}.tmp"  # encoded straight to a file: no second copy in memory
        save_file(_storable(tensors), str(tmp))
        name = file_sha256(tmp)
        path = self.blobs / f"{name}.safetensors"
        if path.exists():
            tmp.unlink()
        else:
            self.bytes_written += tmp.stat().st_size
            os.replace(tmp, path)
        self._known = {k: v for k, v in self._known.items() if all(ref() is not None for ref, _ in v[1])}
        self._known[key] = (name, [(weakref.ref(tensors[n]), tensors[n]._version) for n in names])
        return name

    def read(self, client: int, version: int, sha256: str | None = None) -> tuple[dict, dict | None]:
        """(store, batch position) of (client, version); checks the record against `sha256` when
        given and every blob against its name."""
        path = self.record_path(client, version)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StateError(f"client {client}: state of round {version} unreadable ({path}: {e.strerror})") from None
        if sha256 is not None and _sha256(data) != sha256:
            raise StateError(f"client {client}: {path} does not match the checksum the checkpoint recorded")
        try:
            record = json.loads(data)
            if record.get("format") != FORMAT or record["client"] != client or record["version"] != version:
                raise ValueError(f"format {record.get('format')}, client {record.get('client')}, "
                                 f"version {record.get('version')}")
            store = {}
            for key, entry in record["store"].items():
                tensors = self._get_blob(entry["blob"]) if entry["blob"] else {}
                store[key] = decode_tree(entry["tree"], tensors)
            return store, decode_tree(record["batches"], {})
        except StateError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever a damaged record makes decoding raise
            raise StateError(f"client {client}: {path} is not a client state record ({type(e).__name__}: {e})"
                             ) from None

    def _get_blob(self, name: str) -> dict[str, torch.Tensor]:
        path = self.blobs / f"{name}.safetensors"
        try:
            if file_sha256(path) != name:
                raise StateError(f"client state blob {path} does not match its checksum")
            return load_file(str(path))
        except OSError as e:
            raise StateError(f"client state blob {path} unreadable: {e.strerror}") from None

    def versions(self) -> dict[int, list[int]]:
        """Client -> the versions on disk, ascending."""
        out: dict[int, list[int]] = {}
        for p in self.records.iterdir() if self.records.is_dir() else []:
            m = RECORD.fullmatch(p.name)
            if m:
                out.setdefault(int(m[1]), []).append(int(m[2]))
        return {c: sorted(v) for c, v in out.items()}

    def adopt(self, client: int, version: int) -> None:
        """Count the blobs of a record already on disk (after a restart)."""
        try:
            record = json.loads(self.record_path(client, version).read_bytes())
            names = [e["blob"] for e in record["store"].values() if e["blob"]]
        except Exception as e:  # noqa: BLE001
            raise StateError(f"client {client}: state record of round {version} unreadable: {e!r}") from None
        self.refs.update(names)
        self.blobs_of[(client, version)] = names

    def delete(self, client: int, version: int) -> None:
        """Remove a record, and each of its blobs that no other record uses."""
        self.record_path(client, version).unlink(missing_ok=True)
        self._unref(self.blobs_of.pop((client, version), []))

    def _unref(self, names: list[str]) -> None:
        self.refs.subtract(names)
        for name in set(names):
            if self.refs[name] <= 0:
                del self.refs[name]
                (self.blobs / f"{name}.safetensors").unlink(missing_ok=True)

    def sweep(self) -> None:
        """Delete blobs and temporary files no adopted or written record uses (a killed write's leftovers)."""
        for folder in (self.blobs, self.records):
            for p in folder.iterdir() if folder.is_dir() else []:
                if p.name.startswith("."):
                    p.unlink(missing_ok=True)
                elif folder is self.blobs and p.name.removesuffix(".safetensors") not in self.refs:
                    p.unlink(missing_ok=True)


# -- policies ------------------------------------------------------------------------


class RunClientStates:
    """Every client's state in RUN_DIR/client_state/, versioned by the round it trained in.

    `current` maps a client to (version, record SHA-256) and becomes a checkpoint's
    `clients.json` (`manifest`). A record another version replaced in round s is kept
    while a checkpoint older than s may still be resumed from (`prune`).
    """

    FOLDER = "client_state"

    def __init__(self, run_dir: str | Path):
        self.files = StateFiles(Path(run_dir) / self.FOLDER)
        self.current: dict[int, tuple[int, str]] = {}
        self.replaced: list[tuple[int, int, int]] = []  # (round it was replaced in, client, version)

    def load(self, client: int) -> tuple[dict, dict | None] | None:
        """(store, batch position) of `client`, or None when it has kept nothing yet."""
        if client not in self.current:
            return None
        version, sha = self.current[client]
        return self.files.read(client, version, sha)

    def save(self, client: int, rnd: int, store: dict, batches: dict | None) -> None:
        """Keep what `client` holds after training in round `rnd`."""
        previous = self.current.get(client)
        sha = self.files.write(client, rnd, store, batches)
        if previous is not None and previous[0] != rnd:
            self.replaced.append((rnd, client, previous[0]))
        self.current[client] = (rnd, sha)

    def manifest(self) -> dict[str, list]:
        """client -> [version, record SHA-256] (a checkpoint's clients.json)."""
        return {str(c): [v, sha] for c, (v, sha) in sorted(self.current.items())}

    def prune(self, oldest_checkpoint: int) -> None:
        """Delete the records that no checkpoint from round `oldest_checkpoint` on names."""
        keep = []
        for rnd, client, version in self.replaced:
            if rnd <= oldest_checkpoint:
                self.files.delete(client, version)
            else:
                keep.append((rnd, client, version))
        self.replaced = keep

    def restore(self, manifest: dict[str, list], rnd: int) -> None:
        """Take up the state a checkpoint of round `rnd` names: delete what later rounds wrote,
        keep older versions an older checkpoint may name, check that every named record exists."""
        self.current = {int(c): (int(v), str(sha)) for c, (v, sha) in manifest.items()}
        self.replaced = []
        self.files.refs.clear()
        self.files.blobs_of.clear()
        on_disk = self.files.versions()
        for client, versions in on_disk.items():
            live = self.current.get(client, (None, None))[0]
            for i, version in enumerate(versions):
                if live is None or version > live:  # written after the checkpoint (or never named)
                    self.files.record_path(client, version).unlink(missing_ok=True)
                    continue
                self.files.adopt(client, version)
                if version < live:
                    self.replaced.append((versions[i + 1], client, version))
        missing = sorted(c for c, (v, _) in self.current.items() if v not in on_disk.get(c, []))
        if missing:
            raise StateError(f"the checkpoint of round {rnd} names client state that is not in "
                             f"{self.files.records} (clients {missing[:5]})")
        self.files.sweep()


class NodeClientState:
    """A Flower node's clients, each in its own folder under `root`; only the newest version is kept."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _files(self, client: int) -> StateFiles:
        return StateFiles(self.root / f"client-{client}")

    def load(self, client: int) -> tuple[dict, dict | None] | None:
        files = self._files(client)
        versions = files.versions().get(client)
        return files.read(client, versions[-1]) if versions else None

    def save(self, client: int, rnd: int, store: dict, batches: dict | None) -> None:
        files = self._files(client)
        files.write(client, rnd, store, batches)
        for version in files.versions().get(client, []):
            if version != rnd:
                files.record_path(client, version).unlink()
        files.sweep()  # the blobs only older versions used
