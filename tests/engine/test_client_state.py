"""Client state at rest: exact round trips of nested stores, shared blobs, versions kept while a
checkpoint names them, and what a resume deletes."""

import json

import numpy as np
import pytest
import torch

from fedmole.data.tokenize import TrainBatches
from fedmole.engine.client_state import NodeClientState, RunClientStates, StateError, StateFiles


def _optimizer_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.sum().backward()
    opt.step()
    return opt.state_dict()


def _position():
    batches = TrainBatches([([1, 2, 3], [1, 2, 3])] * 5, batch_size=2, seed=7, pad_id=0)
    batches.next()
    return batches.state_dict()  # holds the 128-bit state of numpy's PCG64


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b


def test_any_nested_store_comes_back_exactly(tmp_path):
    w = torch.randn(4, 3)
    store = {
        "optimizer": _optimizer_state(),  # int keys, tuples (betas), None, bools, 0-dim step tensors
        "personal": {"m.lora_A": w, "m.lora_B": torch.zeros(3, 2, dtype=torch.bfloat16), "same": w},
        "merged": {"blk.down": torch.arange(6).reshape(2, 3)[:, 1]},  # a strided view
        "base_version": 3,
        "history": [1.5, float("nan"), float("-inf"), None, "text", (True, [2**70])],
        "numpy": np.float32(0.25),
        "$odd": {"$t": 1},
    }
    files = StateFiles(tmp_path)
    sha = files.write(4, 2, store, _position())
    back, position = files.read(4, 2, sha)
    expected = {**store, "numpy": 0.25}
    assert _same(back, expected) and position == _position()
    record = json.loads(files.record_path(4, 2).read_text())
    assert record["store"]["base_version"] == {"tree": 3, "blob": None}  # scalars stay in the JSON

    with pytest.raises(TypeError, match=r"client state store.bad.x is a set"):
        files.write(5, 1, {"bad": {"x": {1, 2}}}, None)


def test_damaged_files_are_named(tmp_path):
    files = StateFiles(tmp_path)
    sha = files.write(0, 1, {"personal": {"w": torch.ones(3)}}, None)
    with pytest.raises(StateError, match="does not match the checksum the checkpoint recorded"):
        files.read(0, 1, "0" * 64)
    (blob,) = files.blobs.iterdir()
    blob.write_bytes(blob.read_bytes()[:-4] + b"oops")
    with pytest.raises(StateError, match="blob .* does not match its checksum"):
        files.read(0, 1, sha)
    with pytest.raises(StateError, match="client 3: state of round 1 unreadable"):
        files.read(3, 1)


def test_equal_tensors_share_one_blob_until_their_last_record_goes(tmp_path):
    files = StateFiles(tmp_path)
    merged = {"m": torch.randn(8, 8)}
    files.write(0, 1, {"merged": merged, "base_version": 1}, None)
    files.write(1, 1, {"merged": merged, "base_version": 1}, None)
    files.write(2, 1, {"merged": {"m": torch.zeros(8, 8)}}, None)
    assert len(list(files.blobs.iterdir())) == 2
    files.delete(0, 1)
    assert len(list(files.blobs.iterdir())) == 2 and files.read(1, 1)[0]["base_version"] == 1
    files.delete(1, 1)
    assert len(list(files.blobs.iterdir())) == 1


def test_the_same_unchanged_tensors_are_encoded_once(tmp_path, monkeypatch):
    """Clients sharing one tensor (FLoRA's merged base) encode and hash it once; a change in place,
    or other tensors with equal values, are encoded again, and every record reads back exactly."""
    import fedmole.engine.client_state as module

    encoded = []
    real = module.save_file
    monkeypatch.setattr(module, "save_file", lambda t, path: encoded.append(sorted(t)) or real(t, path))
    files = StateFiles(tmp_path)
    merged = {"m": torch.randn(8, 8)}
    for client in range(3):
        files.write(client, 1, {"merged": merged}, None)
    assert len(encoded) == 1
    merged["m"].mul_(2)  # in place: the version counter moves, so the bytes are made again
    files.write(3, 1, {"merged": merged}, None)
    files.write(4, 1, {"merged": {"m": merged["m"].clone()}}, None)  # equal values, another tensor
    assert len(encoded) == 3 and len(list(files.blobs.iterdir())) == 2
    for client, factor in ((0, 0.5), (3, 1), (4, 1)):
        assert torch.equal(files.read(client, 1)[0]["merged"]["m"], merged["m"] * factor)
    assert not [p for p in files.blobs.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_version_stays_while_a_kept_checkpoint_names_it(tmp_path):
    states = RunClientStates(tmp_path)
    states.save(0, 1, {"personal": {"w": torch.ones(2)}}, None)
    states.save(1, 1, {"personal": {"w": torch.zeros(2)}}, None)
    states.prune(1)  # checkpoint 1 written: it names both
    states.save(0, 2, {"personal": {"w": torch.full((2,), 2.0)}}, None)
    states.prune(1)  # checkpoints 1 and 2 kept: client 0's round-1 state is still named by checkpoint 1
    assert states.files.versions() == {0: [1, 2], 1: [1]}
    states.prune(2)  # checkpoint 1 pruned
    assert states.files.versions() == {0: [2], 1: [1]} and len(list(states.files.blobs.iterdir())) == 2
    assert torch.equal(states.load(0)[0]["personal"]["w"], torch.full((2,), 2.0))


def test_restore_deletes_what_later_rounds_wrote_and_keeps_what_older_checkpoints_name(tmp_path):
    states = RunClientStates(tmp_path)
    states.save(0, 1, {"personal": {"w": torch.ones(2)}}, None)
    states.prune(1)
    states.save(0, 2, {"personal": {"w": torch.zeros(2)}}, None)
    manifest = states.manifest()  # checkpoint 2
    states.prune(1)
    states.save(0, 3, {"personal": {"w": torch.full((2,), 3.0)}}, None)  # round 3: killed before its checkpoint
    states.save(1, 3, {"personal": {"w": torch.full((2,), 4.0)}}, None)
    (states.files.blobs / ".half-written.tmp").write_bytes(b"x")

    again = RunClientStates(tmp_path)
    again.restore(manifest, 2)
    assert again.files.versions() == {0: [1, 2]}
    assert sorted(p.name for p in again.files.blobs.iterdir()) == sorted(
        f"{n}.safetensors" for n in again.files.refs)  # the killed round's blobs and leftovers are gone
    assert torch.equal(again.load(0)[0]["personal"]["w"], torch.zeros(2)) and again.load(1) is None
    again.prune(2)  # checkpoint 1 gone: the version it named goes too
    assert again.files.versions() == {0: [2]}

    states.files.record_path(0, 2).unlink()
    with pytest.raises(StateError, match=r"names client state that is not in .* \(clients \[0\]\)"):
        RunClientStates(tmp_path).restore(manifest, 2)


def test_a_node_keeps_only_the_newest_version_of_each_client(tmp_path):
    node = NodeClientState(tmp_path)
    assert node.load(3) is None
    node.save(3, 1, {"optimizer": _optimizer_state()}, _position())
    node.save(3, 2, {"personal": {"w": torch.ones(2)}}, _position())
    store, position = node.load(3)
    assert list(store) == ["personal"] and position == _position()
    folder = tmp_path / "client-3"
    assert [p.name for p in (folder / "records").iterdir()] == ["c000003-r00002.json"]
    assert len(list((folder / "blobs").iterdir())) == 1  # the optimizer's blob went with its record
