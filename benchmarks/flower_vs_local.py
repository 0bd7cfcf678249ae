"""Wall time of one fedmole run on Flower's Simulation Engine vs the local engine.

Both engines run the same config in this process, alternating (local first on
even repeats, Flower first on odd ones) so machine noise hits them alike;
medians are printed with the Flower/local ratio. Two times per run:

    end-to-end  the whole call: Setup, (Ray start-up and actors), every round, evaluation, report
    loop        the summary's wall_seconds: the round loop from the first evaluation to the report

The final adapters must be identical (same sha256); the script says so if not.

    .venv/bin/python benchmarks/flower_vs_local.py [--config configs/tiny.toml] [--repeats 3]
        [--set key=value ...]

Threads default to one (`run.threads=1`): on a shared machine a descheduled second
OpenMP thread makes timings noisy; `--set run.threads=0` uses torch's default.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from fedmole.config import load_config
from fedmole.engine.local import run_local
from fedmole.flower.simulation import run_flower_sim

ENGINES = {"local": run_local, "flower-sim": run_flower_sim}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    overrides = ["run.progress=false", "run.threads=1", *a.set]

    times = {e: {"end-to-end": [], "loop": []} for e in ENGINES}
    shas = set()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            order = list(ENGINES) if r % 2 == 0 else list(reversed(ENGINES))
            for engine in order:
                cfg = load_config(a.config, [*overrides, f"run.engine={engine}"])
                t0 = time.perf_counter()
                summary = ENGINES[engine](cfg, Path(tmp) / f"{engine}-{r}")
                times[engine]["end-to-end"].append(time.perf_counter() - t0)
                times[engine]["loop"].append(summary["wall_seconds"])
                shas.add(summary["final_state_sha256"])
                print(f"repeat {r + 1}/{a.repeats} {engine:10s} end-to-end {times[engine]['end-to-end'][-1]:7.1f} s"
                      f"  loop {summary['wall_seconds']:7.1f} s", flush=True)

    print(f"\n{a.config} {' '.join(a.set)}: median of {a.repeats} run(s) per engine")
    print(f"{'':12s}{'local':>10s}{'flower-sim':>12s}{'ratio':>8s}")
    for what in ("end-to-end", "loop"):
        loc, fl = (statistics.median(times[e][what]) for e in ENGINES)
        print(f"{what:12s}{loc:9.1f}s{fl:11.1f}s{fl / loc:7.2f}x")
    print("final adapters identical across engines and repeats" if len(shas) == 1
          else f"WARNING: {len(shas)} different final adapters")


if __name__ == "__main__":
    main()
