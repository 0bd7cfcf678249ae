"""The results of a study (fedmole/study.py): study.json, study.md and plots.

Everything is computed from the runs' own files (summary.json,
predictions.jsonl, metrics.jsonl), so a reader holding them can recompute every
figure. Per arm and metric: the mean over test examples with a 95% interval by
a bootstrap stratified by (seed, client), overall (each client at its own tier)
and per tier (every example scored at that tier's k; none for a method whose
clients have no tiers, FedAMoLE). Each arm is evaluated under its run's
protocol (`eval.protocol`: the global model, or each client's own); arms under
different protocols draw a warning, since only like compares with like. Differences between arms
are paired by (seed, client, example id, tier). A claim "A > B on M" is
supported when the paired interval of A - B lies above 0, refuted when it lies
below, inconclusive otherwise; a compute claim "A at tier K1 step_seconds <= R x
B at tier K2" is supported when the whole interval of the ratio of median step
times is <= R, refuted when it is all > R (>= mirrors it).
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from itertools import combinations
from pathlib import Path

import numpy as np

from fedmole.evaluation import stats
from fedmole.reporting.report import read_metrics

_BUDGET_KEYS = (("run", "rounds"), ("train", "local_steps"), ("train", "batch_size"), ("data", "max_len"),
                ("data", "max_answer_tokens"), ("eval", "max_prompt_tokens"), ("eval", "max_new_tokens"),
                ("data", "num_clients"), ("fed", "sample_fraction"), ("eval", "tiers"))


# --------------------------------------------------------------------------- loading


def load_runs(root: Path, specs, failures: dict[str, str]) -> list[dict]:
    """Per run spec: its status and, when finished, its summary, predictions and round records."""
    from fedmole.engine.evaluation import PREDICTIONS, read_predictions

    runs = []
    for spec in specs:
        d = root / "runs" / spec.dir_name
        run = {"arm": spec.arm, "seed": spec.seed, "dir": f"runs/{spec.dir_name}", "cfg": spec.cfg}
        if not (d / "summary.json").exists() or not (d / PREDICTIONS).exists():
            run["status"] = "failed" if spec.dir_name in failures else "missing"
            run["error"] = failures.get(spec.dir_name)
        else:
            run.update(status="done", summary=json.loads((d / "summary.json").read_text()),
                       records=read_predictions(d), rounds=read_metrics(d / "metrics.jsonl"))
        runs.append(run)
    return runs


class Scores:
    """One arm's records as arrays: key (seed, client, example id, tier), stratum, and each metric
    (NaN where a record lacks it)."""

    def __init__(self, runs: list[dict], metrics: list[str]):
        recs = [(run["seed"], r) for run in runs for r in run["records"]]
        self.keys = [(s, r["client"], r["example_id"], r["tier"]) for s, r in recs]
        self.own = np.array([r["tier"] == r["client_tier"] for _, r in recs], dtype=bool)
        self.tier = np.array([r["tier"] for _, r in recs], dtype=int)
        self.values = {m: np.array([r["scores"].get(m, np.nan) for _, r in recs], dtype=np.float64) for m in metrics}

    def select(self, metric: str, tier: int | None) -> dict[tuple, float]:
        """key -> value of `metric` in a slice: own tiers (tier None) or every record at `tier`."""
        mask = (self.own if tier is None else self.tier == tier) & ~np.isnan(self.values[metric])
        return {self.keys[i]: float(self.values[metric][i]) for i in np.flatnonzero(mask)}


class Estimator:
    """Stratified bootstrap means over key sets, one resampling per distinct key set (so the
    same examples get the same replicates whichever arm or pair is estimated)."""

    def __init__(self, replicates: int, seed: int = 0):
        self.replicates, self.seed = replicates, seed
        self._cache: dict[tuple, stats.StratifiedBootstrap] = {}

    def clear(self) -> None:
        self._cache.clear()

    def mean(self, values: dict[tuple, float]) -> dict:
        keys = tuple(sorted(values, key=repr))
        if not keys:
            return {"mean": None, "ci95": None, "n": 0}
        if keys not in self._cache:
            strata = [(k[0], k[1]) for k in keys]  # (seed, client)
            self._cache[keys] = stats.StratifiedBootstrap(strata, self.replicates, stats.stable_seed(self.seed, keys))
        v = np.array([values[k] for k in keys])
        return {"mean": float(v.mean()), "ci95": list(stats.interval(self._cache[keys].means(v))), "n": len(keys)}

    def paired(self, a: dict[tuple, float], b: dict[tuple, float]) -> dict:
        common = set(a) & set(b)
        return self.mean({k: a[k] - b[k] for k in common})


# --------------------------------------------------------------------------- analysis


def tiered(study, arm: str) -> bool:
    """Whether `arm`'s method has tiers (per-tier figures); FedAMoLE's clients differ in data only."""
    from fedmole.algorithms import METHODS

    return METHODS[study.arm(arm).method].tiered


def tiers_of(study, runs: list[dict]) -> list[int]:
    """The tiers scored by the finished runs of the tiered arms, largest first."""
    return sorted({r["tier"] for run in runs if run["status"] == "done" and tiered(study, run["arm"])
                   for r in run["records"]}, reverse=True)


def analyse(study, runs: list[dict]) -> dict:
    """arms, paired differences, claims, compute and per-round curves from the finished runs."""
    done = [r for r in runs if r["status"] == "done"]
    arms = [a.name for a in study.arms]
    scores = {a: Scores([r for r in done if r["arm"] == a], study.metrics) for a in arms}
    tiers = tiers_of(study, done)
    est = Estimator(study.bootstrap)
    out_arms = {a: {} for a in arms}
    paired = []
    for tier in [None, *tiers]:  # slice by slice, so the cached resamplings stay few
        est.clear()
        here = arms if tier is None else [a for a in arms if tiered(study, a)]
        for m in study.metrics:
            sel = {a: scores[a].select(m, tier) for a in here}
            for a in here:
                cell = est.mean(sel[a])
                if tier is None:
                    out_arms[a][m] = {**cell, "per_tier": {}, "per_seed": _per_seed(sel[a])}
                else:
                    out_arms[a].setdefault(m, {"per_tier": {}})["per_tier"][str(tier)] = cell
            for a, b in combinations(here, 2):
                res = est.paired(sel[a], sel[b])
                if res["n"]:
                    paired.append({"a": a, "b": b, "metric": m, "tier": tier, "diff": res["mean"],
                                   "ci95": res["ci95"], "n": res["n"]})
        est.clear()
    compute = _compute(study, done)
    claims = [_claim(c, scores, done, est, study) for c in study.claims]
    return {"arms": out_arms, "paired": paired, "claims": claims, "compute": compute, "tiers": tiers,
            "rounds": _rounds(study, done), "matrix": _matrix(study, done)}


def _per_seed(values: dict[tuple, float]) -> dict[str, float]:
    by_seed = defaultdict(list)
    for k, v in values.items():
        by_seed[k[0]].append(v)
    return {str(s): float(np.mean(v)) for s, v in sorted(by_seed.items())}


def _samples(done: list[dict], arm: str, tier: int) -> list[float]:
    return [x for r in done if r["arm"] == arm
            for x in (r["summary"].get("compute", {}).get("per_tier", {}).get(str(tier), {}).get("samples") or [])]


def _compute(study, done: list[dict]) -> dict:
    """arm -> tier -> median step seconds over client-rounds (pooled over seeds) with its interval."""
    out = {}
    for arm in study.arms:
        tiers = sorted({int(t) for r in done if r["arm"] == arm.name
                        for t in r["summary"].get("compute", {}).get("per_tier", {})}, reverse=True)
        out[arm.name] = {}
        for t in tiers:
            res = stats.median_interval(_samples(done, arm.name, t), study.bootstrap,
                                        stats.stable_seed(0, "median", arm.name, t))
            out[arm.name][str(t)] = {"step_seconds": res["median"], "ci95": res["ci95"], "n": res["n"]}
    return out


def _claim(claim, scores: dict, done: list[dict], est: Estimator, study) -> dict:
    if claim.kind == "metric":
        res = est.paired(scores[claim.a].select(claim.metric, claim.tier),
                         scores[claim.b].select(claim.metric, claim.tier))
        est.clear()
        ci = res["ci95"]
        verdict = stats.verdict_positive(ci if claim.op == ">" or ci is None else [-ci[1], -ci[0]])
        return {"text": claim.text, "kind": "metric", "verdict": verdict, "diff": res["mean"], "ci95": ci,
                "n": res["n"], "metric": claim.metric, "tier": claim.tier,
                "estimate": f"{claim.a} − {claim.b} on {claim.metric}"
                            + (f" at k={claim.tier}" if claim.tier is not None else " (own tiers)")}
    res = stats.ratio_of_medians(_samples(done, claim.a, claim.tier_a), _samples(done, claim.b, claim.tier_b),
                                 study.bootstrap, stats.stable_seed(0, "ratio", claim.text))
    return {"text": claim.text, "kind": "compute", "verdict": stats.verdict_bound(res["ci95"], claim.op, claim.ratio),
            "diff": res["ratio"], "ci95": res["ci95"], "n": res["n"], "bound": claim.ratio,
            "estimate": f"median step s of {claim.a} at k={claim.tier_a} / {claim.b} at k={claim.tier_b}"}


def _rounds(study, done: list[dict]) -> dict:
    """arm -> metric -> {round: mean over seeds}, evaluated rounds only (rows that carry the metric)."""
    out = {}
    for arm in study.arms:
        per = defaultdict(lambda: defaultdict(list))
        for r in done:
            if r["arm"] == arm.name:
                for row in r["rounds"]:
                    for m in (*study.metrics, "train_loss"):
                        if isinstance(row.get(m), (int, float)):
                            per[m][row["round"]].append(row[m])
        out[arm.name] = {m: {str(k): float(np.mean(v)) for k, v in sorted(rs.items())} for m, rs in per.items()}
    return out


def _matrix(study, done: list[dict]) -> dict:
    """arm -> client name -> tier -> mean of the primary metric over seeds (and examples)."""
    m = study.metrics[0]
    out = {}
    for arm in study.arms:
        cells = defaultdict(list)
        for r in done:
            if r["arm"] == arm.name:
                for rec in r["records"]:
                    if m in rec["scores"]:
                        cells[rec["client_name"], rec["tier"]].append(rec["scores"][m])
        table = defaultdict(dict)
        for (name, tier), v in sorted(cells.items()):
            table[name][str(tier)] = float(np.mean(v))
        out[arm.name] = dict(table)
    return out


# --------------------------------------------------------------------------- budget and fairness


def budget(study, runs: list[dict], rates: dict, sizes: dict) -> dict:
    """What every arm ran with: config budget, test examples scored, wall time, machine, precision."""
    import torch

    from fedmole.config import eval_protocol

    done = [r for r in runs if r["status"] == "done"]
    per_arm = {}
    for arm in study.arms:
        mine = [r for r in done if r["arm"] == arm.name]
        cfg = next((r["cfg"] for r in runs if r["arm"] == arm.name), None)
        tested = {}
        for r in mine:
            own = sum(1 for x in r["records"] if x["tier"] == x["client_tier"])
            per_tier = defaultdict(int)
            for x in r["records"] if tiered(study, arm.name) else []:
                per_tier[str(x["tier"])] += 1
            by_tier = dict(sorted(per_tier.items(), key=lambda x: -int(x[0])))
            tested[str(r["seed"])] = {"overall": own, "per_tier": by_tier}
        per_arm[arm.name] = {
            **({f"{s}.{k}": getattr(getattr(cfg, s), k) for s, k in _BUDGET_KEYS} if cfg else {}),
            "protocol": eval_protocol(cfg) if cfg else None,
            "lr": rates.get(arm.name, {}).get("lr"),
            "test_examples": tested,
            "test_examples_planned": sizes.get(arm.name),
            "wall_seconds": round(sum(r["summary"].get("wall_seconds", 0.0) for r in mine), 1),
            "comm_bytes_per_round": {d: float(np.mean([r["summary"]["comm_bytes"][d] / r["summary"]["rounds"]
                                                       for r in mine])) if mine else None for d in ("up", "down")},
            "precision": sorted({r["summary"].get("autocast", "off") for r in mine}),
            "threads": sorted({r["summary"]["threads"] for r in mine if "threads" in r["summary"]}),
        }
    return {"arms": per_arm, "wall_seconds": round(sum(a["wall_seconds"] for a in per_arm.values()), 1),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}}


def fairness(study, runs: list[dict], budget_: dict) -> list[str]:
    """Problems with the premise: arms must share the budget and, per seed, score the same test examples."""
    issues = []
    first = study.arms[0].name
    protocols = defaultdict(list)
    for arm in study.arms:
        protocols[budget_["arms"][arm.name].get("protocol")].append(arm.name)
    if len(protocols) > 1:
        issues.append("arms are evaluated under different protocols (" + "; ".join(
            f"{p}: {', '.join(names)}" for p, names in protocols.items()) + "): compare like with like")
    for arm in study.arms[1:]:
        diff = [f"{s}.{k}" for s, k in _BUDGET_KEYS
                if budget_["arms"][arm.name].get(f"{s}.{k}") != budget_["arms"][first].get(f"{s}.{k}")]
        if diff:
            issues.append(f"arm {arm.name} differs from {first} in {', '.join(diff)}")
    seen = defaultdict(dict)
    for r in runs:
        if r["status"] == "done":
            seen[r["seed"]][r["arm"]] = sorted({(x["client"], x["client_tier"], x["example_id"]) for x in r["records"]})
    for seed, by_arm in sorted(seen.items()):
        ref_arm, ref = next(iter(by_arm.items()))
        for arm, got in by_arm.items():
            if got != ref:
                issues.append(f"seed {seed}: arm {arm} scored other clients, tiers or test examples than {ref_arm}")
    return issues


# --------------------------------------------------------------------------- writing


def write_study(root: Path, study, specs, rates: dict, failures: dict, warnings: list[str], sizes: dict,
                meta: dict) -> dict:
    """Write study.json, study.md and the plots into `root`; return study.json's content."""
    from fedmole.reporting.study_markdown import markdown
    from fedmole.reporting.study_plots import write_plots

    runs = load_runs(root, specs, failures)
    result = analyse(study, runs)
    b = budget(study, runs, rates, sizes)
    result = {
        "study": {**meta, "arms": {a.name: {"method": a.method, "set": a.overrides,
                                            "protocol": b["arms"][a.name]["protocol"],
                                            "tiered": tiered(study, a.name)} for a in study.arms},
                  "metrics": study.metrics, "bootstrap": study.bootstrap, "level": stats.LEVEL},
        "arms": result["arms"],
        "paired": result["paired"],
        "claims": result["claims"],
        "compute": result["compute"],
        "learning_rates": rates,
        "budget": b,
        "warnings": warnings + fairness(study, runs, b),
        "runs": [{k: r.get(k) for k in ("arm", "seed", "dir", "status", "error")} for r in runs],
        "tiers": result["tiers"],
        "rounds": result["rounds"],
        "matrix": result["matrix"],
    }
    result["plots"] = write_plots(root, result)
    (root / "study.json").write_text(json.dumps(result, indent=1))
    (root / "study.md").write_text(markdown(result))
    return result
