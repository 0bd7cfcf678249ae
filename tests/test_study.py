"""`fedmole study`: the study file, claims, same data for every arm of a seed, a small study end to
end, interruption and resume, size checks and pilots."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedmole.cli import main
from fedmole.config import ConfigError
from fedmole.engine.local import LocalEngine, run_local
from fedmole.study import load_study, parse_claim, resolve, run_study

TINY = Path("configs/tiny.toml").resolve()
FAST = ["rounds=1", "train.local_steps=1", "data.max_test=4", "data.max_per_task=60", "eval.max_new_tokens=2",
        "run.threads=1"]


def write_study(tmp_path, body, head=""):
    path = tmp_path / "s.toml"
    path.write_text(f'[study]\nconfig = "{TINY}"\n{head}\n{body}')
    return path


SMALL = """
[pilot]
set = ["rounds=1"]
metric = "accuracy"

[arms.flame]
method = "flame"
lr_grid = [0.003, 0.01]

[arms.hetlora]
lr = 0.01

[arms.local]
method = "local"
lr = 0.01
"""
SMALL_HEAD = f"""seeds = [0, 1]
set = {json.dumps([*FAST, "eval.tiers=all", "fed.tier_assignment=shuffled", "eval.before=false"])}
bootstrap = 200
claims = ["flame > local on accuracy", "flame < hetlora on rouge_l at tier 1",
          "flame at tier 1 step_seconds <= 0.5 x flame at tier 4",
          "hetlora at tier 1 step_seconds >= 0.8 x hetlora at tier 4"]
"""


def test_claims_parse_and_fail_clearly():
    c = parse_claim("flame  >  hetlora on rouge_l at tier 1", ["flame", "hetlora"])
    assert (c.kind, c.a, c.op, c.b, c.metric, c.tier) == ("metric", "flame", ">", "hetlora", "rouge_l", 1)
    c = parse_claim("flame at tier 1 step_seconds <= 0.5 x flame at tier 8", ["flame"])
    assert (c.kind, c.a, c.tier_a, c.op, c.ratio, c.b, c.tier_b) == ("compute", "flame", 1, "<=", 0.5, "flame", 8)
    with pytest.raises(ConfigError, match="unknown arm 'fedit'; the arms are flame, hetlora"):
        parse_claim("flame > fedit on rouge_l", ["flame", "hetlora"])
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        parse_claim("flame > hetlora on bleu", ["flame", "hetlora"])
    with pytest.raises(ConfigError, match="is not understood; the forms are"):
        parse_claim("flame beats hetlora", ["flame", "hetlora"])
    with pytest.raises(ConfigError, match="compares an arm with itself"):
        parse_claim("flame > flame on rouge_l", ["flame"])


@pytest.mark.parametrize("body, message", [
    ("[arms.a]\nmethod = \"nope\"\n", "method = 'nope'; allowed: flame"),
    ("[arms.flame]\nlr = 0.1\nlr_grid = [0.1]\n", "give lr (fixed) or lr_grid"),
    ("[arms.flame]\nfoo = 1\n", "unknown key 'foo'; allowed: method, set, lr, lr_grid"),
    ("[arms.flame]\nset = [\"seed=3\"]\n", "through the arm's method / lr keys"),
    ("[arms.\"a/b\"]\nmethod = \"flame\"\n", "an arm name may hold"),
    ("[arms.flame]\nlr = 2.0\n", "lr must be a number in (0, 1]"),
    ("", "no arms"),
])
def test_bad_study_files_name_the_problem(tmp_path, body, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_study(write_study(tmp_path, body))


def test_missing_config_and_bad_seeds(tmp_path):
    (tmp_path / "a.toml").write_text("[study]\nseeds = [0]\n[arms.flame]\n")
    with pytest.raises(ConfigError, match="needs config ="):
        load_study(tmp_path / "a.toml")
    with pytest.raises(ConfigError, match="seeds must list distinct"):
        load_study(write_study(tmp_path, "[arms.flame]\n", "seeds = [1, 1]"))


def test_one_seed_gives_every_arm_the_same_data_tiers_sampling_and_batches(tmp_path):
    study = load_study(write_study(tmp_path, "[arms.flame]\nlr = 0.01\n[arms.het]\nmethod = \"hetlora\"\n"
                                   "set = [\"adapter.dropout=0.1\"]\nlr = 0.003\n",
                                   "seeds = [0, 3]\nset = [\"fed.tier_assignment=shuffled\", "
                                   "\"fed.sample_fraction=0.5\"]"))

    def fingerprint(arm, seed):
        engine = LocalEngine(resolve(study, study.arm(arm), seed, study.arm(arm).lr), tmp_path / f"{arm}{seed}")
        s = engine.setup
        data = [(c.name, [[e.id for e in split] for split in (c.train, c.aux, c.val, c.test)]) for c in s.clients]
        batches = [[rt.batches.next()["input_ids"].tolist() for _ in range(3)]
                   for rt in (s.runtime(c.client_id) for c in s.clients)]
        return data, s.tiers, [engine.select(r) for r in (1, 2, 3)], batches

    for seed in (0, 3):
        assert fingerprint("flame", seed) == fingerprint("het", seed)
    a, b = fingerprint("flame", 0), fingerprint("flame", 3)
    assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]  # another seed: other splits, tier map and sampling


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a killed process part-way through a study."""


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A three-arm, two-seed study with a learning-rate pilot, interrupted in its fourth run and continued."""
    root = tmp_path_factory.mktemp("study")
    path = write_study(root, SMALL, SMALL_HEAD)
    out = root / "out"
    calls = []

    def dies_in_fourth_run(cfg, run_dir):
        if len(calls) == 3:
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text('{"round": 1, "tra')  # a run cut off mid-write
            raise Interrupt
        calls.append(run_dir.name)
        return run_local(cfg, run_dir)

    with pytest.raises(Interrupt):
        run_study(load_study(path), out, runner=dies_in_fourth_run)
    first = list(calls)
    calls.clear()

    def counting(cfg, run_dir):
        assert not run_dir.exists()  # the unfinished directory was cleared first
        calls.append(run_dir.name)
        return run_local(cfg, run_dir)

    result = run_study(load_study(path), out, runner=counting, command="fedmole study s.toml --out out")
    return path, out, first, list(calls), result


def test_interrupted_study_resumes_without_redoing_finished_runs(small_study):
    path, out, first, second, result = small_study
    assert first == ["flame-lr0.003", "flame-lr0.01", "flame-seed0"]  # pilots first, on the first seed
    assert second == ["hetlora-seed0", "local-seed0", "flame-seed1", "hetlora-seed1", "local-seed1"]  # seed by seed
    again = []
    run_study(load_study(path), out, runner=lambda c, d: again.append(d) or {})
    assert again == []  # everything finished: nothing runs, study.json is rewritten from the runs


def test_small_study_writes_intervals_claims_and_predictions(small_study):
    _, out, _, _, result = small_study
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["claims"] == result["claims"]
    for arm in ("flame", "hetlora", "local"):
        acc = on_disk["arms"][arm]["accuracy"]
        assert acc["n"] > 0 and acc["ci95"][0] <= acc["mean"] <= acc["ci95"][1]
        assert set(acc["per_tier"]) == {"4", "2", "1"} and set(acc["per_seed"]) == {"0", "1"}
        for seed in (0, 1):
            run = out / "runs" / f"{arm}-seed{seed}"
            records = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
            assert records and not (run / "checkpoints").exists()
    # local is scored at its clients' own tiers only; flame at every tier
    assert on_disk["budget"]["arms"]["flame"]["test_examples"]["0"]["per_tier"] == {"4": 24, "2": 24, "1": 24}
    assert on_disk["budget"]["arms"]["local"]["test_examples"]["0"]["per_tier"] == {"4": 8, "2": 8, "1": 8}
    verdicts = {c["text"]: c for c in on_disk["claims"]}
    assert all(c["verdict"] in ("supported", "refuted", "inconclusive") for c in verdicts.values())
    metric = verdicts["flame > local on accuracy"]
    assert metric["n"] == 5 * 4 * 2 and metric["ci95"][0] <= metric["diff"] <= metric["ci95"][1]
    compute = verdicts["flame at tier 1 step_seconds <= 0.5 x flame at tier 4"]
    assert compute["kind"] == "compute" and compute["n"] == [4, 4] and compute["diff"] > 0
    lr = on_disk["learning_rates"]
    assert lr["flame"]["source"] == "pilot" and set(lr["flame"]["scores"]) == {"0.003", "0.01"}
    assert lr["flame"]["lr"] in (0.003, 0.01) and lr["hetlora"] == {"lr": 0.01, "source": "study file"}
    assert any("fewer than 400" in w for w in on_disk["warnings"])
    pairs = {(p["a"], p["b"], p["metric"], p["tier"]) for p in on_disk["paired"]}
    assert ("flame", "local", "accuracy", None) in pairs and ("flame", "hetlora", "rouge_l", 1) in pairs
    md = (out / "study.md").read_text()
    assert "| flame > local on accuracy | **" in md and "## Learning rates" in md and "## Budget" in md
    for plot in on_disk["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert set(on_disk["plots"]) == {"plot_claims.png", "plot_arms.png", "plot_compute.png", "plot_rounds.png"}


def test_study_results_match_a_direct_recomputation(small_study):
    """The arm mean is the plain mean of the own-tier records; the paired difference the mean of the
    per-example differences."""
    _, out, _, _, result = small_study
    recs = {arm: [json.loads(x) for s in (0, 1)
                  for x in (out / "runs" / f"{arm}-seed{s}" / "predictions.jsonl").read_text().splitlines()]
            for arm in ("flame", "local")}
    own = {arm: [r["scores"]["accuracy"] for r in rs if r["tier"] == r["client_tier"] and "accuracy" in r["scores"]]
           for arm, rs in recs.items()}
    assert result["arms"]["flame"]["accuracy"]["mean"] == pytest.approx(np.mean(own["flame"]))
    diff = next(c for c in result["claims"] if c["text"] == "flame > local on accuracy")["diff"]
    assert diff == pytest.approx(np.mean(own["flame"]) - np.mean(own["local"]))


def test_runs_side_by_side_give_the_same_results(small_study, tmp_path):
    """--jobs 2: pilots and runs in two worker processes, the same predictions and final states as one
    at a time; a run that fails in a worker is reported, the others finish."""
    path, out, *_ = small_study
    result = run_study(load_study(path), tmp_path / "par", jobs=2)
    assert result["study"]["jobs"] == 2 and all(r["status"] == "done" for r in result["runs"])
    for folder in ("pilots", "runs"):
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "par" / folder).iterdir())
        for name in names:
            one, two = out / folder / name, tmp_path / "par" / folder / name
            assert (one / "predictions.jsonl").read_text() == (two / "predictions.jsonl").read_text()
            a, b = (json.loads((d / "summary.json").read_text()) for d in (one, two))
            assert a["final_state_sha256"] == b["final_state_sha256"] and a["metrics"] == b["metrics"]
    metric_claims = [c for c in json.loads((out / "study.json").read_text())["claims"] if c["kind"] != "compute"]
    assert [c for c in result["claims"] if c["kind"] != "compute"] == metric_claims  # step times differ
    broken = write_study(tmp_path, "[arms.flame]\nlr = 0.01\n[arms.hetlora]\nlr = 0.01\n",
                         f'seeds = [0]\nset = {json.dumps([*FAST, "eval.before=false"])}\n')
    result = run_study(load_study(broken), tmp_path / "broken", jobs=2, runner=fails_for_hetlora)
    status = {r["dir"]: r["status"] for r in result["runs"]}
    assert status["runs/flame-seed0"] == "done" and status["runs/hetlora-seed0"] != "done"
    with pytest.raises(ConfigError, match="jobs must be a whole number of at least 1, got 0"):
        run_study(load_study(broken), tmp_path / "broken", jobs=0)


def fails_for_hetlora(cfg, run_dir):  # module level: a worker process unpickles it
    if cfg.run.method == "hetlora":
        raise RuntimeError("this run breaks")
    assert cfg.run.threads == 1  # set by the study (FAST); left as it is
    return run_local(cfg, run_dir)


def test_jobs_share_out_the_cpus(monkeypatch):
    import fedmole.study as study_module

    monkeypatch.setattr(study_module, "usable_cpus", lambda: 16)
    assert [study_module.threads_per_job(j) for j in (1, 2, 3, 16, 32)] == [16, 8, 5, 1, 1]
    with pytest.raises(SystemExit):
        main(["study", "x.toml", "--out", "y", "--jobs", "0"])


def test_strict_size_check_and_other_configs_fail_before_work(small_study, tmp_path):
    path, out, *_ = small_study
    ran = []
    with pytest.raises(ConfigError, match="too small.*fewer than 400"):
        run_study(load_study(path), tmp_path / "strict", strict=True, runner=lambda c, d: ran.append(d))
    assert ran == [] and not (tmp_path / "strict").exists()
    other = write_study(tmp_path, SMALL, SMALL_HEAD.replace('"data.max_test=4"', '"data.max_test=3"'))
    with pytest.raises(ConfigError, match="different config.*data.max_test"):
        run_study(load_study(other), out, runner=lambda c, d: ran.append(d))


def test_pilot_needs_a_validation_split(tmp_path):
    path = write_study(tmp_path, "[arms.flame]\nlr_grid = [0.01, 0.1]\n",
                       f"set = {json.dumps([*FAST, 'data.val_frac=0.0'])}")
    with pytest.raises(ConfigError, match="no validation examples.*data.val_frac = 0.0"):
        run_study(load_study(path), tmp_path / "out", runner=lambda c, d: None)


def test_cli_study_prints_verdicts(small_study, capsys):
    path, out, *_ = small_study
    assert main(["study", str(path), "--out", str(out)]) == 0  # finished: only the analysis runs again
    printed = capsys.readouterr().out
    assert "flame > local on accuracy" in printed and "study directory:" in printed


def test_an_arm_without_tiers_takes_part_in_overall_claims_only(tmp_path):
    """FedAMoLE has no tiers: a per-tier or compute claim on it fails before any work; sizes have no tiers."""
    from fedmole.study import size_warnings

    body = "[arms.fedamole]\nlr = 0.01\n[arms.fedit]\nlr = 0.01\n"
    head = f'set = {json.dumps([*FAST, "eval.protocol=personalized"])}\n'
    ran = []
    for claim in ("fedamole > fedit on accuracy at tier 1", "fedamole at tier 1 step_seconds <= 1 x fedit at tier 1"):
        path = write_study(tmp_path, body, head + f"claims = [{json.dumps(claim)}]")
        with pytest.raises(ConfigError, match="arm fedamole \\(fedamole\\) has no tiers; claim it overall"):
            run_study(load_study(path), tmp_path / "out", runner=lambda c, d: ran.append(d))
    assert ran == [] and not (tmp_path / "out").exists()
    study = load_study(write_study(tmp_path, body, head + 'claims = ["fedamole > fedit on accuracy"]'))
    configs = {(a.name, 0): resolve(study, a, 0, a.lr) for a in study.arms}
    _, sizes = size_warnings(study, configs)
    assert sizes["fedamole"]["per_tier"] == {} and sizes["fedamole"]["overall"] == sizes["fedit"]["overall"]
    # personalised: each client's own model at its own tier, even under eval.tiers = all
    configs = {(a.name, 0): resolve(study, a, 0, a.lr, ["eval.tiers=all"]) for a in study.arms}
    assert sum(size_warnings(study, configs)[1]["fedit"]["per_tier"].values()) == sizes["fedit"]["overall"]


@pytest.mark.parametrize("path", sorted(Path("configs/studies").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_study_files_resolve_every_run(path):
    from fedmole.config import eval_protocol

    study = load_study(path)
    configs = [resolve(study, arm, s, arm.lr) for arm in study.arms for s in study.seeds]
    assert configs and {c.run.engine for c in configs} == {"local"}
    if path.stem.startswith("fedamole"):  # like with like: every arm scores each client's own model
        assert {eval_protocol(c) for c in configs} == {"personalized"}
