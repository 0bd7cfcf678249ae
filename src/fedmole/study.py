"""A study: several arms (a method plus overrides each) run on one base job over
several seeds, with claims tested on paired 95% intervals.

    fedmole study STUDY.toml --out DIR [--strict] [--keep-checkpoints] [--jobs N]

The study file (TOML; paths relative to it):

    [study]
    config = "../tiny.toml"                      # base job config
    seeds = [0, 1, 2]
    set = ["eval.tiers=all", "fed.tier_assignment=shuffled"]   # overrides shared by every arm
    metrics = ["accuracy", "rouge_l", "exact_match"]           # reported; the first is the primary one
    bootstrap = 2000                             # bootstrap replicates
    claims = [
        "flame > hetlora on accuracy",                         # paired, overall (each client at its own tier)
        "flame > hetlora on accuracy at tier 1",               # paired, every example scored at k = 1
        "flame at tier 1 step_seconds <= 0.5 x flame at tier 4",     # ratio of median step times
        "hetlora at tier 1 step_seconds >= 0.8 x hetlora at tier 4",
    ]

    [pilot]                                      # how an arm with lr_grid picks its learning rate
    set = ["rounds=1"]                           # what makes a pilot run short
    metric = "accuracy"                          # scored on the validation split

    [arms.flame]                                 # the arm's name is free text: [arms.flame-norescale]
    method = "flame"
    set = ["flame.t=2"]                          # this arm's own overrides
    lr = 1e-2                                    # fixed, or
    lr_grid = [3e-3, 1e-2, 3e-2]                 # chosen by a pilot (not both; neither: the config's)

Every run is resolved before any work starts, from the base config, the study's
`set`, the arm's `set`, its method, learning rate and seed, so for one seed every
arm sees the same partition, splits, tier map, client sampling and batch order.
Layout:

    DIR/runs/<arm>-seed<s>/     one ordinary run directory per (arm, seed)
    DIR/pilots/<arm>-lr<lr>/    the learning-rate pilots (first seed, validation split)
    DIR/study.json, study.md, plot_*.png   (reporting/study.py)

An interrupted study continues: a run directory with a summary.json made from
the same resolved config is kept, an unfinished one is started again. Each run
goes in a fresh process, so nothing one run leaves in memory reaches the next.
With `--jobs N`, N runs go side by side, with the usable CPUs shared out as torch
threads (mind the memory: each process holds its own model).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedmole.config import SECTIONS, Config, ConfigError, assign_tiers, eval_protocol, load_config
from fedmole.evaluation.predict import METRICS

log = logging.getLogger("fedmole")

MIN_TEST_OVERALL = 400  # test examples per arm and seed (evidence.md: SE of a 0/1 score ~2.4 points)
MIN_TEST_PER_TIER = 100
_IGNORED_RUN_KEYS = ("method", "seed", "progress", "out_dir", "threads")  # do not change what a run computes
_ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_METRIC_CLAIM = re.compile(r"^(?P<a>\S+)\s+(?P<op>[<>])\s+(?P<b>\S+)\s+on\s+(?P<metric>\w+)"
                           r"(?:\s+at\s+tier\s+(?P<tier>\d+))?$")
_COMPUTE_CLAIM = re.compile(r"^(?P<a>\S+)\s+at\s+tier\s+(?P<ka>\d+)\s+step_seconds\s+(?P<op><=|>=)\s+"
                            r"(?P<ratio>\d+(?:\.\d*)?|\.\d+)\s*[x×*]\s*(?P<b>\S+)\s+at\s+tier\s+(?P<kb>\d+)$")
CLAIM_FORMS = ("'A > B on METRIC', 'A < B on METRIC', either with ' at tier K'; "
               "'A at tier K1 step_seconds <= R x B at tier K2' (or >=)")


@dataclass
class Arm:
    """One arm: a method, its own overrides and how its learning rate is set."""

    name: str
    method: str
    overrides: list[str] = field(default_factory=list)
    lr: float | None = None
    lr_grid: list[float] = field(default_factory=list)


@dataclass
class Claim:
    """A parsed claim: `metric` (A vs B on a metric, paired) or `compute` (ratio of median step times)."""

    text: str
    kind: str
    a: str
    b: str
    op: str
    metric: str = ""
    tier: int | None = None
    tier_a: int | None = None
    tier_b: int | None = None
    ratio: float | None = None


@dataclass
class Study:
    """A parsed study file."""

    path: Path | None
    config: Path | None
    seeds: list[int]
    arms: list[Arm]
    overrides: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(METRICS))
    bootstrap: int = 2000
    pilot_overrides: list[str] = field(default_factory=lambda: ["rounds=1"])
    pilot_metric: str = "rouge_l"

    def arm(self, name: str) -> Arm:
        return next(a for a in self.arms if a.name == name)


@dataclass
class RunSpec:
    """One run of a study (an arm at a seed, or a learning-rate pilot)."""

    arm: str
    seed: int
    cfg: Config
    dir_name: str


# --------------------------------------------------------------------------- the study file


def _keys(table: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(allowed)}")


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of strings such as [\"rounds=2\"], got {value!r}")
    return list(value)


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{where} must be a number in (0, 1], got {value!r}")
    return float(value)


def parse_claim(text: str, arms: Sequence[str], metrics: Sequence[str] = METRICS) -> Claim:
    """Parse one claim string (see CLAIM_FORMS); unknown arms or metrics fail naming what is allowed."""
    t = " ".join(str(text).split())
    m = _METRIC_CLAIM.match(t)
    if m:
        claim = Claim(t, "metric", m["a"], m["b"], m["op"], metric=m["metric"],
                      tier=int(m["tier"]) if m["tier"] else None)
        if claim.metric not in metrics:
            raise ConfigError(f"claim {t!r}: unknown metric {claim.metric!r}; allowed: {', '.join(metrics)}")
    else:
        m = _COMPUTE_CLAIM.match(t)
        if not m:
            raise ConfigError(f"claim {t!r} is not understood; the forms are {CLAIM_FORMS}")
        claim = Claim(t, "compute", m["a"], m["b"], m["op"], tier_a=int(m["ka"]), tier_b=int(m["kb"]),
                      ratio=float(m["ratio"]))
        if claim.ratio <= 0:
            raise ConfigError(f"claim {t!r}: the ratio must be > 0")
    for name in (claim.a, claim.b):
        if name not in arms:
            raise ConfigError(f"claim {t!r}: unknown arm {name!r}; the arms are {', '.join(arms)}")
    if claim.a == claim.b and claim.kind == "metric":
        raise ConfigError(f"claim {t!r} compares an arm with itself")
    return claim


def load_study(path: str | Path) -> Study:
    """Read and validate a study file (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"study file {p} does not exist")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    _keys(raw, ("study", "pilot", "arms"), str(p))
    head = raw.get("study", {})
    _keys(head, ("config", "seeds", "set", "metrics", "bootstrap", "claims"), f"{p}: [study]")
    if "config" not in head:
        raise ConfigError(f"{p}: [study] needs config = \"PATH\" (the base job config, relative to the study file)")
    seeds = head.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0
                                                        for s in seeds) or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"{p}: [study] seeds must list distinct non-negative integers, got {seeds!r}")
    metrics = _strings(head.get("metrics", list(METRICS)), f"{p}: [study] metrics")
    bad = [m for m in metrics if m not in METRICS]
    if bad or not metrics:
        raise ConfigError(f"{p}: [study] metrics: unknown {bad or metrics!r}; allowed: {', '.join(METRICS)}")
    bootstrap = head.get("bootstrap", 2000)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or not 100 <= bootstrap <= 100_000:
        raise ConfigError(f"{p}: [study] bootstrap must be an integer in [100, 100000], got {bootstrap!r}")

    arms_raw = raw.get("arms", {})
    if not isinstance(arms_raw, dict) or not arms_raw:
        raise ConfigError(f"{p}: no arms; add tables such as [arms.flame] with method = \"flame\"")
    from fedmole.algorithms import METHODS

    arms = []
    for name, table in arms_raw.items():
        where = f"{p}: [arms.{name}]"
        if not _ARM_NAME.match(name):
            raise ConfigError(f"{where}: an arm name may hold letters, digits and _ . + - (it names directories)")
        if not isinstance(table, dict):
            raise ConfigError(f"{where} must be a table")
        _keys(table, ("method", "set", "lr", "lr_grid"), where)
        method = table.get("method", name)
        if method not in METHODS:
            raise ConfigError(f"{where}: method = {method!r}; allowed: {', '.join(METHODS)}")
        if "lr" in table and "lr_grid" in table:
            raise ConfigError(f"{where}: give lr (fixed) or lr_grid (chosen by a pilot), not both")
        grid = [_number(v, f"{where} lr_grid[{i}]") for i, v in enumerate(table.get("lr_grid", []))]
        if "lr_grid" in table and (not grid or len(set(grid)) != len(grid)):
            raise ConfigError(f"{where}: lr_grid must list distinct learning rates, got {table['lr_grid']!r}")
        overrides = _strings(table.get("set", []), f"{where} set")
        fixed = [o for o in overrides if o.split("=", 1)[0].strip() in ("method", "run.method", "seed", "run.seed",
                                                                         "lr", "train.lr")]
        if fixed:
            raise ConfigError(f"{where}: set {fixed[0]!r} through the arm's method / lr keys or the study's seeds")
        arms.append(Arm(name, method, overrides, _number(table["lr"], f"{where} lr") if "lr" in table else None,
                        grid))

    pilot = raw.get("pilot", {})
    _keys(pilot, ("set", "metric"), f"{p}: [pilot]")
    pilot_metric = pilot.get("metric", metrics[0])
    if pilot_metric not in METRICS:
        raise ConfigError(f"{p}: [pilot] metric = {pilot_metric!r}; allowed: {', '.join(METRICS)}")
    names = [a.name for a in arms]
    claims = [parse_claim(c, names, METRICS) for c in _strings(head.get("claims", []), f"{p}: [study] claims")]
    overrides = _strings(head.get("set", []), f"{p}: [study] set")
    fixed = [o for o in overrides if o.split("=", 1)[0].strip() in ("method", "run.method", "seed", "run.seed")]
    if fixed:
        raise ConfigError(f"{p}: [study] set {fixed[0]!r}: methods belong to the arms and seeds to [study] seeds")
    return Study(p, (p.parent / head["config"]).resolve(), list(seeds), arms, overrides, claims, metrics, bootstrap,
                 _strings(pilot.get("set", ["rounds=1"]), f"{p}: [pilot] set"), pilot_metric)


# --------------------------------------------------------------------------- planning


def resolve(study: Study, arm: Arm, seed: int, lr: float | None, extra: Sequence[str] = ()) -> Config:
    """The config of one run: base config, study overrides, the arm's, then method, lr and seed."""
    fixed = [f"run.method={arm.method!r}", f"run.seed={seed}", "run.progress=false"]
    if lr is not None:
        fixed.append(f"train.lr={lr!r}")
    cfg = load_config(study.config, [*study.overrides, *arm.overrides, *extra, *fixed])
    if cfg.run.engine != "local":
        raise ConfigError(f"arm {arm.name}: a study runs on the local engine (it reads every run's "
                          f"predictions.jsonl); run.engine = {cfg.run.engine!r}")
    return cfg


def _shown(path: Path) -> str:
    """`path` relative to the working directory when it lies under it (reports name no machine's layout)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def fingerprint(cfg: Config) -> dict:
    """What decides a run's result: every section but the run keys in _IGNORED_RUN_KEYS, plus
    the options of the run's own method (other methods' tables do not matter)."""
    d = cfg.to_dict()
    out = {name: d[name] for name in SECTIONS}
    out["run"] = {k: v for k, v in out["run"].items() if k not in _IGNORED_RUN_KEYS}
    out["method"] = {"name": cfg.run.method, "options": d.get(cfg.run.method, {})}
    return out


def finished(run_dir: Path, cfg: Config) -> bool:
    """Whether `run_dir` holds a finished run of exactly `cfg`; raise if it holds another one."""
    if not (run_dir / "summary.json").exists():
        return False
    try:
        done = load_config(run_dir / "config.toml")
    except ConfigError as e:
        raise ConfigError(f"{run_dir} holds a finished run whose config no longer loads ({e}); "
                          "use another --out") from None
    a, b = fingerprint(done), fingerprint(cfg)
    if a != b:
        diff = sorted(f"{s}.{k}" for s in b for k in set(a.get(s, {})) | set(b[s])
                      if a.get(s, {}).get(k) != b[s].get(k))
        raise ConfigError(f"{run_dir} holds a finished run made with a different config "
                          f"(differs in {', '.join(diff[:4])}); use another --out")
    return True


def test_sizes(cfg: Config, cross_tier: bool, tiered: bool = True) -> tuple[int, dict[int, int]]:
    """(test examples scored overall, per tier) of one run, from its data and tier map (no model);
    no tiers for a method without them (`Method.tiered`)."""
    from fedmole.engine.setup import build_client_data

    clients = build_client_data(cfg)
    tiers = assign_tiers(cfg)
    overall = sum(len(c.test) for c in clients)
    per_tier: dict[int, int] = {}
    for c in clients if tiered else []:
        scored_at = sorted(set(tiers), reverse=True) if cfg.eval.tiers == "all" and cross_tier else [tiers[c.client_id]]
        for t in scored_at:
            per_tier[t] = per_tier.get(t, 0) + len(c.test)
    return overall, dict(sorted(per_tier.items(), reverse=True))


def size_warnings(study: Study, configs: dict[tuple[str, int], Config]) -> tuple[list[str], dict]:
    """Warnings for arms below MIN_TEST_OVERALL test examples per seed or MIN_TEST_PER_TIER per tier,
    and the sizes: arm -> {"overall": n, "per_tier": {k: n}} (the smallest over seeds)."""
    from fedmole.algorithms import METHODS

    warnings, sizes = [], {}
    for arm in study.arms:
        method = METHODS[arm.method]
        # a personalised evaluation scores each client's own model at its own tier only
        cross = method.cross_tier_eval and eval_protocol(configs[arm.name, study.seeds[0]]) == "global"
        counts = [test_sizes(configs[arm.name, s], cross, method.tiered) for s in study.seeds]
        overall = min(c[0] for c in counts)
        per_tier = {t: min(c[1].get(t, 0) for c in counts) for t in counts[0][1]}
        sizes[arm.name] = {"overall": overall, "per_tier": per_tier}
        if overall < MIN_TEST_OVERALL:
            warnings.append(f"arm {arm.name}: {overall} test examples per seed, fewer than {MIN_TEST_OVERALL}")
        small = {t: n for t, n in per_tier.items() if n < MIN_TEST_PER_TIER}
        if small:
            shown = ", ".join(f"k={t}: {n}" for t, n in small.items())
            warnings.append(f"arm {arm.name}: fewer than {MIN_TEST_PER_TIER} test examples per tier ({shown})")
    return warnings, sizes


def check_pilot_data(arm: Arm, cfg: Config) -> None:
    """A pilot scores the validation split: every client needs one."""
    from fedmole.engine.setup import build_client_data

    empty = [c.name for c in build_client_data(cfg) if not c.val]
    if empty:
        raise ConfigError(f"arm {arm.name}: its learning-rate pilot scores the validation split, but client(s) "
                          f"{', '.join(empty)} have no validation examples (data.val_frac = {cfg.data.val_frac}); "
                          "raise data.val_frac or give the arm a fixed lr")


# --------------------------------------------------------------------------- running


Runner = Callable[[Config, Path], dict]


def _execute(specs: Sequence[RunSpec], root: Path, runner: Runner, keep_checkpoints: bool,
             failures: dict[str, str], jobs: int = 1, isolate: bool = False) -> None:
    """Run every spec whose directory under `root` holds no finished run of its config, up to
    `jobs` at a time, each in a process of its own when `jobs` > 1 or `isolate` (`_parallel`),
    else in this one."""
    pending = []
    for spec in specs:
        run_dir = root / spec.dir_name
        if finished(run_dir, spec.cfg):
            continue
        if run_dir.exists():
            log.info("%s is unfinished; starting it again", spec.dir_name)
            shutil.rmtree(run_dir)
        pending.append(spec)
    if pending and (jobs > 1 or isolate):
        _parallel(pending, root, runner, keep_checkpoints, failures, jobs)
        return
    for spec in pending:
        error = _run_one(runner, spec.cfg, root / spec.dir_name, keep_checkpoints)
        if error:
            failures[spec.dir_name] = error


def _run_one(runner: Runner, cfg: Config, run_dir: Path, keep_checkpoints: bool) -> str | None:
    """One run; its error as text if it failed (one broken run must not cost the others)."""
    log.info("study: running %s", run_dir.name)
    try:
        runner(cfg, run_dir)
    except Exception as e:
        log.exception("run %s failed", run_dir.name)
        return repr(e)
    if not keep_checkpoints:  # with the client state they name
        from fedmole.engine.client_state import RunClientStates

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / RunClientStates.FOLDER, ignore_errors=True)
    return None


def usable_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_job(jobs: int) -> int:
    """torch threads for each of `jobs` runs side by side: the usable CPUs shared out, at least one."""
    return max(1, usable_cpus() // jobs)


def _worker_start(verbose: bool) -> None:
    from fedmole.console import setup_logging

    setup_logging(verbose)


def _parallel(specs: Sequence[RunSpec], root: Path, runner: Runner, keep_checkpoints: bool,
              failures: dict[str, str], jobs: int) -> None:
    """Run `specs` `jobs` at a time, each in a fresh process (nothing one run leaves in memory
    reaches the next). With `jobs` > 1, a run whose config leaves run.threads at 0 gets
    `threads_per_job(jobs)` torch threads (run.threads does not change what a run computes, so
    its fingerprint ignores it); with one job, torch's default as in this process. The runner
    must be picklable (a module-level function)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = threads_per_job(jobs)
    verbose = log.getEffectiveLevel() <= logging.DEBUG
    context = multiprocessing.get_context("spawn")  # no forked copy of a parent that may hold a model
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start,
                             initargs=(verbose,), max_tasks_per_child=1) as pool:  # a fresh process per run
        futures = {}
        for spec in specs:
            cfg = spec.cfg
            if jobs > 1 and not cfg.run.threads:
                cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, threads=threads))
            futures[pool.submit(_run_one, runner, cfg, root / spec.dir_name, keep_checkpoints)] = spec
        if jobs > 1:
            log.info("study: %d runs, %d at a time, %d torch thread(s) each", len(specs), jobs, threads)
        for future in as_completed(futures):
            spec = futures[future]
            try:
                error = future.result()
            except Exception as e:  # the worker process itself died (killed, out of memory)
                error = repr(e)
                log.error("run %s did not finish: %s", spec.dir_name, error)
            if error:
                failures[spec.dir_name] = error
            else:
                log.info("study: %s finished", spec.dir_name)


def _lr_name(lr: float) -> str:
    return f"{lr:g}"


def choose_learning_rates(study: Study, out: Path, runner: Runner, keep_checkpoints: bool,
                          failures: dict[str, str], jobs: int = 1, isolate: bool = False) -> dict[str, dict]:
    """Each arm's learning rate and how it was set; arms with lr_grid run their pilots first."""
    from fedmole.engine.evaluation import read_predictions

    chosen = {}
    for arm in study.arms:
        if not arm.lr_grid:
            lr = arm.lr if arm.lr is not None else resolve(study, arm, study.seeds[0], None).train.lr
            chosen[arm.name] = {"lr": lr, "source": "study file" if arm.lr is not None else "base config"}
            continue
        extra = [*study.pilot_overrides, "eval.split=val", "eval.before=false", "eval.tiers=own"]
        specs = [RunSpec(arm.name, study.seeds[0], resolve(study, arm, study.seeds[0], lr, extra),
                         f"{arm.name}-lr{_lr_name(lr)}") for lr in arm.lr_grid]
        check_pilot_data(arm, specs[0].cfg)
        _execute(specs, out / "pilots", runner, keep_checkpoints, failures, jobs, isolate)
        scores = {}
        for lr, spec in zip(arm.lr_grid, specs):
            if spec.dir_name in failures:
                continue
            values = [r["scores"][study.pilot_metric] for r in read_predictions(out / "pilots" / spec.dir_name)
                      if study.pilot_metric in r["scores"]]
            if not values:
                raise ConfigError(f"arm {arm.name}: the pilot metric {study.pilot_metric!r} was not measured "
                                  "(accuracy needs examples with options); set [pilot] metric")
            scores[_lr_name(lr)] = sum(values) / len(values)
        if not scores:
            raise RuntimeError(f"arm {arm.name}: every learning-rate pilot failed: "
                               f"{[failures[s.dir_name] for s in specs]}")
        best = max(arm.lr_grid, key=lambda lr: (scores.get(_lr_name(lr), float("-inf")), -arm.lr_grid.index(lr)))
        chosen[arm.name] = {"lr": best, "source": "pilot", "grid": arm.lr_grid, "metric": study.pilot_metric,
                            "split": "val", "seed": study.seeds[0], "scores": scores,
                            "pilot_set": study.pilot_overrides}
        log.info("arm %s: learning rate %g chosen by the pilot (%s)", arm.name, best, scores)
    return chosen


def run_study(study: Study, out: str | Path, *, strict: bool = False, keep_checkpoints: bool = False,
              runner: Runner | None = None, command: str = "", jobs: int = 1) -> dict:
    """Run (or finish) every pilot and every arm x seed, up to `jobs` runs at a time, then write
    study.json, study.md and the plots into `out`; return study.json's content."""
    if not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be a whole number of at least 1, got {jobs!r}")
    from fedmole.reporting.study import write_study

    started = time.perf_counter()
    out = Path(out)
    # Resolve every run (at the base or fixed lr) before any work: bad overrides fail here.
    base = {(arm.name, s): resolve(study, arm, s, arm.lr) for arm in study.arms for s in study.seeds}
    from fedmole.algorithms import METHODS

    for claim in study.claims:
        untiered = [n for n in (claim.a, claim.b) if not METHODS[study.arm(n).method].tiered]
        if untiered and (claim.tier is not None or claim.kind == "compute"):
            raise ConfigError(f"claim {claim.text!r}: arm {untiered[0]} ({study.arm(untiered[0]).method}) has no "
                              "tiers; claim it overall ('A > B on METRIC')")
        in_use = set(assign_tiers(base[claim.a, study.seeds[0]]))
        for t in (claim.tier, claim.tier_a, claim.tier_b):
            if t is not None and t not in in_use:
                raise ConfigError(f"claim {claim.text!r}: tier {t} is not in use; tiers: {sorted(in_use)}")
    warnings, sizes = size_warnings(study, base)
    for w in warnings:
        log.warning("study: %s", w)
    if warnings and strict:
        raise ConfigError("the study is too small (--strict): " + "; ".join(warnings))
    out.mkdir(parents=True, exist_ok=True)
    isolate = runner is None  # fedmole's own runs: each in a fresh process (a caller's runner runs here)
    if runner is None:
        from fedmole.engine.local import run_local as runner

    failures: dict[str, str] = {}
    rates = choose_learning_rates(study, out, runner, keep_checkpoints, failures, jobs, isolate)
    # seed by seed: a study stopped part-way holds whole seeds (every arm), which can be analysed
    specs = [RunSpec(arm.name, s, resolve(study, arm, s, rates[arm.name]["lr"]), f"{arm.name}-seed{s}")
             for s in study.seeds for arm in study.arms]
    _execute(specs, out / "runs", runner, keep_checkpoints, failures, jobs, isolate)
    meta = {"file": _shown(study.path) if study.path else None, "config": _shown(study.config) if study.config else None,
            "seeds": study.seeds, "set": study.overrides, "command": command, "dir": str(out),
            "seconds_this_invocation": round(time.perf_counter() - started, 1), "jobs": jobs}
    return write_study(out, study, specs, rates, failures, warnings, sizes, meta)
