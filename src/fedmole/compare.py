"""A fair comparison of federated methods: one config, several methods and seeds.

    fedmole compare CONFIG --methods flame,fedit,hetlora --seeds 0,1,2 [--set key=value ...] [--out DIR]

Every run is resolved from the same config and overrides; only `run.method`
and `run.seed` vary, so the partition, splits, tiers, step budget and
evaluation are the same for every method of a seed. Layout:

    OUT/<method>-seed<s>/     an ordinary run directory per (method, seed)
    OUT/comparison.json       every run's figures and the mean/std tables
    OUT/comparison.md         the Markdown table and plots (reporting/comparison.py)

Interrupted comparisons continue: a run whose `summary.json` exists is kept
(if it was made with the same resolved config), an unfinished run directory
is deleted and run again from scratch.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedmole.config import SECTIONS, Config, ConfigError, load_config

log = logging.getLogger("fedmole")

# run settings that do not change what a run computes
_IGNORED_RUN_KEYS = ("method", "seed", "progress", "out_dir", "threads")


@dataclass
class RunSpec:
    """One (method, seed) run of a comparison."""

    method: str
    seed: int
    cfg: Config

    @property
    def dir_name(self) -> str:
        return f"{self.method}-seed{self.seed}"


def parse_methods(text: str, known: Sequence[str]) -> list[str]:
    """'flame, fedit' -> ['flame', 'fedit']; unknown or repeated names fail, listing the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--methods is empty; known methods: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known methods: {', '.join(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods names a method twice: {text!r}")
    return names


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (non-negative, distinct)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct non-negative integers, got {text!r}")
    return seeds


def fingerprint(cfg: Config) -> dict:
    """What decides a run's result: every section but the run keys in _IGNORED_RUN_KEYS, plus
    the options of the run's own method (other methods' tables do not matter)."""
    d = cfg.to_dict()
    out = {name: d[name] for name in SECTIONS}
    out["run"] = {k: v for k, v in out["run"].items() if k not in _IGNORED_RUN_KEYS}
    out["method"] = {"name": cfg.run.method, "options": d.get(cfg.run.method, {})}
    return out


def plan(config: str | Path | None, methods: Sequence[str], seeds: Sequence[int],
         overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Resolve and validate every run's config before any work starts."""
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() in ("method", "seed", "run.method", "run.seed")]
    if fixed:
        raise ConfigError(f"compare sets run.method and run.seed itself; drop {', '.join(fixed)}")
    specs = []
    for method in methods:
        for seed in seeds:
            cfg = load_config(config, [*overrides, f"run.method={method!r}", f"run.seed={seed}",
                                       "run.progress=false"])
            if cfg.run.engine != "local":
                raise ConfigError(f"compare runs on the local engine; run.engine = {cfg.run.engine!r}")
            check = getattr(cfg.method_options(), "check", None)
            if check is not None:  # a method's cross-section rule (e.g. FedAMoLE's feasibility)
                check(cfg)
            specs.append(RunSpec(method, seed, cfg))
    return specs


def finished(run_dir: Path, spec: RunSpec) -> bool:
    """Whether `run_dir` holds a finished run of exactly this spec; raise if it holds another one."""
    if not (run_dir / "summary.json").exists():
        return False
    try:
        done = load_config(run_dir / "config.toml")
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a finished run whose config no longer loads ({e}); "
                          "use another --out") from None
    if fingerprint(done) != fingerprint(spec.cfg):
        a, b = fingerprint(done), fingerprint(spec.cfg)
        diff = sorted(f"{s}.{k}" for s in b for k in set(a.get(s, {})) | set(b[s])
                      if a.get(s, {}).get(k) != b[s].get(k))
        raise ConfigError(f"{run_dir} holds a finished run made with a different config "
                          f"(differs in {', '.join(diff[:4])}); use another --out")
    return True


def run_comparison(
    config: str | Path | None,
    methods: Sequence[str],
    seeds: Sequence[int] = (0,),
    overrides: Sequence[str] = (),
    out: str | Path | None = None,
    *,
    progress: bool = True,
    keep_checkpoints: bool = False,
    runner: Callable[[Config, Path], dict] | None = None,
) -> dict:
    """Run (or finish) every (method, seed) run and write the comparison; return comparison.json's content.

    `runner(cfg, run_dir)` runs one job (default: the local engine). A run that raises is
    recorded as failed and the comparison goes on; it is retried on the next invocation.
    """
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from fedmole.algorithms import METHODS
    from fedmole.reporting.comparison import write_comparison

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known methods: {', '.join(METHODS)}")
    specs = plan(config, methods, seeds, overrides)
    root = Path(out) if out else Path(specs[0].cfg.run.out_dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    root.mkdir(parents=True, exist_ok=True)
    todo = [s for s in specs if not finished(root / s.dir_name, s)]
    log.info("comparison in %s: %d run(s), %d already finished", root, len(specs), len(specs) - len(todo))
    if runner is None:
        from fedmole.engine.local import run_local as runner

    failures: dict[str, str] = {}
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="run", desc="compare", disable=not progress)
    with logging_redirect_tqdm():
        for spec in todo:
            run_dir = root / spec.dir_name
            bar.set_description(f"{spec.method} seed {spec.seed}")
            if run_dir.exists():
                log.info("%s is unfinished; starting it again", run_dir.name)
                shutil.rmtree(run_dir)
            try:
                summary = runner(spec.cfg, run_dir)
            except Exception as e:  # one broken method must not cost the other runs
                log.exception("run %s failed", spec.dir_name)
                failures[spec.dir_name] = repr(e)
            else:
                bar.set_postfix(rouge_l=f"{summary['metrics']['rouge_l']:.2f}")
                if not keep_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            bar.update(1)
    bar.close()
    return write_comparison(root, [(s.method, s.seed, root / s.dir_name) for s in specs], failures,
                            {"config": str(config) if config else None, "overrides": list(overrides),
                             "dir": str(root)})
