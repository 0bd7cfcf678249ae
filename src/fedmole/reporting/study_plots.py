"""Plots of a study, every estimate drawn with its 95% interval:

    plot_arms.png      each metric per arm, overall and per tier (when there are several)
    plot_claims.png    each claim's estimate and interval against its threshold
    plot_compute.png   median optimizer-step time per tier and arm
    plot_rounds.png    the primary metric at the evaluated rounds and the train loss, mean over seeds
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, height_ratios=None):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, height_ratios=height_ratios)
    return fig, axes.ravel()


def _bars(ax, groups: list[str], series: dict[str, list[dict | None]], key: str = "mean", scale: float = 1.0):
    """Grouped bars with interval whiskers; a missing cell leaves a gap."""
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (name, cells) in enumerate(series.items()):
        means = np.array([c[key] * scale if c and c.get(key) is not None else np.nan for c in cells])
        lo = np.array([c["ci95"][0] * scale if c and c.get("ci95") else np.nan for c in cells])
        hi = np.array([c["ci95"][1] * scale if c and c.get("ci95") else np.nan for c in cells])
        err = np.nan_to_num(np.vstack([means - lo, hi - means]))
        ax.bar(x + (i - (len(series) - 1) / 2) * width, means, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(x, groups)
    ax.grid(alpha=0.3, axis="y")


def plot_arms(result: dict, path: Path) -> bool:
    st, tiers = result["study"], [str(t) for t in result["tiers"]]
    metrics = [m for m in st["metrics"] if any((result["arms"][a].get(m) or {}).get("n") for a in result["arms"])]
    if not metrics:
        return False
    if len(tiers) == 1:  # one tier: its column would repeat the overall one
        tiers = []
    groups = ["overall", *(f"k={t}" for t in tiers)]
    fig, axes = _figure(max(8.0, 1.2 * len(groups) * max(1, len(result["arms"])) / 2 + 3), 3.2 * len(metrics),
                        rows=len(metrics))
    for ax, m in zip(axes, metrics):
        series = {a: [v.get(m), *((v.get(m) or {}).get("per_tier", {}).get(t) for t in tiers)]
                  for a, v in result["arms"].items()}
        _bars(ax, groups, series)
        ax.set_ylabel(m)
        ax.set_title(f"{m}: mean over test examples with 95% interval")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside upper center", fontsize="small",
               ncols=min(6, len(result["arms"])))
    fig.savefig(path, dpi=100)
    return True


def plot_claims(result: dict, path: Path) -> bool:
    claims = [c for c in result["claims"] if c["ci95"] is not None]
    if not claims:
        return False
    kinds = [k for k in ("metric", "compute") if any(c["kind"] == k for c in claims)]
    counts = [sum(c["kind"] == k for c in claims) + 1 for k in kinds]
    fig, axes = _figure(10, 0.45 * sum(counts) + 1.0 * len(kinds), rows=len(kinds), height_ratios=counts)
    colours = {"supported": "tab:green", "refuted": "tab:red", "inconclusive": "tab:gray"}
    for ax, kind in zip(axes, kinds):
        mine = [c for c in claims if c["kind"] == kind]
        y = np.arange(len(mine))[::-1]
        ax.set_ylim(-0.7, len(mine) - 0.3)
        for yi, c in zip(y, mine):
            ax.errorbar(c["diff"], yi, xerr=[[c["diff"] - c["ci95"][0]], [c["ci95"][1] - c["diff"]]], fmt="o",
                        capsize=4, color=colours[c["verdict"]])
            if kind == "compute":
                ax.plot([c["bound"]], [yi], marker="|", markersize=18, color="black")
        if kind == "metric":
            ax.axvline(0, color="black", lw=0.8)
            ax.set_xlabel("paired difference A − B (95% interval)")
        else:
            ax.set_xlabel("ratio of median step times (95% interval); | marks the claimed bound")
        ax.set_yticks(y, [f"{c['text']}  [{c['verdict']}]" for c in mine], fontsize="small")
        ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=100)
    return True


def plot_compute(result: dict, path: Path) -> bool:
    comp = {a: v for a, v in result["compute"].items() if v}
    if not comp:
        return False
    tiers = [str(t) for t in sorted({int(t) for v in comp.values() for t in v}, reverse=True)]
    fig, (ax,) = _figure(max(7.0, 1.0 * len(tiers) * len(comp) / 2 + 3), 3.5)
    top = max((c["step_seconds"] for v in comp.values() for c in v.values() if c.get("step_seconds")), default=0)
    scale, unit = (1.0, "s") if top >= 1 else (1000.0, "ms")
    _bars(ax, [f"k={t}" for t in tiers], {a: [v.get(t) for t in tiers] for a, v in comp.items()},
          key="step_seconds", scale=scale)
    ax.set_ylabel(f"{unit} per optimizer step")
    ax.set_title("measured step time\nmedian over client-rounds, 95% interval")  # two lines: clear of the legend
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def plot_rounds(result: dict, path: Path) -> bool:
    primary = result["study"]["metrics"][0]
    rounds = result["rounds"]
    if not any(v.get(primary) for v in rounds.values()):
        return False
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(11, 4, cols=2)
    every = sorted({int(r) for v in rounds.values() for series in v.values() for r in series})
    for ax, key in zip(axes, (primary, "train_loss")):
        ax.set_xlim(every[0] - 0.5, every[-1] + 0.5)  # the same rounds on both panels
        for arm, v in rounds.items():
            points = v.get(key) or {}
            if points:  # only the rounds that were evaluated (or trained) appear
                xs = [int(r) for r in points]
                ax.plot(xs, list(points.values()), marker="o", label=arm)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(key)
        ax.set_title(f"{key} per round (mean over seeds)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def write_plots(root: Path, result: dict) -> list[str]:
    """Write every plot that has data; return their file names."""
    out = []
    for name, fn in (("plot_claims.png", plot_claims), ("plot_arms.png", plot_arms),
                     ("plot_compute.png", plot_compute), ("plot_rounds.png", plot_rounds)):
        if fn(result, root / name):
            out.append(name)
    return out
