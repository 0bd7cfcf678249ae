"""Markdown report and plots for one run directory.

Reads `metrics.jsonl` (one record per round) and `summary.json`, writes
`report.md` (summary, per tier, per client, the tier x client matrix of a
cross-tier evaluation, compute per tier, per round, cost), `plot_metric.png`
(ROUGE-L at the evaluated rounds, train loss at every round) and, when the
summary has expert usage, `plot_expert_usage.png`. Every field beyond the
round number is optional: a run that stopped early, or a method without
experts, still gets a report.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRIC_PLOT = "plot_metric.png"
USAGE_PLOT = "plot_expert_usage.png"

# Per-round columns shown first, in this order; other scalar fields follow.
_ROUND_COLUMNS = ("round", "train_loss", "rouge_l", "exact_match", "accuracy", "comm_bytes_up", "comm_bytes_down",
                  "seconds")
_BYTE_FIELDS = {"comm_bytes_up", "comm_bytes_down"}
_SCORE_FIELDS = {"rouge_l", "exact_match", "accuracy"}  # 0-100 scores, always two decimals


def format_bytes(n: float) -> str:
    """Human-readable byte count in binary units: 512 B, 1.50 KiB, 3.00 MiB, ..."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024:
            break
    return f"{value:.2f} {unit}"


def _format_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d} ({s:.0f} s)"


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool))


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if key in _BYTE_FIELDS:
            return format_bytes(v)
        if key in _SCORE_FIELDS and math.isfinite(v):
            return f"{v:.2f}"
        if isinstance(v, float) and math.isfinite(v):
            return f"{v:.1f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v).replace("|", "\\|")  # a pipe would split the Markdown cell


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sort_key(name: Any) -> tuple:
    # Tiers and client names are often numbers or end in one ("client_10").
    text = str(name)
    digits = "".join(ch for ch in text if ch.isdigit())
    return (text.rstrip("0123456789"), int(digits) if digits else -1, text)


def read_metrics(path: Path) -> list[dict]:
    """Round records from a JSONL file; unreadable lines (a run killed mid-write) are skipped."""
    if not path.exists():
        return []
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d is not valid JSON; skipped", path, lineno)
    return rows


def _summary_section(summary: dict) -> list[str]:
    after = summary.get("metrics") or {}
    before = summary.get("baseline_metrics") or {}
    numeric = {k for d in (before, after) for k, v in d.items() if isinstance(v, (int, float))}
    keys = [k for k in ("rouge_l", "exact_match") if k in numeric] + sorted(numeric - {"rouge_l", "exact_match"})
    if not keys:
        return []
    rows = []
    for k in keys:
        b, a = before.get(k), after.get(k)
        delta = f"{a - b:+.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else "–"
        rows.append([k, _cell(k, b), _cell(k, a), delta])
    return ["## Summary", "", *_table(["metric", "before training", "after training", "change"], rows), ""]


def _data_section(data: dict) -> list[str]:
    if not data or not data.get("clients"):
        return []
    lines = ["## Data", "",
             f"Source `{data.get('source')}`, {data.get('partition')} partition: {data.get('rows_loaded')} rows "
             f"loaded, {data.get('rows_assigned')} assigned to a client, {data.get('rows_used')} used.", ""]
    rows = []
    for c in data["clients"]:
        mix = ", ".join(f"{name} {n}" for name, n in (c.get("categories") or {}).items())
        rows.append([_cell("", c.get("client_id")), _cell("", c.get("name")), _cell("", c.get("tier")),
                     *(_cell("", c.get(k)) for k in ("train", "val", "test", "aux")), _cell("", mix)])
    lines += _table(["id", "client", "tier", "train", "val", "test", "aux", "categories"], rows)
    return lines + [""]


def _rounds_section(rounds: list[dict]) -> list[str]:
    if not rounds:
        return []
    present = {k for r in rounds for k, v in r.items() if _is_scalar(v)}
    columns = [c for c in _ROUND_COLUMNS if c in present]
    columns += sorted(present - set(columns))
    rows = [[_cell(c, r.get(c)) for c in columns] for r in rounds]
    return ["## Per round", "", *_table(columns, rows), ""]


def _tier_section(per_tier: dict) -> list[str]:
    if not per_tier:
        return []
    metrics = ["rouge_l", "exact_match"] + (["accuracy"] if any("accuracy" in (v or {}) for v in per_tier.values())
                                            else [])
    rows = []
    for tier in per_tier:  # the summary's order (the engine lists larger k first)
        info = per_tier[tier] or {}
        clients = info.get("clients")
        clients = len(clients) if isinstance(clients, (list, tuple)) else clients
        rows.append([_cell("tier", tier), _cell("clients", clients), *(_cell(m, info.get(m)) for m in metrics)])
    return ["## Per tier", "", *_table(["tier", "clients", *metrics], rows), ""]


def _matrix_section(per_client: dict) -> list[str]:
    """Tier x client tables (eval.tiers = all): each client's score at every tier's k; * marks its own."""
    clients = [n for n in sorted(per_client, key=_sort_key) if isinstance((per_client[n] or {}).get("by_tier"), dict)]
    if not clients:
        return []
    tiers = sorted({t for n in clients for t in per_client[n]["by_tier"]}, key=lambda t: -int(t))
    lines = ["## Tier x client", "",
             "Every client's test set scored with every tier's k (`eval.tiers = all`); * marks the client's own tier.",
             ""]
    for metric in ("rouge_l", "accuracy"):
        if not any(metric in s for n in clients for s in per_client[n]["by_tier"].values()):
            continue
        rows = []
        for n in clients:
            info = per_client[n]
            row = [f"{n} (k={info.get('tier')})"]
            for t in tiers:
                cell = _cell(metric, (info["by_tier"].get(t) or {}).get(metric))
                row.append(cell + (" *" if str(info.get("tier")) == t else ""))
            rows.append(row)
        lines += [f"{metric}:", "", *_table(["client", *(f"k={t}" for t in tiers)], rows), ""]
    return lines


def _compute_section(compute: dict) -> list[str]:
    per_tier = (compute or {}).get("per_tier") or {}
    if not per_tier:
        return []
    rows = []
    top = next(iter(per_tier.values()), {})  # the engine lists the largest tier first
    for tier, info in per_tier.items():
        samples = info.get("samples") or []
        step = info.get("step_seconds")
        flops = info.get("flops_per_token")
        rows.append([
            _cell("tier", tier),
            "–" if step is None else (f"{step:.2f} s" if step >= 1 else f"{step * 1000:.1f} ms"),
            "–" if step is None or not top.get("step_seconds") else f"{step / top['step_seconds']:.2f}",
            "–" if flops is None else f"{flops / 1e6:.0f}",
            "–" if flops is None or not top.get("flops_per_token") else f"{flops / top['flops_per_token']:.2f}",
            str(len(samples)), _cell("steps", info.get("steps"))])
    return ["## Compute per tier", "",
            "Measured wall time of one optimizer step (forward, backward, update) at each tier's k, the median over "
            "client-rounds of each client-round's mean, and the estimated training FLOPs per token of that tier "
            "(`fedmole.compute`: matmuls, the vocabulary head left out), each also as a ratio to the top tier.", "",
            *_table(["tier", "step time (median)", "vs top", "MFLOP / token", "vs top", "client-rounds", "steps"],
                    rows), ""]


def _client_section(per_client: dict) -> list[str]:
    if not per_client:
        return []
    first = ["tier", "rouge_l", "exact_match", "accuracy"]
    present = {k for info in per_client.values() for k, v in (info or {}).items() if _is_scalar(v)}
    columns = [c for c in first if c in present] + sorted(present - set(first) - {"state_sha256"})
    rows = [[_cell("client", name)] + [_cell(c, (per_client[name] or {}).get(c)) for c in columns]
            for name in sorted(per_client, key=_sort_key)]
    if "state_sha256" in present:  # personalised runs: each client's own model (RUN_DIR/clients/)
        columns.append("model sha256")
        for row, name in zip(rows, sorted(per_client, key=_sort_key)):
            row.append(f"`{str((per_client[name] or {}).get('state_sha256', ''))[:12]}`")
    return ["## Per client", "", *_table(["client", *columns], rows), ""]


def _weight_share_section(rounds: list[dict]) -> list[str]:
    """FLAME: each tier's share of the expert aggregation weight, per round."""
    rows = [r for r in rounds if isinstance(r.get("expert_weight_share"), dict) and r["expert_weight_share"]]
    if not rows:
        return []
    tiers = sorted({t for r in rows for t in r["expert_weight_share"]}, key=lambda t: -int(t))
    table = [[str(r.get("round", "–"))] + [f"{100 * r['expert_weight_share'][t]:.1f}%"
                                          if t in r["expert_weight_share"] else "–" for t in tiers] for r in rows]
    return ["## Expert aggregation weight by tier", "",
            "Each tier's share of an expert's activation-aware aggregation weight, averaged over the "
            "experts its round's clients used.", "", *_table(["round", *[f"k={t}" for t in tiers]], table), ""]


def _cost_section(summary: dict, rounds: list[dict]) -> list[str]:
    lines = []
    comm = summary.get("comm_bytes") or {}
    up, down = comm.get("up"), comm.get("down")
    if up is None and down is None and rounds:
        # Older or partial runs: fall back to the per-round counters.
        ups = [r["comm_bytes_up"] for r in rounds if isinstance(r.get("comm_bytes_up"), (int, float))]
        downs = [r["comm_bytes_down"] for r in rounds if isinstance(r.get("comm_bytes_down"), (int, float))]
        up, down = (sum(ups) if ups else None), (sum(downs) if downs else None)
    if up is not None or down is not None:
        total = (up or 0) + (down or 0)
        lines += ["## Communication", ""]
        lines += _table(
            ["direction", "bytes", "size"],
            [["up (clients → server)", _cell("", up), format_bytes(up) if up is not None else "–"],
             ["down (server → clients)", _cell("", down), format_bytes(down) if down is not None else "–"],
             ["total", str(total), format_bytes(total)]],
        )
        lines.append("")
    wall = summary.get("wall_seconds")
    if wall is None and rounds:
        secs = [r["seconds"] for r in rounds if isinstance(r.get("seconds"), (int, float))]
        wall = sum(secs) if secs else None
    if wall is not None:
        lines += ["## Wall time", "", f"{_format_seconds(wall)} in total.", ""]
    return lines


def _plot_metrics(rounds: list[dict], path: Path) -> bool:
    series = {
        key: [(r["round"], r[key]) for r in rounds if isinstance(r.get(key), (int, float)) and "round" in r]
        for key in ("rouge_l", "train_loss")
    }
    if not any(series.values()):
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # A bare Figure on the Agg canvas: no pyplot global state, no display needed.
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    every = [r["round"] for r in rounds if isinstance(r.get("round"), int)]
    for ax, (key, label) in zip(fig.subplots(1, 2), (("rouge_l", "ROUGE-L"), ("train_loss", "train loss"))):
        ax.set_xlim(min(every) - 0.5, max(every) + 0.5)  # the same rounds on both panels; ROUGE-L where evaluated
        points = series[key]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o")
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.set_title(f"{label} per round")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def _client_label(name: str, tier: int | None, limit: int = 44) -> str:
    """`name (k=tier)`, a long name cut in the middle so the heatmap keeps its width."""
    short = name if len(name) <= limit else name[: limit - 13] + "…" + name[-12:]
    return f"{short} (k={tier})" if tier is not None else short


def _usage_panels(usage: dict, names: list[str]) -> tuple[str, list[tuple[str | None, Any]]]:
    """(title, [(panel title, grid (clients, experts))]): one grid for per-client lists (an expert
    is the same slot in every module), the first and last module for per-module dicts (FedAMoLE:
    pool experts, NaN where a client does not hold one)."""
    import numpy as np

    if not all(isinstance(usage[n], dict) for n in names):
        width = max(len(usage[n]) for n in names)
        grid = np.full((len(names), width), np.nan)  # NaN where a client has fewer experts
        for row, name in enumerate(names):
            grid[row, : len(usage[name])] = usage[name]
        return "share of each client's routed tokens per expert (mean over modules)", [(None, grid)]
    modules = list(dict.fromkeys(m for n in names for m in usage[n]))
    panels = []
    for module in dict.fromkeys([modules[0], modules[-1]]):
        width = 1 + max(int(j) for n in names for j in usage[n].get(module, {}))
        grid = np.full((len(names), width), np.nan)
        for row, name in enumerate(names):
            for j, share in usage[name].get(module, {}).items():
                grid[row, int(j)] = share
        panels.append((module, grid))
    return "share of each client's routed tokens per pool expert (blank: not held)", panels


def _plot_expert_usage(usage: dict, per_client: dict, path: Path) -> bool:
    names = [n for n in sorted(usage, key=_sort_key) if usage[n]]
    if not names:
        return False
    import textwrap

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title, panels = _usage_panels(usage, names)
    tiered = panels[0][0] is None  # per-module usage (FedAMoLE) comes from clients without tiers
    labels = [_client_label(n, (per_client.get(n) or {}).get("tier") if tiered else None) for n in names]
    cols = max(grid.shape[1] for _, grid in panels)
    # inches: room for the longest label, cells of a readable size, the colour bar
    label_w = 0.075 * max(len(x) for x in labels) + 0.6
    heat_w = max(3.5, (0.32 if cols <= 32 else 0.2) * cols)
    fig_w = label_w + heat_w + 1.4
    panel_h = 0.32 * len(names) + 1.1
    fig = Figure(figsize=(fig_w, panel_h * len(panels) + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    vmax = max(float(np.nanmax(grid)) for _, grid in panels if not np.isnan(grid).all())
    for ax, (panel, grid) in zip(axes, panels):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_xlabel("pool expert" if panel else "expert")
        if grid.shape[1] <= 32:
            ax.set_xticks(range(grid.shape[1]))
            ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks(range(len(names)), labels, fontsize=9)
        if panel:
            ax.set_title(panel, fontsize=9)
    fig.colorbar(image, ax=list(axes), shrink=0.9)
    fig.suptitle(textwrap.fill(title, width=max(30, int(fig_w / 0.085))), fontsize=11)
    fig.savefig(path, dpi=100)
    return True


def write_report(run_dir: Path) -> Path:
    """Write `report.md` and its plots into `run_dir`; returns the report path."""
    run_dir = Path(run_dir)
    rounds = read_metrics(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}

    method = summary.get("method", "unknown method")
    lines = [f"# fedmole run: {method}", ""]
    for label, key in (("engine", "engine"), ("model", "model"), ("rounds", "rounds"), ("seed", "seed"),
                       ("evaluation protocol", "protocol"), ("autocast", "autocast"),
                       ("final state sha256", "final_state_sha256")):
        if summary.get(key) is not None:
            lines.append(f"- {label}: `{summary[key]}`")
    if rounds and "rounds" not in summary:
        lines.append(f"- rounds recorded: {len(rounds)}")
    lines.append("")

    lines += _summary_section(summary)
    lines += _data_section(summary.get("data") or {})
    lines += _tier_section(summary.get("per_tier") or {})
    lines += _client_section(summary.get("per_client") or {})
    lines += _matrix_section(summary.get("per_client") or {})
    lines += _compute_section(summary.get("compute") or {})
    lines += _rounds_section(rounds)
    lines += _weight_share_section(rounds)
    lines += _cost_section(summary, rounds)

    plots = []
    if _plot_metrics(rounds, run_dir / METRIC_PLOT):
        plots.append(("Metric and training loss per round", METRIC_PLOT))
    per_client = summary.get("per_client") or {}
    if _plot_expert_usage(summary.get("expert_usage") or {}, per_client, run_dir / USAGE_PLOT):
        plots.append(("Expert usage per client", USAGE_PLOT))
    if plots:
        lines += ["## Plots", ""]
        for title, name in plots:
            lines += [f"### {title}", "", f"![{title}]({name})", ""]

    path = run_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
