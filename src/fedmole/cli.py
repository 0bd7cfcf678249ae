"""The `fedmole` command.

    fedmole run [CONFIG] [--set key=value ...] [--out DIR]
                               CONFIG: a TOML file or a named config (tiny, default, ...)
    fedmole resume RUN_DIR     continue an interrupted run from its last good checkpoint
    fedmole compare CONFIG --methods a,b [--seeds 0,1] [--set key=value ...] [--out DIR]
                               the same job for several methods and seeds (a study without claims)
    fedmole export RUN_DIR --out DIR [--format peft|fedmole] [--client C] [--tier K] [--merge]
    fedmole generate RUN_DIR --prompt TEXT [--input TEXT] [--client C] [--tier K]
    fedmole eval RUN_DIR --data FILE [--client C] [--tier K]
    fedmole study STUDY.toml --out DIR [--strict] [--jobs N]
                               arms x seeds of a study file, 95% intervals and claim verdicts
    fedmole prepare            fetch and convert the embedded model and data once
    fedmole config [CONFIG]    list every option, or print a config (resolved) as TOML
    fedmole methods            list the federated methods

Only the standard library and fedmole's config load before a command runs, so
`fedmole --help` answers at once; torch and transformers come with the command.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from fedmole import __version__
from fedmole.config import ConfigError, describe, load_config, named_configs, to_toml
from fedmole.console import setup_logging

log = logging.getLogger("fedmole")


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
    created = not run_dir.exists()
    log.info("fedmole %s: %s, run directory %s", __version__, "resuming" if resume else "starting", run_dir)
    try:
        if cfg.run.engine == "flower-sim":
            from fedmole.flower.simulation import run_flower_sim  # needs the `flower` extra

            summary = run_flower_sim(cfg, run_dir, resume=resume)
        else:
            from fedmole.engine.local import LocalEngine

            summary = LocalEngine(cfg, run_dir).run(resume=resume)
    except BaseException:
        # a run that stopped before its first checkpoint trained nothing: leave no directory behind
        if created and run_dir.is_dir() and not (run_dir / "checkpoints").is_dir():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    m, b = summary["metrics"], summary["baseline_metrics"]
    print(f"run directory: {run_dir} ({summary['protocol']} evaluation)")
    if b:
        print(f"ROUGE-L before training: {b['rouge_l']:.2f}   after: {m['rouge_l']:.2f}   "
              f"(exact match {b['exact_match']:.2f} -> {m['exact_match']:.2f})")
    else:  # eval.before = false
        print(f"ROUGE-L after training: {m['rouge_l']:.2f}   (exact match {m['exact_match']:.2f})")
    for tier, t in summary["per_tier"].items():
        print(f"  tier k={tier}: ROUGE-L {t['rouge_l']:.2f} over {t['clients']} client(s)")
    print(f"wall time {summary['wall_seconds']:.0f} s, final state sha256 {summary['final_state_sha256'][:16]}...")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import shlex

    from fedmole.algorithms import METHODS
    from fedmole.compare import parse_methods, parse_seeds, run_comparison

    methods = parse_methods(args.methods, list(METHODS))
    words = [args.config, "--methods", args.methods, "--seeds", args.seeds,
             *(x for kv in args.set or [] for x in ("--set", kv)), *(["--out", args.out] if args.out else [])]
    command = "fedmole compare " + " ".join(shlex.quote(w) for w in words)
    result = run_comparison(args.config, methods, parse_seeds(args.seeds), args.set or [], args.out,
                            keep_checkpoints=args.keep_checkpoints, command=command)
    root = Path(result["study"]["dir"])
    for metric in result["study"]["metrics"]:
        cells = {a: v.get(metric) or {} for a, v in result["arms"].items()}
        if not any(c.get("n") for c in cells.values()):
            continue
        print(f"{metric} (mean over test examples, 95% interval):")
        for arm, c in cells.items():
            if c.get("n"):
                print(f"  {arm:12s} {c['mean']:6.2f}  [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]  n={c['n']}")
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"comparison directory: {root} (study.md holds the paired differences; rerun with --out {root} "
          "to continue or extend it)")
    failed = [r["dir"] for r in result["runs"] if r["status"] != "done"]
    if failed:
        print(f"runs without results: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
    return 1 if failed else 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {value}")
    return value


def _study(args: argparse.Namespace) -> int:
    import shlex

    from fedmole.study import load_study, run_study

    study = load_study(args.study)
    command = "fedmole study " + " ".join(shlex.quote(a) for a in [args.study, "--out", args.out]
                                          + (["--strict"] if args.strict else [])
                                          + (["--jobs", str(args.jobs)] if args.jobs > 1 else []))
    result = run_study(study, args.out, strict=args.strict, keep_checkpoints=args.keep_checkpoints, command=command,
                       jobs=args.jobs)
    for c in result["claims"]:
        ci = "–" if c["ci95"] is None else f"[{c['ci95'][0]:.3g}, {c['ci95'][1]:.3g}]"
        value = "–" if c["diff"] is None else f"{c['diff']:.3g}"
        print(f"{c['verdict']:>12}  {c['text']}   ({c['estimate']} = {value}, 95% CI {ci})")
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(f"study directory: {args.out} (study.json, study.md; rerun the same command to continue it)")
    failed = [r["dir"] for r in result["runs"] if r["status"] != "done"]
    if failed:
        print(f"runs without results: {', '.join(failed)} (rerun the same command to retry them)", file=sys.stderr)
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from fedmole.export import export_run

    for item in export_run(args.run_dir, args.out, fmt=args.format, client=args.client, tier=args.tier,
                           merge=args.merge):
        who = f"client {item.client}, " if item.client is not None else ""
        print(f"{item.path}: {item.format} ({who}tier k={item.tier}, base model {item.base_model})")
        if item.format == "peft":
            print(f"  load: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), '{item.path}')")
        elif item.format == "fedmole":
            print(f"  load: fedmole.load_adapter(base_model, '{item.path}', tier={item.tier})")
        else:
            print(f"  load: AutoModelForCausalLM.from_pretrained('{item.path}')")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedmole.inference import load_run

    loaded = load_run(args.run_dir, client=args.client, tier=args.tier)
    print(loaded.generate(args.prompt, args.input or "", max_new_tokens=args.max_new_tokens))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from fedmole.console import bars_enabled
    from fedmole.inference import load_run, read_examples

    examples = read_examples(args.data)  # read and checked before the model loads
    if args.limit:
        examples = examples[: args.limit]
    loaded = load_run(args.run_dir, client=args.client, tier=args.tier)
    res = loaded.evaluate(examples, max_new_tokens=args.max_new_tokens, progress=bars_enabled(True))
    who = f", client {loaded.client.name}" if loaded.client else ""
    line = f"ROUGE-L {res['rouge_l']:.2f}   exact match {res['exact_match']:.2f}"
    if "accuracy" in res:
        line += f"   accuracy {res['accuracy']:.2f} ({res['n_options']} rows with options)"
    print(f"{line}   ({res['n']} examples, tier k={loaded.k}{who})")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fedmole.assets import prepare_all

    prepare_all()
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.config or args.set:
        print(to_toml(load_config(args.config, args.set or [])), end="")
    else:
        print(f"# named configs (fedmole run NAME, fedmole config NAME): {', '.join(named_configs())}")
        print("\n".join(describe()))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from fedmole.algorithms import METHODS

    for name, cls in METHODS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:12s} {doc}")
    return 0


def _view_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client", help="client name or id (personalised runs: required)")
    p.add_argument("--tier", type=int, help="experts per token k (default: the client's tier, else the largest)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmole", description="Federated fine-tuning with sparse mixtures of LoRA experts.")
    p.add_argument("-v", "--verbose", action="store_true", help="fedmole's debug lines")
    p.add_argument("--version", action="version", version=f"fedmole {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated job")
    run.add_argument("config", nargs="?", help="TOML file or named config: " + ", ".join(named_configs())
                     + " (default: built-in defaults)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    run.add_argument("--out", help="run directory (default: RUN.OUT_DIR/METHOD-TIMESTAMP)")
    run.set_defaults(func=_run)

    res = sub.add_parser("resume", help="continue an interrupted run from its last good checkpoint")
    res.add_argument("run_dir")
    res.set_defaults(func=_resume)

    cmp = sub.add_parser("compare", help="run several methods and seeds on one config and compare them "
                                          "with 95%% intervals (a study without claims)")
    cmp.add_argument("config", help="TOML file or named config shared by every run")
    cmp.add_argument("--methods", required=True, help="comma-separated method names (see `fedmole methods`)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    cmp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (repeatable)")
    cmp.add_argument("--out", help="comparison directory; pass an existing one to continue it "
                                   "(default: RUN.OUT_DIR/compare-TIMESTAMP)")
    cmp.add_argument("--keep-checkpoints", action="store_true",
                     help="keep finished runs' checkpoints (by default they are deleted to save disk)")
    cmp.set_defaults(func=_compare)

    exp = sub.add_parser("export", help="export a run's adapter (PEFT or fedmole format) or a merged model")
    exp.add_argument("run_dir")
    exp.add_argument("--out", required=True, help="new directory to write")
    exp.add_argument("--format", choices=("peft", "fedmole"),
                     help="peft (single-LoRA methods; their default) or fedmole (any method; default for mixtures)")
    exp.add_argument("--merge", action="store_true",
                     help="write a standalone Hugging Face model with the adapter folded in, where that is exact")
    _view_options(exp)
    exp.set_defaults(func=_export)

    gen = sub.add_parser("generate", help="answer one prompt with a run's trained model")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", required=True, help="the instruction")
    gen.add_argument("--input", help="the input that goes with it (optional)")
    gen.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    _view_options(gen)
    gen.set_defaults(func=_generate)

    ev = sub.add_parser("eval", help="score a run's trained model on a JSONL / JSON / CSV file")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True, help="JSONL / JSON / CSV file of instruction/input/output rows")
    ev.add_argument("--limit", type=int, help="score only the first N rows")
    ev.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    _view_options(ev)
    ev.set_defaults(func=_eval)

    st = sub.add_parser("study", help="run a study file (arms x seeds) and test its claims")
    st.add_argument("study", help="study file (TOML; see `fedmole.study`)")
    st.add_argument("--out", required=True, help="study directory; pass an existing one to continue it")
    st.add_argument("--strict", action="store_true",
                    help="fail before any work when an arm has too few test examples (else a warning)")
    st.add_argument("--keep-checkpoints", action="store_true",
                    help="keep finished runs' checkpoints (by default they are deleted to save disk)")
    st.add_argument("--jobs", type=_positive_int, default=1,
                    help="runs side by side, each in its own process with the CPUs shared out as torch threads "
                         "(default 1; each process loads its own model, so mind the memory)")
    st.set_defaults(func=_study)

    sub.add_parser("prepare", help="prepare the embedded model and dataset").set_defaults(func=_prepare)

    cfg = sub.add_parser("config", help="list every option, or print a config (file or name) resolved, as TOML")
    cfg.add_argument("config", nargs="?")
    cfg.add_argument("--set", action="append", metavar="KEY=VALUE")
    cfg.set_defaults(func=_config)

    sub.add_parser("methods", help="list the federated methods").set_defaults(func=_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from tqdm.contrib.logging import logging_redirect_tqdm

    try:
        with logging_redirect_tqdm():  # log lines go above the progress bars, not through them
            return args.func(args)
    except ConfigError as e:
        print(f"fedmole: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from fedmole.assets import AssetError
        from fedmole.data.sources import DataError
        from fedmole.export.native import ExportError
        from fedmole.inference import RunError
        from fedmole.engine.local import ResumeError

        if isinstance(e, (AssetError, DataError, ExportError, RunError)):
            print(f"fedmole: {e}", file=sys.stderr)
            return 2
        if isinstance(e, ResumeError):
            print(f"fedmole: cannot resume: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
