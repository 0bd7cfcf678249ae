"""study.md: the claims with their verdicts, the arms with 95% intervals, measured
compute, paired differences, the tier x client matrix, learning rates and budget."""

from __future__ import annotations

from pathlib import Path

from fedmole.reporting.report import format_bytes

HOW = ("Intervals are 95% percentile intervals of a bootstrap over test examples, stratified by (seed, client) "
       "and pooled over seeds; differences are paired by (seed, client, example id, tier). A claim \"A > B\" is "
       "**supported** when the paired interval of A − B lies above 0, **refuted** when it lies below 0, and "
       "**inconclusive** otherwise; a compute claim \"… <= R x …\" is supported when the whole interval of the "
       "ratio of median step times is at most R, refuted when all of it exceeds R (\">=\" mirrors it). "
       "\"overall\" scores each client at its own tier; \"k=K\" scores every example evaluated with K experts "
       "(every client under `eval.tiers = all`, else the clients of that tier; a method without tiers, FedAMoLE, "
       "has no k columns). \"protocol\" is what was scored: the global model, or each client's own model after "
       "its last local training (personalized); compare arms under the same protocol. The intervals reflect the "
       "sampling of test examples given these runs; the spread between seeds shows in the per-seed means of "
       "study.json.")


def _num(x: float | None, unit: str = "") -> str:
    return "–" if x is None else f"{x:.2f}{unit}"


def _cell(c: dict | None, scale: float = 1.0, unit: str = "", key: str = "mean") -> str:
    if not c or c.get(key) is None:
        return "–"
    lo, hi = c["ci95"]
    return f"{c[key] * scale:.2f}{unit} [{lo * scale:.2f}, {hi * scale:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows), ""]


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def markdown(result: dict) -> str:
    st = result["study"]
    tiers = [str(t) for t in result["tiers"]]
    arms = list(st["arms"])
    lines = [f"# fedmole study: {Path(st['file']).name if st.get('file') else 'comparison'}", ""]
    if st.get("command"):
        lines += [f"Command: `{st['command']}`", ""]
    lines += [f"- study file: `{st.get('file')}`", f"- base config: `{st.get('config')}`",
              f"- seeds: {', '.join(map(str, st['seeds']))}" + (f"; shared overrides: `{' '.join(st['set'])}`"
                                                              if st.get("set") else ""),
              "- arms: " + "; ".join(f"**{a}** = `{v['method']}`" + (f" `{' '.join(v['set'])}`" if v["set"] else "")
                                    + (f" ({v['protocol']})" if v.get("protocol") else "")
                                    for a, v in st["arms"].items()),
              f"- bootstrap: {st['bootstrap']} replicates", ""]

    if result["claims"]:
        rows = []
        for c in result["claims"]:
            fmt = "{:.3f}" if c["kind"] == "compute" else "{:+.2f}"  # a ratio, or a difference in points
            est = "–" if c["diff"] is None else fmt.format(c["diff"]) + ("×" if c["kind"] == "compute" else "")
            ci = "–" if c["ci95"] is None else f"[{fmt.format(c['ci95'][0])}, {fmt.format(c['ci95'][1])}]"
            rows.append([c["text"], f"**{c['verdict']}**", c["estimate"], est, ci, str(c["n"])])
        lines += ["## Claims", "", *_table(["claim", "verdict", "estimate of", "value", "95% CI", "n"], rows)]
    lines += [HOW, ""]

    lr = result["learning_rates"]
    for m in st["metrics"]:
        rows = []
        for a in arms:
            cell = result["arms"][a].get(m) or {}
            if not cell.get("n"):
                continue
            rows.append([a, st["arms"][a]["method"], st["arms"][a].get("protocol") or "–",
                         f"{lr.get(a, {}).get('lr', float('nan')):g}", _cell(cell), str(cell["n"]),
                         *(_cell(cell.get("per_tier", {}).get(t)) for t in tiers)])
        if rows:
            lines += [f"## {m}", "", *_table(["arm", "method", "protocol", "lr", "overall", "n",
                                              *(f"k={t}" for t in tiers)], rows)]

    comp = result["compute"]
    if any(comp.values()):
        top = max((c["step_seconds"] for v in comp.values() for c in v.values() if c.get("step_seconds")), default=0)
        scale, unit = (1.0, " s") if top >= 1 else (1000.0, " ms")
        ks = [str(t) for t in sorted({int(t) for v in comp.values() for t in v}, reverse=True)]
        rows = [[a, *(_cell(comp[a].get(t), scale, unit, key="step_seconds") for t in ks)] for a in arms]
        lines += ["## Measured compute", "", "Median wall time of one optimizer step over client-rounds (pooled over "
                  "seeds), with a bootstrap 95% interval, by the clients' tier.", "",
                  *_table(["arm", *(f"k={t}" for t in ks)], rows)]

    primary = st["metrics"][0]
    pairs = [p for p in result["paired"] if p["metric"] == primary]
    if pairs:
        by_pair: dict[tuple, dict] = {}
        for p in pairs:
            by_pair.setdefault((p["a"], p["b"]), {})["all" if p["tier"] is None else str(p["tier"])] = p
        rows = [[f"{a} − {b}", *(_diff(cells.get(t)) for t in ("all", *tiers))] for (a, b), cells in by_pair.items()]
        lines += [f"## Paired differences ({primary})", "",
                  *_table(["A − B", "overall", *(f"k={t}" for t in tiers)], rows)]

    matrix = {a: m for a, m in result["matrix"].items() if any(len(v) > 1 for v in m.values())}
    if matrix:
        lines += [f"## Tier x client ({primary}, mean over seeds)", ""]
        for a, m in matrix.items():
            rows = [[name, *(_num(m[name].get(t)) for t in tiers)] for name in sorted(m)]
            lines += [f"{a}:", "", *_table(["client", *(f"k={t}" for t in tiers)], rows)]

    rows = []
    for a in arms:
        info = lr.get(a, {})
        how = info.get("source", "–")
        if info.get("scores"):
            how += f" on {info['metric']} ({info['split']} split, seed {info['seed']}): " + ", ".join(
                f"{k}: {v:.2f}" for k, v in info["scores"].items())
        rows.append([a, f"{info.get('lr', float('nan')):g}", how])
    lines += ["## Learning rates", "", *_table(["arm", "lr", "how it was set"], rows)]

    b = result["budget"]
    rows = []
    for a in arms:
        x = b["arms"][a]
        seeds = x["test_examples"]
        overall = ", ".join(str(v["overall"]) for v in seeds.values()) or "–"
        per_tier = "; ".join(f"k={t}: {n}" for t, n in next(iter(seeds.values()), {}).get("per_tier", {}).items())
        comm = x.get("comm_bytes_per_round") or {}
        traffic = " / ".join(format_bytes(comm[d]) if comm.get(d) is not None else "–" for d in ("up", "down"))
        rows.append([a, str(x.get("run.rounds")), str(x.get("train.local_steps")), str(x.get("train.batch_size")),
                     str(x.get("data.max_len")), overall, per_tier or "–", traffic, _seconds(x["wall_seconds"]),
                     ", ".join(x["precision"]) or "–", ", ".join(map(str, x.get("threads") or [])) or "–"])
    lines += ["## Budget", "", *_table(["arm", "rounds", "local steps", "batch", "max_len",
                                        "test examples per seed (own tier)", "per tier (first seed)",
                                        "traffic up / down per round", "wall time (runs)", "precision",
                                        "threads"], rows)]
    m = b["machine"]
    lines += [f"Runs took {_seconds(b['wall_seconds'])} in all (the sum of their wall times; runs made side "
              f"by side overlap) on {m['processor']} ({m['cpus']} CPUs, torch {m['torch']}), {m['platform']}. "
              "Threads: each run's torch threads (– where its summary predates the record).", ""]

    if result["warnings"]:
        lines += ["## Warnings", "", *(f"- {w}" for w in result["warnings"]), ""]
    bad = [r for r in result["runs"] if r["status"] != "done"]
    if bad:
        lines += ["## Runs without results", "",
                  *(f"- {r['dir']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in bad), ""]
    if result["plots"]:
        lines += ["## Plots", "", *(f"![{name}]({name})" for name in result["plots"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def _diff(p: dict | None) -> str:
    if not p:
        return "–"
    lo, hi = p["ci95"]
    mark = " ▲" if lo > 0 else " ▼" if hi < 0 else ""
    return f"{p['diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]{mark}"
