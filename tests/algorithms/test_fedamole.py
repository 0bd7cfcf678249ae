"""FedAMoLE: aggregation over holders by hand, embeddings from the aux split only,
reply checks, config feasibility, and one end-to-end run on the local engine."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmole.adapters.amole import AMoLEConfig, held_experts, inject_amole
from fedmole.algorithms.base import ClientRuntime
from fedmole.algorithms.fedamole import (
    FedAMoLE,
    FedAMoLEOptions,
    aggregate_expert_embeddings,
    aggregate_fedamole,
)
from fedmole.config import ConfigError, load_config
from fedmole.data.tokenize import collate_train
from fedmole.data.types import ClientData
from fedmole.engine.personal import joint_sha256, load_client_state
from fedmole.messages import Reply, state_sha256
from fedmole.models import tiny_llama
from fedmole.training import LocalTrainer

M = "layers.0.q_proj"


def test_aggregation_over_holders_by_hand():
    previous = {
        f"{M}.lora_A": torch.full((3, 1, 2), -7.0),
        f"{M}.lora_B": torch.full((3, 2, 1), -7.0),
        f"{M}.token_proj": torch.zeros(1, 2),
        f"{M}.shared_A": torch.zeros(1, 2),
    }
    # client 0 holds experts {0, 1}, client 1 holds {1}; nobody holds expert 2
    v0 = {f"{M}.lora_A.0": torch.full((1, 2), 1.0), f"{M}.lora_B.0": torch.full((2, 1), 2.0),
          f"{M}.lora_A.1": torch.full((1, 2), 3.0), f"{M}.lora_B.1": torch.full((2, 1), 4.0),
          f"{M}.token_proj": torch.tensor([[1.0, 2.0]]), f"{M}.shared_A": torch.tensor([[0.0, 4.0]])}
    v1 = {f"{M}.lora_A.1": torch.full((1, 2), 5.0), f"{M}.lora_B.1": torch.full((2, 1), 10.0),
          f"{M}.token_proj": torch.tensor([[3.0, 6.0]]), f"{M}.shared_A": torch.tensor([[2.0, 0.0]])}
    new = aggregate_fedamole([v0, v1], previous)
    torch.testing.assert_close(new[f"{M}.lora_A"][:, 0, 0], torch.tensor([1.0, 4.0, -7.0]))
    torch.testing.assert_close(new[f"{M}.lora_B"][:, 0, 0], torch.tensor([2.0, 7.0, -7.0]))
    torch.testing.assert_close(new[f"{M}.token_proj"], torch.tensor([[2.0, 4.0]]))  # unweighted
    torch.testing.assert_close(new[f"{M}.shared_A"], torch.tensor([[1.0, 2.0]]))
    assert previous[f"{M}.lora_A"][1, 0, 0] == -7.0  # pure

    emb = aggregate_expert_embeddings(
        [{f"{M}.expert_emb.0": torch.tensor([1.0, 1.0]), f"{M}.expert_emb.1": torch.tensor([2.0, 0.0])},
         {f"{M}.expert_emb.1": torch.tensor([4.0, 2.0])}],
        {M: torch.full((3, 2), 9.0)},
    )
    torch.testing.assert_close(emb[M], torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]]))


class Exhausted:
    """Training batches that must not be touched by the embedding pass."""

    def next(self):
        raise AssertionError("the embedding pass read the training batches")


def small_client(aux_offset=0, seed=0, num_clients=4, options=None):
    torch.manual_seed(seed)
    model = tiny_llama(64, hidden=32, layers=2)
    opts = options or FedAMoLEOptions(pool_size=6, experts_per_expert=2, min_experts=2, max_experts=4)
    adapter = inject_amole(model, AMoLEConfig(pool_size=opts.pool_size, rank=4, dropout=0.0, init_seed=seed))
    with torch.no_grad():
        for layer in adapter.layers.values():
            layer.lora_B.normal_(0, 0.1)
    method = FedAMoLE(opts, adapter, tiers=[1] * num_clients, seed=seed)
    aux = [collate_train([([5 + aux_offset, 6, 7, 8, 9], [-100] * 5), ([10 + aux_offset, 11, 12], [-100] * 3)], 0)]
    trainer = LocalTrainer(steps=2, lr=1e-2, weight_decay=0.0, grad_clip=1.0, aux_weight=1e-3,
                           device=torch.device("cpu"))
    data = ClientData(0, "c0", train=[None] * 5, aux=[None] * 2, val=[], test=[])
    rt = ClientRuntime(0, 1, data, Exhausted(), adapter, trainer, aux_batches=aux)
    return method, adapter, rt


def direct_embeddings(adapter, batch):
    """Token means of W_t x and A_j x over real tokens, from the layers' inputs (hooks)."""
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda mod, args, m=m: inputs.__setitem__(m, args[0]))
             for m, layer in adapter.layers.items()]
    with torch.no_grad(), adapter.route(2, token_mask=batch["attention_mask"]):
        adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for h in hooks:
        h.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    out = {}
    for m, layer in adapter.layers.items():
        x = inputs[m].reshape(-1, layer.d_in)[real]
        out[f"{m}.client_emb"] = (x @ layer.token_proj.t()).mean(0)
        for j in layer.held.tolist():
            out[f"{m}.expert_emb.{j}"] = (x @ layer.lora_A[j].t()).mean(0)
    return out


def test_embeddings_come_from_the_aux_split_only():
    method, adapter, rt = small_client()
    adapter.load_held_state(method.configure(1, [0], method.initial_state(adapter))[0].state)
    extra, bounds = method.embed(rt)  # rt.batches raises if touched
    assert set(bounds) == set(extra) and all(b > 0 for b in bounds.values())
    expected = direct_embeddings(adapter, rt.aux_batches[0])
    assert set(extra) == set(expected)
    for key in expected:
        torch.testing.assert_close(extra[key], expected[key].float(), rtol=1e-4, atol=1e-5)
    # distinctive aux data gives different embeddings
    _, adapter2, rt2 = small_client(aux_offset=20)
    adapter2.load_held_state(method.configure(1, [0], method.initial_state(adapter))[0].state)
    other, _ = method.embed(rt2)
    assert not torch.allclose(other[f"{next(iter(adapter.layers))}.client_emb"],
                              extra[f"{next(iter(adapter.layers))}.client_emb"])


def test_client_update_replies_with_its_held_view_and_embeddings():
    method, adapter, rt = small_client()
    items = [([1, 2, 3, 4, 5, 6], [-100, -100, -100, 4, 5, 6])] * 4
    rt.batches = type("B", (), {"next": staticmethod(lambda: collate_train(items, 0))})()
    global_state = method.initial_state(adapter)
    instruction = method.configure(1, [0], global_state)[0]
    reply = method.client_update(rt, instruction)
    assert set(reply.state) == set(instruction.state)
    assert method.check(reply, instruction) is None
    assert set(rt.store["personal"]) == set(instruction.state)
    expected = direct_embeddings(adapter, rt.aux_batches[0])  # adapter holds the trained view
    for key in expected:
        torch.testing.assert_close(reply.extra[key], expected[key].float(), rtol=1e-4, atol=1e-5)
    # experts the client does not hold never leave it and stay untouched in the pool
    held = held_experts(instruction.state)
    for m, layer in adapter.layers.items():
        unheld = [j for j in range(6) if j not in held[m]]
        torch.testing.assert_close(layer.lora_B.detach()[unheld], global_state[f"{m}.lora_B"][unheld])

    bad = Reply(**{**reply.__dict__, "extra": {**reply.extra, "x.client_emb": torch.zeros(4)}})
    assert "embedding keys" in method.check(bad, instruction)
    # counts travel as int32, one per held expert, adding up to tokens * k
    m = next(iter(held))
    counts = reply.expert_counts[m]
    assert counts.dtype == torch.int32 and counts.shape == (len(held[m]),)
    assert int(counts.sum()) == int(reply.tokens[m]) * 2 and all(c.dtype == torch.int32
                                                                 for c in reply.expert_counts.values())

    def with_counts(c):
        return Reply(**{**reply.__dict__, "expert_counts": {**reply.expert_counts, m: c}})

    pool = torch.zeros(6, dtype=torch.int32)
    pool[held[m]] = counts
    assert "int32 of shape (" in method.check(with_counts(pool), instruction)  # the whole pool
    assert "int32 of shape (" in method.check(with_counts(counts.double()), instruction)
    assert "expected tokens*k" in method.check(with_counts(counts + torch.eye(len(counts), dtype=torch.int32)[0]),
                                               instruction)
    assert "negative" in method.check(with_counts(-counts), instruction)
    usage = method.expert_usage(reply)
    assert set(usage) == set(held) and list(usage[m]) == [str(j) for j in held[m]]
    assert sum(usage[m].values()) == pytest.approx(1.0)
    extra_key = {**reply.state, f"{m}.lora_A.{unheld}": torch.zeros(4, 32)}
    assert "wrong key set" in method.check(Reply(**{**reply.__dict__, "state": extra_key}), instruction)


def test_server_state_round_trip_and_assignment_modes():
    method, adapter, _ = small_client()
    x0 = {m: x.clone() for m, x in method.assignment.items()}
    for x in x0.values():
        assert (x.sum(1) == 2).all() and (x.sum(0) >= 2).all() and (x.sum(0) <= 4).all()
    other, _, _ = small_client()
    other.assignment = {m: ~x for m, x in x0.items()}
    other.load_state_dict(method.state_dict())
    assert all(torch.equal(other.assignment[m], x0[m]) for m in x0)



@pytest.mark.parametrize("assignment", ["rsea", "static", "random"])
@pytest.mark.parametrize("expert_counts", ["data", "uniform"])
def test_assignment_and_expert_counts_are_independent_switches(assignment, expert_counts):
    opts = FedAMoLEOptions(pool_size=6, min_experts=1, max_experts=5, assignment=assignment,
                           expert_counts=expert_counts)
    method, adapter, _ = small_client(options=opts)
    torch.manual_seed(1)
    method.expert_emb = {m: torch.randn_like(e) for m, e in method.expert_emb.items()}
    method.client_emb = {m: torch.randn_like(t) for m, t in method.client_emb.items()}
    before = {m: x.clone() for m, x in method.assignment.items()}
    after = method.next_assignment(3)
    for x in (*before.values(), *after.values()):
        assert (x.sum(1) == 2).all()  # K holders per expert
        held = x.sum(0)
        assert (held == 3).all() if expert_counts == "uniform" else ((held >= 1) & (held <= 5)).all()
    same = all(torch.equal(after[m], before[m]) for m in before)
    assert same == (assignment == "static")
    if assignment == "rsea":  # follows the embeddings: the optimum for their preferences
        from fedmole.algorithms.rsea import preferences

        for m in after:
            p = preferences(method.expert_emb[m], method.client_emb[m], 4)
            assert (p * after[m].numpy()).sum() >= (p * before[m].numpy()).sum() - 1e-9


@pytest.mark.parametrize("assignment", ["static", "random"])
def test_static_and_random_compute_and_upload_no_embeddings(assignment, monkeypatch):
    method, adapter, rt = small_client(options=FedAMoLEOptions(pool_size=6, max_experts=4, assignment=assignment))
    items = [([1, 2, 3, 4, 5, 6], [-100, -100, -100, 4, 5, 6])] * 4
    rt.batches = type("B", (), {"next": staticmethod(lambda: collate_train(items, 0))})()

    def no_pass(*args, **kwargs):
        raise AssertionError("an embedding pass over the aux split")

    monkeypatch.setattr(type(adapter), "embedding_pass", no_pass)
    instruction = method.configure(1, [0], method.initial_state(adapter))[0]
    reply = method.client_update(rt, instruction)
    assert reply.extra == {} and method.check(reply, instruction) is None
    sneaked = Reply(**{**reply.__dict__, "extra": {f"{M}.client_emb": torch.zeros(4)}})
    assert "uses none" in method.check(sneaked, instruction)


def test_infeasible_config_names_the_numbers_and_the_fix():
    cfg = load_config("configs/tiny.toml", ["method=fedamole"])  # 6 clients, pool 30, K=2, M=8
    cfg.methods["fedamole"] = FedAMoLEOptions()
    with pytest.raises(ConfigError, match=r"60 expert slots exceed C\*M = 6\*8 = 48.*pool_size <= 24.*"
                                          r"max_experts >= 10"):
        cfg.method_options().check(cfg)
    cfg.methods["fedamole"] = FedAMoLEOptions(pool_size=12)
    cfg.method_options().check(cfg)
    cfg.methods["fedamole"] = FedAMoLEOptions(pool_size=13, expert_counts="uniform")
    with pytest.raises(ConfigError, match=r"N\*K = 13\*2 = 26 is not divisible by data.num_clients C=6; "
                                          r"e.g. set fedamole.pool_size to 12 or 15"):
        cfg.method_options().check(cfg)
    with pytest.raises(ConfigError, match="fedamole.assignment = 'uniform'; allowed: rsea, static, random"):
        load_config("configs/tiny.toml", ["method=fedamole", "fedamole.assignment=uniform"])
    cfg = load_config("configs/tiny.toml", ["method=fedamole", "fedamole.expert_counts=uniform",
                                            "fedamole.assignment=random"])
    assert cfg.method_options().bounds(6) == (2, 4, 4)


def test_end_to_end_on_the_local_engine(tmp_path):
    from fedmole.engine.local import run_local

    # experts_per_expert=1 keeps the default pool of 30 feasible for 4 clients (30 <= 4*8); DP on
    cfg = load_config("configs/tiny.toml", ["method=fedamole", "fedamole.experts_per_expert=1", "rounds=2",
                                            "fedamole.dp_eta=50",
                                            "data.num_clients=4", "train.local_steps=1", "data.max_test=1",
                                            "eval.max_new_tokens=1", "run.progress=false"])
    summary = run_local(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(not r["rejected"] and len(r["clients"]) == 4 for r in rows[1:])
    assert np.isfinite(summary["metrics"]["rouge_l"]) and summary["method"] == "fedamole"
    # personalised, without tiers: no per-tier rows; each client's evaluated model saved and fingerprinted
    assert summary["protocol"] == "personalized" and summary["per_tier"] == {}
    shas = {c["client_id"]: c["state_sha256"] for c in summary["per_client"].values()}
    assert summary["final_state_sha256"] == joint_sha256(shas)
    assert all(state_sha256(load_client_state(tmp_path, c)) == sha for c, sha in shas.items())
    server = torch.load(tmp_path / "checkpoints" / "round_0002" / "server.pt")
    for x in server["assignment"].values():  # RSEA's assignment for round 3 is feasible
        assert (x.sum(1) == 1).all() and (x.sum(0) >= 2).all() and (x.sum(0) <= 8).all()
    assert all(e.abs().sum() > 0 and torch.isfinite(e).all() for e in server["expert_emb"].values())
    # a client downloads only its held view: on average 30/4 of the 30 experts, not the pool
    pool = load_file(str(tmp_path / "adapter.safetensors"))
    full = sum(t.numel() * t.element_size() for t in pool.values())
    assert rows[1]["comm_bytes_down"] < 4 * full / 2


def test_dp_noise_shrinks_as_the_budget_grows():
    """The uploaded embeddings under DP: noisy, within the clip bound, closer to the clean ones at larger eta."""
    cosines = {}
    for eta in (0.0, 1.0, 100.0):
        method, adapter, rt = small_client(options=FedAMoLEOptions(pool_size=6, max_experts=4, dp_eta=eta))
        items = [([1, 2, 3, 4, 5, 6], [-100, -100, -100, 4, 5, 6])] * 4
        rt.batches = type("B", (), {"next": staticmethod(lambda: collate_train(items, 0))})()
        instruction = method.configure(1, [0], method.initial_state(adapter))[0]
        reply = method.client_update(rt, instruction)
        assert method.check(reply, instruction) is None
        clean, bounds = method.embed(rt)  # the same trained view, without noise
        keys = sorted(clean)
        if eta == 0:
            assert all(torch.equal(reply.extra[k], clean[k]) for k in keys)
            continue
        assert all(float(reply.extra[k].norm()) <= float(bounds[k]) + 1e-5 for k in keys)
        cosines[eta] = float(np.mean([torch.nn.functional.cosine_similarity(reply.extra[k], clean[k], dim=0)
                                      for k in keys]))
    assert cosines[1.0] < 0.5 < 0.95 < cosines[100.0]
