"""Tables and plots of a method comparison (see fedmole/compare.py).

Reads each run directory's `summary.json` and `metrics.jsonl` and writes
`comparison.json`, `comparison.md`, `plot_per_round.png` (ROUGE-L and train
loss per round, mean over seeds, one line per method) and `plot_per_tier.png`
(final ROUGE-L and exact match per tier, mean and std over seeds).
Spreads are sample standard deviations over seeds (n - 1 in the denominator).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedmole.reporting.report import format_bytes, read_metrics

ROUND_PLOT = "plot_per_round.png"
TIER_PLOT = "plot_per_tier.png"
REFERENCES = ("local", "centralized")  # their traffic is not a federated cost


def mean_std(values: list[float]) -> dict:
    """{'mean', 'std', 'n'}; std is the sample std (None for fewer than two values)."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None,
            "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def _fmt(ms: dict | None, fmt=lambda x: f"{x:.2f}") -> str:
    if not ms or ms.get("mean") is None:
        return "–"
    return fmt(ms["mean"]) if ms["std"] is None else f"{fmt(ms['mean'])} ± {fmt(ms['std'])}"


def collect(runs: list[tuple[str, int, Path]], failures: dict[str, str]) -> list[dict]:
    """One record per (method, seed): status and the figures of its summary."""
    records = []
    for method, seed, run_dir in runs:
        rec = {"method": method, "seed": seed, "dir": run_dir.name}
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            rec.update(status="failed" if run_dir.name in failures else "missing",
                       error=failures.get(run_dir.name))
            records.append(rec)
            continue
        s = json.loads(summary_path.read_text())
        rounds = read_metrics(run_dir / "metrics.jsonl")
        trained = [r for r in rounds if r.get("round", 0) > 0]
        rec.update(
            status="done",
            protocol=s.get("protocol", "global"),
            metrics=s["metrics"],
            per_tier={t: {"rouge_l": v["rouge_l"], "exact_match": v["exact_match"], "clients": v["clients"]}
                      for t, v in s["per_tier"].items()},
            clients={name: [c["tier"], c["n"]] for name, c in s["per_client"].items()},
            comm_per_round={"up": s["comm_bytes"]["up"] / max(1, len(trained)),
                            "down": s["comm_bytes"]["down"] / max(1, len(trained))},
            wall_seconds=s["wall_seconds"],
            rounds=[{k: r[k] for k in ("round", "rouge_l", "exact_match", "train_loss") if k in r} for r in rounds],
        )
        records.append(rec)
    return records


def fairness(records: list[dict]) -> list[str]:
    """Problems with the comparison's premise: per seed, every method must see the same clients,
    tiers and test-set sizes."""
    issues = []
    by_seed = defaultdict(list)
    for r in records:
        if r["status"] == "done":
            by_seed[r["seed"]].append(r)
    for seed, recs in sorted(by_seed.items()):
        ref = recs[0]
        for r in recs[1:]:
            if r["clients"] != ref["clients"]:
                issues.append(f"seed {seed}: {r['method']} saw other clients/tiers/test sizes than {ref['method']}")
    return issues


def table(records: list[dict]) -> dict:
    """Per method: mean/std over seeds of the final scores (overall and per tier), traffic, wall time."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in records):
        done = [r for r in records if r["method"] == method and r["status"] == "done"]
        tiers = dict.fromkeys(t for r in done for t in r["per_tier"])
        out[method] = {
            "seeds": [r["seed"] for r in done],
            "protocol": "/".join(sorted({r["protocol"] for r in done})),
            "rouge_l": mean_std([r["metrics"]["rouge_l"] for r in done]),
            "exact_match": mean_std([r["metrics"]["exact_match"] for r in done]),
            "per_tier": {t: {m: mean_std([r["per_tier"][t][m] for r in done if t in r["per_tier"]])
                             for m in ("rouge_l", "exact_match")} for t in tiers},
            "comm_up_per_round": mean_std([r["comm_per_round"]["up"] for r in done]),
            "comm_down_per_round": mean_std([r["comm_per_round"]["down"] for r in done]),
            "wall_seconds": mean_std([r["wall_seconds"] for r in done]),
        }
    return out


def markdown(result: dict) -> str:
    rows_in = result["table"]
    tiers = sorted({t for v in rows_in.values() for t in v["per_tier"]}, key=lambda t: -int(t))
    header = ["method", "protocol", "seeds", "ROUGE-L", "EM"]
    for t in tiers:
        header += [f"ROUGE-L k={t}", f"EM k={t}"]
    header += ["up / round", "down / round", "wall time"]
    rows = []
    for method, v in rows_in.items():
        ref = " †" if method in REFERENCES else ""
        row = [f"{method}{ref}", v.get("protocol") or "–", str(len(v["seeds"])), _fmt(v["rouge_l"]),
               _fmt(v["exact_match"])]
        for t in tiers:
            pt = v["per_tier"].get(t, {})
            row += [_fmt(pt.get("rouge_l")), _fmt(pt.get("exact_match"))]
        row += [_fmt(v["comm_up_per_round"], format_bytes), _fmt(v["comm_down_per_round"], format_bytes),
                _fmt(v["wall_seconds"], lambda s: f"{s:.0f} s")]
        rows.append(row)
    meta = result["meta"]
    lines = ["# fedmole comparison", ""]
    lines += [f"- config: `{meta.get('config')}`" + (f", overrides: `{' '.join(meta['overrides'])}`"
                                                     if meta.get("overrides") else "")]
    lines += [f"- methods: {', '.join(result['methods'])}; seeds: {', '.join(map(str, result['seeds']))}", ""]
    lines += ["Final scores after the last round, mean ± sample std over seeds; k = experts per token of the "
              "tier (rank adapter.rank × k for the LoRA baselines). Protocol: global (the aggregated model) or "
              "personalized (each client's model after its last local training); compare like with like. "
              "Traffic is per round, summed over clients.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "† reference, not a federated method: local sends the initial adapter once and uploads nothing; "
              "centralized carries its pooled model in one instruction per round.", ""]
    bad = [r for r in result["runs"] if r["status"] != "done"]
    if bad:
        lines += ["## Runs without results", ""]
        lines += [f"- {r['dir']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in bad]
        lines.append("")
    if result["fairness"]:
        lines += ["## Fairness check failed", ""] + [f"- {x}" for x in result["fairness"]] + [""]
    if result["plots"]:
        lines += ["## Plots", ""] + [f"![{name}]({name})" for name in result["plots"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def _figure(width: float, height: float, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols)


def plot_per_round(records: list[dict], path: Path) -> bool:
    """ROUGE-L (where evaluated) and train loss per round, mean over seeds, one line per method."""
    done = [r for r in records if r["status"] == "done"]
    if not done:
        return False
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(11, 4, 2)
    for ax, key, label in zip(axes, ("rouge_l", "train_loss"), ("ROUGE-L", "train loss")):
        for method in dict.fromkeys(r["method"] for r in done):
            per_round = defaultdict(list)
            for r in done:
                if r["method"] == method:
                    for row in r["rounds"]:
                        if isinstance(row.get(key), (int, float)) and math.isfinite(row[key]):
                            per_round[row["round"]].append(row[key])
            if per_round:
                xs = sorted(per_round)
                ax.plot(xs, [np.mean(per_round[x]) for x in xs], marker="o", label=method)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"{label} per round (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def plot_per_tier(result: dict, path: Path) -> bool:
    """Grouped bars: final ROUGE-L and exact match per tier (and overall), mean ± std over seeds."""
    rows = {m: v for m, v in result["table"].items() if v["seeds"]}
    if not rows:
        return False
    tiers = sorted({t for v in rows.values() for t in v["per_tier"]}, key=lambda t: -int(t))
    groups = [f"k={t}" for t in tiers] + ["all"]
    fig, axes = _figure(max(9, 1.6 * len(groups) * 2 + 1.5), 4, 2)
    width = 0.8 / len(rows)
    x = np.arange(len(groups))
    for ax, key, label in zip(axes, ("rouge_l", "exact_match"), ("ROUGE-L", "exact match")):
        for i, (method, v) in enumerate(rows.items()):
            cells = [v["per_tier"].get(t, {}).get(key) or {} for t in tiers] + [v[key]]
            means = [c.get("mean") if c.get("mean") is not None else np.nan for c in cells]
            errs = [c.get("std") or 0.0 for c in cells]
            ax.bar(x + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errs, capsize=2, label=method)
        ax.set_xticks(x, groups)
        ax.set_ylabel(label)
        ax.set_title(f"final {label} per tier")
        ax.grid(alpha=0.3, axis="y")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def write_comparison(root: Path, runs: list[tuple[str, int, Path]], failures: dict[str, str], meta: dict) -> dict:
    """Write comparison.json, comparison.md and the plots into `root`; return the JSON content."""
    records = collect(runs, failures)
    result = {
        "meta": meta,
        "methods": list(dict.fromkeys(m for m, _, _ in runs)),
        "seeds": list(dict.fromkeys(s for _, s, _ in runs)),
        "runs": records,
        "table": table(records),
        "fairness": fairness(records),
        "plots": [],
    }
    if plot_per_round(records, root / ROUND_PLOT):
        result["plots"].append(ROUND_PLOT)
    if plot_per_tier(result, root / TIER_PLOT):
        result["plots"].append(TIER_PLOT)
    (root / "comparison.json").write_text(json.dumps(result, indent=2))
    (root / "comparison.md").write_text(markdown(result))
    return result
