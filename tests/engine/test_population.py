"""A population larger than a round: runtimes built only for the clients a round samples,
checkpoints that follow them, and resume with client state at rest."""

import json

import pytest

from fedmole.config import load_config
from fedmole.engine.client_state import RunClientStates
from fedmole.engine.local import LocalEngine, run_local
from fedmole.engine.setup import Setup
from fedmole.reporting.rundir import RunDir

TINY = "configs/tiny.toml"
QUIET = ["run.progress=false", "run.threads=1", "train.local_steps=1", "eval.max_new_tokens=2"]
# 200 clients of about ten examples each (one test example), four sampled per round
POPULATION = [*QUIET, "data.partition=iid", "data.num_clients=200", "data.max_per_task=340", "fed.tiers=[4,2,1]",
              "fed.sample_fraction=0.02", "data.max_test=1", "eval.before=false", "rounds=2"]


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_population_builds_runtimes_only_for_the_clients_a_round_samples(tmp_path, monkeypatch):
    built = []
    original = Setup.runtime

    def counted(self, client_id, train=True):
        built.append((client_id, train))
        return original(self, client_id, train)

    monkeypatch.setattr(Setup, "runtime", counted)
    engine = LocalEngine(load_config(TINY, POPULATION), tmp_path)
    assert built == []  # set-up partitions and splits; it tokenises nobody
    engine.run()
    rows = _rows(tmp_path)
    sampled = [c for row in rows for c in row.get("clients", [])]
    assert len(sampled) == 8 and [c for c, train in built if train] == sampled
    assert [c for c, train in built if not train] == list(range(200))  # evaluation opens each client once

    # the newest checkpoint holds no client's tensors; the state a round wrote is its clients' only
    newest = tmp_path / "checkpoints" / "round_0002"
    assert sorted(p.name for p in newest.iterdir()) == ["adapter.safetensors", "clients.json", "meta.json",
                                                        "server.pt"]
    written = RunClientStates(tmp_path).files.versions()
    assert {c for c, versions in written.items() if 2 in versions} == set(rows[-1]["clients"])
    assert set(json.loads((newest / "clients.json").read_text())) == {str(c) for c in sampled}


def test_a_client_sampled_round_after_round_is_tokenised_once(tmp_path, monkeypatch):
    import fedmole.engine.setup as setup_module

    calls = []
    encode = setup_module.encode_train
    monkeypatch.setattr(setup_module, "encode_train", lambda *a, **k: calls.append(1) or encode(*a, **k))
    engine = LocalEngine(load_config(TINY, [*QUIET, "rounds=2", "eval.before=false", "data.max_test=1"]), tmp_path)
    engine.run()  # every client trains in both rounds
    assert len(calls) == sum(len(c.train) + len(c.aux) for c in engine.setup.clients)


def _record_names(run_dir):
    files = RunClientStates(run_dir).files
    return {(c, v) for c, versions in files.versions().items() for v in versions}


def _named_by_checkpoints(run_dir):
    out = set()
    for rnd in RunDir(run_dir).checkpoint_rounds():
        manifest = json.loads((run_dir / "checkpoints" / f"round_{rnd:04d}" / "clients.json").read_text())
        out |= {(int(c), v) for c, (v, _) in manifest.items()}
    return out


class Killed(BaseException):
    """Stands in for SIGKILL at one point of a round's end."""


@pytest.mark.parametrize("crash", ["state written, checkpoint not", "checkpoint written, old state not pruned"])
def test_a_run_killed_at_its_checkpoint_resumes_to_the_uninterrupted_result(crash, tmp_path, monkeypatch):
    """Client state is written during the round, before the checkpoint that names it; a resume
    takes up exactly what the newest checkpoint names and deletes what it does not."""
    cfg = load_config(TINY, [*QUIET, "data.max_test=2", "rounds=3", "fed.sample_fraction=0.5",
                             "train.optimizer_state=keep", "eval.before=false"])
    reference = run_local(cfg, tmp_path / "ref")
    run_dir = tmp_path / "run"
    if crash.startswith("state written"):
        checkpoint = RunDir.checkpoint

        def dying(self, rnd, *args):
            if rnd == 2:
                raise Killed
            return checkpoint(self, rnd, *args)

        monkeypatch.setattr(RunDir, "checkpoint", dying)
    else:
        prune, calls = RunClientStates.prune, []

        def dying(self, oldest):
            calls.append(oldest)
            if len(calls) == 2:
                raise Killed
            return prune(self, oldest)

        monkeypatch.setattr(RunClientStates, "prune", dying)
    with pytest.raises(Killed):
        LocalEngine(cfg, run_dir).run()
    monkeypatch.undo()

    summary = LocalEngine(cfg, run_dir).run(resume=True)
    assert summary["final_state_sha256"] == reference["final_state_sha256"]
    assert summary["metrics"] == reference["metrics"]
    assert _record_names(run_dir) == _named_by_checkpoints(run_dir)  # nothing left over, nothing missing
    client, (version, sha) = next(iter(json.loads(
        (run_dir / "checkpoints" / "round_0003" / "clients.json").read_text()).items()))
    store, _ = RunClientStates(run_dir).files.read(int(client), version, sha)
    assert store["optimizer"]["state"]  # train.optimizer_state = keep: the moments are part of it
