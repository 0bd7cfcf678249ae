"""What an engine's evaluation produces: per-example records, per-client and
per-tier means, and the measured compute of training, shared by every engine.

A record (one line of RUN_DIR/predictions.jsonl) is one example of one client
scored at one tier:

    {"client": 3, "client_name": "count_words", "client_tier": 2, "tier": 4,
     "example_id": "count_words/17", "prediction": "3", "references": ["3"],
     "scores": {"rouge_l": 100.0, "exact_match": 100.0, "accuracy": 100.0}}

`client_tier` is the client's own tier, `tier` the one whose k it was evaluated
with (they differ only with eval.tiers = all); `accuracy` is present for
examples with answer options.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from statistics import fmean, median

from fedmole.algorithms.base import ClientRuntime
from fedmole.console import bars_enabled
from fedmole.evaluation.predict import METRICS, mean_scores, predict
from fedmole.messages import State, state_sha256

log = logging.getLogger("fedmole")

PREDICTIONS = "predictions.jsonl"
# prompts scored at once by evaluate_clients, in eval.batch_size batches: enough to fill the
# batches across many small clients, few enough that the prompts held stay small
CHUNK_BATCHES = 32


def tiers_to_evaluate(setup) -> list[int] | None:
    """Every tier in use, largest first, when eval.tiers = all; None (own tier only) otherwise."""
    return sorted(set(setup.tiers), reverse=True) if setup.cfg.eval.tiers == "all" else None


def _examples(setup, rt: ClientRuntime) -> list:
    e = setup.cfg.eval
    examples = rt.data.test if e.split == "test" else rt.data.val
    if not examples:
        raise ValueError(f"client {rt.data.name} has no {e.split} examples to evaluate (data.max_test, "
                         "data.test_frac / data.val_frac and the client's size decide how many it gets)")
    return examples


def _labels(setup, rt: ClientRuntime, tiers: list[int] | None) -> list[int]:
    return [rt.tier] if tiers is None else setup.method.eval_tiers(rt, tiers)


def _predict(setup, examples: list) -> list[dict]:
    e = setup.cfg.eval
    return predict(setup.model, setup.tokenizer, examples, setup.encode_prompt, max_new_tokens=e.max_new_tokens,
                   batch_size=e.batch_size, autocast_dtype=setup.autocast,
                   progress=bars_enabled(setup.cfg.run.progress))


def _result(rt: ClientRuntime, k_of: dict[int, int], scored: dict[int, list[dict]], tiers: list[int] | None
            ) -> dict:
    """evaluate_client's result from the records `scored[tier]` of each tier the client was scored at."""
    by_tier, records = {}, []
    for tier, recs in scored.items():
        by_tier[tier] = mean_scores(recs)
        log.debug("evaluated client %d at k=%d: %s over %d examples", rt.client_id, k_of[tier],
                  ", ".join(f"{m} {by_tier[tier][m]:.2f}" for m in METRICS if m in by_tier[tier]), len(recs))
        records += [{"client": rt.client_id, "client_name": rt.data.name, "client_tier": rt.tier, "tier": tier,
                     **r} for r in recs]
    own = by_tier.get(rt.tier) or next(iter(by_tier.values()))
    result = {"client_id": rt.client_id, "tier": rt.tier, **own}
    if tiers is not None:
        result["by_tier"] = {str(t): s for t, s in by_tier.items()}
    result["records"] = records
    return result


def evaluate_client(setup, rt: ClientRuntime, global_state: State, tiers: list[int] | None = None) -> dict:
    """One client's scores on its eval.split with the weights `Method.eval_view` gives it from
    `global_state` (the engines pass `Method.final_state` of the global state).

    With `tiers`, the client is scored at each of `Method.eval_tiers(rt, tiers)`; the result's
    own figures are those at its own tier, and `by_tier` holds every tier's. `records` holds
    the per-example records (see the module docstring). Under the personalised protocol,
    `state_sha256` fingerprints the client's own model that was scored.
    """
    examples = _examples(setup, rt)
    k_of, scored = {}, {}
    for tier in _labels(setup, rt, tiers):
        k_of[tier] = setup.method.eval_view(rt, global_state, tier)
        with setup.adapter.route(k_of[tier]):
            scored[tier] = _predict(setup, examples)
    result = _result(rt, k_of, scored, tiers)
    if setup.method.protocol == "personalized":  # which of the clients' own models was scored
        result["state_sha256"] = state_sha256(setup.method.evaluated_state(rt, global_state))
    return result


def evaluate_clients(setup, runtimes: Iterable[ClientRuntime], global_state: State,
                     tiers: list[int] | None = None) -> Iterator[dict]:
    """`evaluate_client`'s result for each runtime, in their order.

    Under the personalised protocol each client is scored with its own model, one client at a
    time. Under the global protocol every client gets the same weights at a tier
    (`Method.eval_view`), so the clients are scored together: runtimes are taken until they
    hold `CHUNK_BATCHES` batches of examples (eval.batch_size each), and each tier's examples
    of all of them are predicted in one call, then split back per client. The work thus follows the examples, not the
    clients, while the prompts held at once stay bounded.
    """
    if setup.method.protocol == "personalized":
        for rt in runtimes:
            yield evaluate_client(setup, rt, global_state, tiers)
        return
    chunk, held, bound = [], 0, CHUNK_BATCHES * setup.cfg.eval.batch_size
    for rt in runtimes:
        chunk.append((rt, _examples(setup, rt)))
        held += len(chunk[-1][1])
        if held >= bound:
            yield from _evaluate_together(setup, chunk, global_state, tiers)
            chunk, held = [], 0
    if chunk:
        yield from _evaluate_together(setup, chunk, global_state, tiers)


def _evaluate_together(setup, chunk: list[tuple[ClientRuntime, list]], global_state: State,
                       tiers: list[int] | None) -> list[dict]:
    """The results of (runtime, its examples) pairs scored together: one prediction per tier."""
    labels = [_labels(setup, rt, tiers) for rt, _ in chunk]
    k_of: dict[int, int] = {}
    scored: list[dict[int, list[dict]]] = [{} for _ in chunk]
    for tier in dict.fromkeys(t for ls in labels for t in ls):  # every tier, in first-seen order
        members = [i for i, ls in enumerate(labels) if tier in ls]
        k_of[tier] = setup.method.eval_view(chunk[members[0]][0], global_state, tier)
        with setup.adapter.route(k_of[tier]):
            records = _predict(setup, [ex for i in members for ex in chunk[i][1]])
        start = 0
        for i in members:
            scored[i][tier] = records[start : start + len(chunk[i][1])]
            start += len(chunk[i][1])
    # each client's tiers in its own label order, as evaluate_client writes them
    return [_result(rt, k_of, {t: scored[i][t] for t in labels[i]}, tiers) for i, (rt, _) in enumerate(chunk)]


def headline(scores: dict) -> dict:
    """The metrics of a scores dict (rouge_l, exact_match, and accuracy where present)."""
    return {m: scores[m] for m in METRICS if m in scores}


def _means(items: list[dict]) -> dict:
    out = {}
    for m in METRICS:
        values = [s[m] for s in items if m in s]
        if values:
            out[m] = float(fmean(values))
    return out


def summarise(per_client: dict) -> dict:
    """Client means -> overall means (over clients) and per tier.

    Per tier: the clients of that tier at their own tier, or, when the clients carry
    `by_tier` (eval.tiers = all), every client scored at that tier.
    """
    groups = defaultdict(list)
    for m in per_client.values():
        if "by_tier" in m:
            for t, s in m["by_tier"].items():
                groups[int(t)].append(s)
        else:
            groups[m["tier"]].append(m)
    per_tier = {str(t): {**_means(ms), "clients": len(ms)} for t, ms in sorted(groups.items(), reverse=True)}
    return {**_means(list(per_client.values())), "per_client": per_client, "per_tier": per_tier}


def write_predictions(run_dir: str | Path, records: list[dict]) -> Path:
    """RUN_DIR/predictions.jsonl, one record per line, written atomically."""
    path = Path(run_dir) / PREDICTIONS
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_predictions(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / PREDICTIONS
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def compute_summary(rounds: list[dict], flops: dict[str, float] | None = None) -> dict:
    """summary.json's `compute` from the per-round `compute` entries of metrics.jsonl:
    per tier, the median over client-rounds of the mean optimizer-step seconds, those
    per-client-round samples, the total steps, and `flops` (tier -> estimated training
    FLOPs per token, fedmole.compute) as `flops_per_token`."""
    samples, steps = defaultdict(list), defaultdict(int)
    for row in rounds:
        for c in row.get("compute", []):
            samples[int(c["tier"])].append(float(c["step_seconds"]))
            steps[int(c["tier"])] += int(c["steps"])
    flops = flops or {}
    tiers = sorted(set(samples) | {int(t) for t in flops}, reverse=True)
    per_tier = {}
    for t in tiers:
        entry = {"step_seconds": median(samples[t]), "samples": samples[t], "steps": steps[t]} if samples[t] else {}
        if str(t) in flops:
            entry["flops_per_token"] = flops[str(t)]
        per_tier[str(t)] = entry
    return {"per_tier": per_tier}
