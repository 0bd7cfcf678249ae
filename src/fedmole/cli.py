"""The `fedmole` command.

    fedmole run [CONFIG] [--set key=value ...] [--out DIR]
    fedmole resume RUN_DIR     continue an interrupted run from its last good checkpoint
    fedmole compare CONFIG --methods a,b [--seeds 0,1] [--set key=value ...] [--out DIR]
                               the same job for several methods and seeds, with a comparison table
    fedmole prepare            fetch and convert the embedded model and data once
    fedmole config             list every option with its default and meaning
    fedmole methods            list the federated methods
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedmole.config import ConfigError, describe, load_config


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set or [])
    from fedmole.reporting.rundir import new_run_dir

    run_dir = Path(args.out) if args.out else new_run_dir(cfg.run.out_dir, cfg.run.method)
    if (run_dir / "summary.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --out")
    return _execute(cfg, run_dir, resume=False)


def _resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml)")
    from fedmole.engine.local import check_resumable

    check_resumable(run_dir)  # before anything is built: a Flower server's config names no data it could load
    cfg = load_config(run_dir / "config.toml")
    return _execute(cfg, run_dir, resume=True)


def _execute(cfg, run_dir: Path, resume: bool) -> int:
    if cfg.run.engine == "flower-sim":
        from fedmole.flower.simulation import run_flower_sim  # needs the `flower` extra

        summary = run_flower_sim(cfg, run_dir, resume=resume)
    else:
        from fedmole.engine.local import LocalEngine

        summary = LocalEngine(cfg, run_dir).run(resume=resume)
    m, b = summary["metrics"], summary["baseline_metrics"]
    print(f"run directory: {run_dir}")
    print(f"ROUGE-L before training: {b['rouge_l']:.2f}   after: {m['rouge_l']:.2f}   "
          f"(exact match {b['exact_match']:.2f} -> {m['exact_match']:.2f})")
    for tier, t in summary["per_tier"].items():
        print(f"  tier k={tier}: ROUGE-L {t['rouge_l']:.2f} over {t['clients']} client(s)")
    print(f"wall time {summary['wall_seconds']:.0f} s, final state sha256 {summary['final_state_sha256'][:16]}...")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedmole.algorithms import METHODS
    from fedmole.compare import parse_methods, parse_seeds, run_comparison

    methods = parse_methods(args.methods, list(METHODS))
    result = run_comparison(args.config, methods, parse_seeds(args.seeds), args.set or [], args.out,
                            keep_checkpoints=args.keep_checkpoints)
    root = Path(result["meta"]["dir"])
    print((root / "comparison.md").read_text())
    print(f"comparison directory: {root} (rerun with --out {root} to continue or extend it)")
    failed = [r["dir"] for r in result["runs"] if r["status"] != "done"]
    if failed:
        print(f"runs without results: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
    return 1 if failed else 0


def _prepare(args: argparse.Namespace) -> int:
    from fedmole.assets import prepare_all

    prepare_all()
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.config or args.set:
        print(json.dumps(load_config(args.config, args.set or []).to_dict(), indent=2))
    else:
        print("\n".join(describe()))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from fedmole.algorithms import METHODS

    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmole", description="Federated fine-tuning with sparse mixtures of LoRA experts.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated job")
    run.add_argument("config", nargs="?", help="TOML config (default: built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    run.add_argument("--out", help="run directory (default: RUN.OUT_DIR/METHOD-TIMESTAMP)")
    run.set_defaults(func=_run)

    res = sub.add_parser("resume", help="continue an interrupted run from its last good checkpoint")
    res.add_argument("run_dir")
    res.set_defaults(func=_resume)

    cmp = sub.add_parser("compare", help="run several methods and seeds on one config and compare them")
    cmp.add_argument("config", help="TOML config shared by every run")
    cmp.add_argument("--methods", required=True, help="comma-separated method names (see `fedmole methods`)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    cmp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    cmp.add_argument("--out", help="comparison directory; pass an existing one to continue it "
                                   "(default: RUN.OUT_DIR/compare-TIMESTAMP)")
    cmp.add_argument("--keep-checkpoints", action="store_true",
                     help="keep finished runs' checkpoints (by default they are deleted to save disk)")
    cmp.set_defaults(func=_compare)

    sub.add_parser("prepare", help="prepare the embedded model and dataset").set_defaults(func=_prepare)

    cfg = sub.add_parser("config", help="show options, or the resolved config of a file")
    cfg.add_argument("config", nargs="?")
    cfg.add_argument("--set", action="append", metavar="KEY=VALUE")
    cfg.set_defaults(func=_config)

    sub.add_parser("methods", help="list the federated methods").set_defaults(func=_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"fedmole: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from fedmole.assets import AssetError
        from fedmole.data.sources import DataError
        from fedmole.engine.local import ResumeError

        if isinstance(e, (AssetError, DataError)):
            print(f"fedmole: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ResumeError):
            print(f"fedmole: cannot resume: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
