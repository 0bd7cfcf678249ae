"""`fedmole compare`: a study without claims, built from the command line.

    fedmole compare CONFIG --methods flame,fedit,hetlora --seeds 0,1,2 [--set key=value ...] [--out DIR]

Each method becomes an arm of the same name at the config's learning rate, every
run shares the config and overrides (only `run.method` and `run.seed` vary), and
the output is a study directory (fedmole/study.py): runs/<method>-seed<s>/,
study.json and study.md with 95% intervals and paired differences, and plots.
An interrupted comparison continues when run again with the same --out. To test
claims, tune learning rates or give arms their own overrides, write a study file
and use `fedmole study`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from fedmole.config import ConfigError, load_config
from fedmole.study import Arm, Runner, Study, run_study


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


def comparison_study(config: str | Path, methods: Sequence[str], seeds: Sequence[int],
                     overrides: Sequence[str] = ()) -> Study:
    """The study of `methods` x `seeds` on one config (ROUGE-L first), without claims."""
    from fedmole.algorithms import METHODS

    parse_methods(",".join(methods), list(METHODS))
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() in ("method", "seed", "run.method", "run.seed")]
    if fixed:
        raise ConfigError(f"compare sets run.method and run.seed itself; drop {', '.join(fixed)}")
    return Study(None, Path(config).resolve(), list(seeds), [Arm(m, m) for m in methods], list(overrides),
                 metrics=["rouge_l", "exact_match", "accuracy"])


def run_comparison(config: str | Path, methods: Sequence[str], seeds: Sequence[int] = (0,),
                   overrides: Sequence[str] = (), out: str | Path | None = None, *, keep_checkpoints: bool = False,
                   runner: Runner | None = None, command: str = "") -> dict:
    """Run (or finish) every (method, seed) run and write the study files; return study.json's content."""
    study = comparison_study(config, methods, seeds, overrides)
    root = Path(out) if out else Path(load_config(config, list(overrides)).run.out_dir) / \
        f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_study(study, root, keep_checkpoints=keep_checkpoints, runner=runner, command=command)
