"""Cost of a population: the same rounds of 10 sampled clients out of 10, 100 and 1,000.

Each population runs in its own subprocess (so peak RSS is that run's own), one after
another, with the same data (Dirichlet over Natural Instructions' categories), model
and per-round work; only data.num_clients and fed.sample_fraction change. Per run:

    set-up s      building the engine: data loaded, partitioned and split, model loaded
    partition s   of which: loading, partitioning and splitting the data (`load_clients`)
    s/round       mean seconds of the rounds that do not evaluate (all but the last)
    eval round s  the last round, which also evaluates every client of the population
    ckpt MB/round mean bytes a round writes to resume from: its checkpoint folder plus the
                  client state written during the round (RUN_DIR/client_state)
    peak RSS MB   the run's peak resident memory (and, in brackets, its peak after set-up)

printed with each figure's ratio to the smallest population's run of the same invocation.

    .venv/bin/python benchmarks/scale.py [--populations 10 100 1000] [--per-round 10]
        [--rounds 3] [--config default] [--set key=value ...] [--json FILE]

The defaults run FLAME on the sparse smollm2-moe (SmolLM2-135M-Instruct upcycled to 8
experts, top-4; configs/default.toml) with tiers 4, 2 and 1 in equal shares, small local
work (one step of 4 sequences of at most 128 tokens per client and round) and one test
example per client scored with two new tokens. The last round evaluates the whole
population, so its seconds grow with it; s/round counts only the rounds that train.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALE = [
    "run.progress=false", "eval.before=false", "eval.every=0", "eval.max_new_tokens=2", "eval.max_prompt_tokens=96",
    "data.partition=dirichlet", "data.tasks=[]", "data.max_per_task=500", "data.min_client_size=8",
    "data.max_train=64", "data.max_test=1", "data.max_len=128", "train.local_steps=1", "train.batch_size=4",
    "fed.tiers=[4,2,1]",
]


def child(population: int, per_round: int, rounds: int, config: str, extra: list[str], out: Path) -> dict:
    """One run in this process; the measurements as a dict."""
    import fedmole.engine.setup as setup_module
    from fedmole.config import load_config
    from fedmole.engine.local import LocalEngine

    overrides = [*SCALE, f"rounds={rounds}", f"data.num_clients={population}",
                 f"fed.sample_fraction={per_round / population!r}", *extra]
    cfg = load_config(config, overrides)
    partition = []
    load_clients = setup_module.load_clients

    def timed_load(*args, **kwargs):
        t0 = time.perf_counter()
        result = load_clients(*args, **kwargs)
        partition.append(time.perf_counter() - t0)
        return result

    setup_module.load_clients = timed_load
    written = []

    class Measured(LocalEngine):
        counted = 0  # client state bytes written up to the last checkpoint

        def checkpoint(self, rnd, *args):
            super().checkpoint(rnd, *args)
            folder = self.out.path / "checkpoints" / f"round_{rnd:04d}"
            state = self.states.files.bytes_written
            written.append(sum(f.stat().st_size for f in folder.iterdir()) + state - self.counted)
            self.counted = state

    t0 = time.perf_counter()
    engine = Measured(cfg, out)
    setup_seconds = time.perf_counter() - t0
    peak_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary = engine.run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r["seconds"] for r in rows if r["round"] >= 1 and "rouge_l" not in r]
    return {
        "population": population, "per_round": per_round, "rounds": rounds,
        "setup_seconds": setup_seconds, "partition_seconds": sum(partition),
        "seconds_per_round": sum(train_rows) / len(train_rows),
        "eval_round_seconds": rows[-1]["seconds"],
        "checkpoint_bytes_per_round": sum(written) / len(written),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss_setup_mb": peak_setup,
        "wall_seconds": summary["wall_seconds"], "rouge_l": summary["metrics"].get("rouge_l"),
    }


COLUMNS = [("setup_seconds", "set-up s", 1), ("partition_seconds", "partition s", 2),
           ("seconds_per_round", "s/round", 1), ("eval_round_seconds", "eval round s", 1),
           ("checkpoint_bytes_per_round", "ckpt MB/round", 2), ("peak_rss_mb", "peak RSS MB", 0)]


def table(results: list[dict]) -> str:
    base = results[0]
    head = f"{'clients':>8s}" + "".join(f"{name:>22s}" for _, name, _ in COLUMNS)
    lines = [head]
    for r in results:
        cells = []
        for key, _, digits in COLUMNS:
            value, ratio = r[key], r[key] / base[key] if base[key] else float("nan")
            shown = value / 2**20 if key == "checkpoint_bytes_per_round" else value
            cells.append(f"{shown:.{digits}f} ({ratio:.2f}x)")
        cells[-1] += f" [{r['peak_rss_setup_mb']:.0f}]"
        lines.append(f"{r['population']:8d}" + "".join(f"{c:>22s}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--populations", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--config", default="default")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO if a.child is not None and a.verbose else logging.WARNING)
    if a.child is not None:
        result = child(a.child, a.per_round, a.rounds, a.config, a.set, Path(a.out))
        print("RESULT " + json.dumps(result), flush=True)
        return

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for population in a.populations:
            cmd = [sys.executable, __file__, "--child", str(population), "--per-round", str(a.per_round),
                   "--rounds", str(a.rounds), "--config", a.config, "--out", str(Path(tmp) / f"n{population}"),
                   *[x for s in a.set for x in ("--set", s)]]
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"the run of {population} clients failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            r = results[-1]
            print(f"{population} clients: set-up {r['setup_seconds']:.1f} s, {r['seconds_per_round']:.1f} s/round, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    extra = f", {' '.join(a.set)}" if a.set else ""
    print(f"\n{a.config}, {a.per_round} clients per round, {a.rounds} rounds{extra}; "
          f"ratios to {results[0]['population']} clients; [peak RSS after set-up]")
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
