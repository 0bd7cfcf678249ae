"""The personalised protocol: each client scored with its own trained model, saved per client,
fingerprinted, reloaded for inference, and kept across a resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fedmole.algorithms.flame import Flame
from fedmole.config import assign_tiers, load_config
from fedmole.engine.local import LocalEngine, run_local
from fedmole.engine.personal import client_file, joint_sha256, load_client_state
from fedmole.engine.setup import load_clients
from fedmole.inference import RunError, load_run
from fedmole.messages import state_sha256

TINY = "configs/tiny.toml"
FAST = ["rounds=2", "run.progress=false", "train.local_steps=2", "data.max_test=4", "eval.max_new_tokens=4"]


def test_flame_personalised_scores_each_clients_own_trained_model(tmp_path, monkeypatch):
    trained = {}  # client id -> state of its last local training
    real = Flame.client_update

    def spy(self, rt, instruction):
        reply = real(self, rt, instruction)
        trained[rt.client_id] = {k: v.clone() for k, v in reply.state.items()}
        return reply

    monkeypatch.setattr(Flame, "client_update", spy)
    own = run_local(load_config(TINY, [*FAST, "eval.protocol=personalized"]), tmp_path / "own")
    monkeypatch.setattr(Flame, "client_update", real)
    glob = run_local(load_config(TINY, [*FAST, "eval.protocol=global"]), tmp_path / "global")

    assert (own["protocol"], glob["protocol"]) == ("personalized", "global")
    # the protocol changes what is scored, not what is trained
    assert state_sha256(load_file(str(tmp_path / "own" / "adapter.safetensors"))) == \
        state_sha256(load_file(str(tmp_path / "global" / "adapter.safetensors")))
    scores = {p: {n: c["rouge_l"] for n, c in s["per_client"].items()} for p, s in (("own", own), ("g", glob))}
    assert scores["own"] != scores["g"]  # (the means over a few examples may still coincide)
    assert not (tmp_path / "global" / "clients").exists()

    shas = {}
    for name, result in own["per_client"].items():
        c = result["client_id"]
        saved = load_file(str(client_file(tmp_path / "own", c, name)))
        assert saved.keys() == trained[c].keys() and all(torch.equal(saved[k], trained[c][k]) for k in saved)
        assert state_sha256(saved) == result["state_sha256"]
        shas[c] = result["state_sha256"]
    assert own["final_state_sha256"] == joint_sha256(shas) != glob["final_state_sha256"]

    # scoring a client's own model again, from its file, gives the run's figure
    cfg = load_config(tmp_path / "own" / "config.toml")
    clients, _ = load_clients(cfg, assign_tiers(cfg))
    for c in clients[:2]:
        assert load_run(tmp_path / "own", client=c.name).evaluate(c.test)["rouge_l"] == \
            pytest.approx(own["per_client"][c.name]["rouge_l"])
    with pytest.raises(RunError, match="evaluated each client's own model: choose one with --client"):
        load_run(tmp_path / "own")


def test_a_resumed_personalised_run_keeps_the_personal_states(tmp_path):
    """Half the clients train per round, so after a resume some are scored with a model
    that only the checkpoint kept; the final summary must equal the uninterrupted run's."""
    cfg = load_config(TINY, [*FAST, "eval.protocol=personalized", "fed.sample_fraction=0.5"])
    reference = run_local(cfg, tmp_path / "ref")
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[1]["clients"]) != set(rows[2]["clients"])

    for lost in ("round_0002", None):  # resume before round 2, or after it (only the summary is missing)
        run_dir = tmp_path / f"resumed-{lost}"
        shutil.copytree(tmp_path / "ref", run_dir)
        (run_dir / "summary.json").unlink()
        shutil.rmtree(run_dir / "clients")
        if lost:
            shutil.rmtree(run_dir / "checkpoints" / lost)
        summary = LocalEngine(cfg, run_dir).run(resume=True)
        assert summary["final_state_sha256"] == reference["final_state_sha256"]
        assert summary["per_client"] == reference["per_client"]
        for name, result in summary["per_client"].items():
            assert state_sha256(load_client_state(run_dir, result["client_id"])) == result["state_sha256"]


def test_a_tampered_client_file_is_refused(tmp_path):
    run_local(load_config(TINY, [*FAST, "rounds=1", "method=local", "data.num_clients=2", "fed.tiers=[2,1]"]),
              tmp_path)
    path = next((tmp_path / "clients").glob("001-*.safetensors"))
    state = load_file(str(path))
    key = next(iter(state))
    state[key] = state[key] + 1
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="does not match the fingerprint"):
        load_client_state(tmp_path, 1)
