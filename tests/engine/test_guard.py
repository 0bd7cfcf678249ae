"""The trust boundary of the local engine: implausible and malformed replies are rejected (or
clipped) with a logged reason, never crash the round, and leave the global adapter as the honest
clients alone would make it."""

import logging

import pytest
import torch
from rounds import TINY, clone, engine_round, honest_replies, same_state

from fedmole.config import load_config
from fedmole.engine.guard import Limits, admit_eval
from fedmole.engine.local import LocalEngine


@pytest.fixture(scope="module")
def honest(tmp_path_factory):
    engine, instructions, previous = engine_round(LocalEngine, tmp_path_factory.mktemp("guard"))
    return engine, instructions, previous, honest_replies(engine, instructions)


def aggregate_with(engine, instructions, previous, raw):
    accepted, rejected = engine.validate(raw, instructions)
    return engine.aggregate(1, accepted, instructions, previous), accepted, rejected


def test_each_hostile_reply_is_rejected_and_the_global_adapter_is_what_the_honest_ones_make(honest, caplog):
    engine, instructions, previous, replies = honest
    honest_only = {c: clone(r) for c, r in replies.items() if c != 2}
    expected, _, rejected = aggregate_with(engine, instructions, previous, honest_only)
    assert not rejected

    def with_client_2(mutate):
        bad = clone(replies[2])
        mutate(bad)
        return {**{c: clone(r) for c, r in honest_only.items()}, 2: bad}

    def scale(r, factor):
        r.state = {k: v * factor for k, v in r.state.items()}

    def inflate_counts(r):
        m = next(iter(r.expert_counts))
        r.expert_counts[m] = r.expert_counts[m] * 16  # each expert "served" 16x the tokens seen

    def inflate_tokens(r):  # consistent counts, but more tokens than the round can hold
        r.tokens = {m: t * 10**6 for m, t in r.tokens.items()}
        r.expert_counts = {m: c * 10**6 for m, c in r.expert_counts.items()}

    def drop_counts(r):
        r.expert_counts.pop(next(iter(r.expert_counts)))

    hostile = {
        "example count 1000000000 exceeds fed.max_example_ratio": lambda r: setattr(r, "num_examples", 10**9),
        "update length": lambda r: scale(r, 1e30),
        "exceeds the": inflate_counts,
        "tokens in one round, more than": inflate_tokens,
        "expert counts for the wrong modules: missing": drop_counts,
        "reply for round 0, but this is round 1": lambda r: setattr(r, "round", 0),
        "reply claims client 0": lambda r: setattr(r, "client_id", 0),
        "tokens[": lambda r: setattr(r, "tokens", {**r.tokens, next(iter(r.tokens)): "12"}),
        "metrics is a list": lambda r: setattr(r, "metrics", [1]),
    }
    caplog.set_level(logging.WARNING, logger="fedmole")
    for reason, mutate in hostile.items():
        caplog.clear()
        engine.norm_reference = None
        new, accepted, rejected = aggregate_with(engine, instructions, previous, with_client_2(mutate))
        assert [r.client_id for r in accepted] == [0, 1], reason
        assert reason in rejected[2], (reason, rejected)
        assert "rejected reply of client 2" in caplog.text and reason in caplog.text
        assert same_state(new, expected), reason


def test_clipping_bounds_a_huge_update_instead_of_rejecting_it(honest):
    engine, instructions, previous, replies = honest
    engine.limits.norm_action = "clip"
    try:
        bad = clone(replies[2])
        start = instructions[2].state
        bad.state = {k: start[k] + (v - start[k]) * 1e30 for k, v in bad.state.items()}
        raw = {0: clone(replies[0]), 1: clone(replies[1]), 2: bad}
        engine.norm_reference = None
        new, accepted, rejected = aggregate_with(engine, instructions, previous, raw)
    finally:
        engine.limits.norm_action = "reject"
    assert not rejected and [r.client_id for r in accepted] == [0, 1, 2]
    norm = lambda s, t: float(sum(((s[k] - t[k]).double() ** 2).sum() for k in s).sqrt())  # noqa: E731
    others = sorted(norm(replies[c].state, instructions[c].state) for c in (0, 1))
    assert norm(accepted[2].state, start) == pytest.approx(10 * others[0], rel=1e-5)  # factor x the others' median
    assert all(torch.isfinite(t).all() and t.abs().max() < 1e3 for t in new.values())


def test_evaluation_results_out_of_range_or_malformed_are_rejected():
    limits = Limits(examples={0: 10}, test_examples={0: 4})
    good = {"rouge_l": 41.5, "exact_match": 25.0, "n": 4, "client_id": 7, "tier": 99}
    assert admit_eval(lambda: good, 0, limits) == ({"rouge_l": 41.5, "exact_match": 25.0, "n": 4}, None)
    for bad, reason in [({**good, "rouge_l": float("nan")}, "rouge_l = nan"),
                        ({**good, "exact_match": 333333333.3}, "exact_match = 333333333.3"),
                        ({**good, "n": 0}, "n = 0"), ({**good, "n": 5}, "n = 5; allowed: an integer in 1..4"),
                        ({**good, "n": True}, "n = True"), ("[1]", "not a dict")]:
        metrics, why = admit_eval(lambda b=bad: b, 0, limits)
        assert metrics is None and reason in why

    def boom():
        raise RuntimeError("bytes do not fit the shape")

    assert admit_eval(boom, 0, limits) == (None, "malformed reply: RuntimeError: bytes do not fit the shape")


@pytest.mark.parametrize("mode", ["clip", "trimmed_mean"])
def test_robust_aggregation_runs_end_to_end(tmp_path, mode):
    cfg = load_config("configs/tiny.toml", [*TINY, "rounds=1", f"fed.robust={mode}"])
    engine = LocalEngine(cfg, tmp_path)
    assert engine.method.trim == (0.1 if mode == "trimmed_mean" else 0.0)
    summary = engine.run()
    assert summary["rounds"] == 1 and all(r["num_rejected"] == 0 for r in engine.rows[1:])
