"""What a run prints: logging set-up, the start-up summary and one line per round.

Only fedmole's own loggers (`fedmole`, `fedmole.*`) speak at INFO, or DEBUG
with `-v`; other libraries stay at WARNING, so `-v` never floods the console
with font look-ups or HTTP debug lines. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("fedmole")


class _Formatter(logging.Formatter):
    """`HH:MM:SS message`, with the level named for warnings and errors and the logger for debug lines."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{stamp} {record.levelname.lower()}: {text}"
        if record.levelno < logging.INFO:
            return f"{stamp} debug {record.name}: {text}"
        return f"{stamp} {text}"


def setup_logging(verbose: bool = False) -> None:
    """fedmole at INFO (DEBUG when verbose), every other library at WARNING, on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h.formatter, _Formatter)]:  # a second call replaces ours
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("fedmole").setLevel(logging.DEBUG if verbose else logging.INFO)


def bars_enabled(progress: bool) -> bool:
    """Progress bars when `run.progress` asks for them and stderr is a terminal (a log file gets lines only)."""
    import sys

    return progress and sys.stderr.isatty()


def format_bytes(n: float) -> str:
    """512 B, 1.5 KiB, 3.0 MiB, ... (one decimal: a console line, not a table)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_duration(seconds: float) -> str:
    """42 s, 3 min 05 s, 1 h 02 min."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def format_count(n: int) -> str:
    """1234 -> 1.23k, 4_500_000 -> 4.50M."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def startup_lines(*, method: str, engine: str, model: str, base_params: int, trainable_params: int,
                  device: str, precision: str, rounds: int, run_dir: str, data: dict, tiered: bool = True) -> list[str]:
    """The start-up summary: what runs where, on which clients (`data` is the summary's `data` block;
    `tiered` False: the method's clients have no tiers, and none are printed)."""
    lines = [
        f"method {method} on the {engine} engine, {rounds} round(s); run directory {run_dir}",
        f"model {model}: {format_count(base_params)} base parameters (frozen), "
        f"{format_count(trainable_params)} trainable adapter parameters "
        f"({100 * trainable_params / max(base_params, 1):.2f}%)",
        f"device {device}, precision {precision}",
    ]
    if not data["clients"]:  # a Flower server: the data lives on the nodes, which report it as they join
        lines.append("data: held by the nodes (this process loads none)")
        return lines
    lines.append(f"data {data['source']}: {data['rows_loaded']} rows loaded, {data['rows_used']} used "
                 f"by {len(data['clients'])} clients ({data['partition']} partition)")
    if tiered:
        tiers = sorted({c["tier"] for c in data["clients"]}, reverse=True)
        lines.append("tiers (experts per token): " + ", ".join(
            f"k={t} x{sum(c['tier'] == t for c in data['clients'])}" for t in tiers))
    else:
        lines.append(f"no tiers: {method}'s clients differ in data, not compute (fed.tiers does not apply)")
    width = max(len(c["name"]) for c in data["clients"])
    for c in data["clients"]:
        tier = f"  k={c['tier']}" if tiered else ""
        lines.append(f"  client {c['client_id']} {c['name']:<{width}}{tier}  train {c['train']}  "
                     f"val {c['val']}  test {c['test']}  aux {c['aux']}")
    return lines


def round_line(row: dict, rounds: int, eta_seconds: float | None) -> str:
    """`round 2/5: loss 1.2345, rouge_l 41.20, 3.1 s, up 1.2 MiB, down 1.2 MiB, 6 accepted, 0 rejected, ETA 9 s`."""
    parts = [f"loss {row['train_loss']:.4f}"]
    for key in ("rouge_l", "exact_match", "accuracy"):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{key} {row[key]:.2f}")
    parts.append(f"{row['seconds']:.1f} s")
    parts.append(f"up {format_bytes(row['comm_bytes_up'])}, down {format_bytes(row['comm_bytes_down'])}")
    parts.append(f"{len(row.get('clients', []))} accepted, {row.get('num_rejected', 0)} rejected")
    if eta_seconds is not None:
        parts.append(f"ETA {format_duration(eta_seconds)}" if eta_seconds > 0 else "done")
    return f"round {row['round']}/{rounds}: " + ", ".join(parts)
