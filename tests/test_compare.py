"""`fedmole compare`: every method on one tiny job as a study without claims; resume; bad names."""

import json

import pytest

from fedmole.algorithms import METHODS
from fedmole.cli import main
from fedmole.compare import parse_methods, parse_seeds, run_comparison
from fedmole.config import ConfigError
from fedmole.engine.local import run_local

TINY = "configs/tiny.toml"
FAST = ["rounds=1", "train.local_steps=1", "data.max_test=2", "data.max_per_task=40", "eval.max_new_tokens=2",
        "run.threads=1"]


class Interrupt(BaseException):
    """Stands in for Ctrl-C / a killed process part-way through a comparison."""


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory):
    """A comparison of every method, cut off in its third run and then run again."""
    out = tmp_path_factory.mktemp("cmp")
    methods = list(METHODS)
    calls = []

    def dies_in_third_run(cfg, run_dir):
        if len(calls) == 2:
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text('{"round": 0}\n{"rou')  # a run cut off mid-write
            raise Interrupt
        calls.append(cfg.run.method)
        return run_local(cfg, run_dir)

    with pytest.raises(Interrupt):
        run_comparison(TINY, methods, [0], FAST, out, runner=dies_in_third_run)
    first = list(calls)
    calls.clear()

    def counting(cfg, run_dir):
        calls.append(cfg.run.method)
        assert not run_dir.exists()  # the unfinished directory was cleared first
        return run_local(cfg, run_dir)

    result = run_comparison(TINY, methods, [0], FAST, out, runner=counting)
    return out, methods, first, list(calls), result


def test_resume_runs_only_what_did_not_finish(interrupted_then_resumed):
    out, methods, first, second, _ = interrupted_then_resumed
    assert first == methods[:2]
    assert second == methods[2:]  # finished runs are kept, the interrupted one starts over
    again = []
    run_comparison(TINY, methods, [0], FAST, out, runner=lambda c, d: again.append(c) or {})
    assert again == []


def test_every_method_gets_intervals_on_the_same_clients(interrupted_then_resumed):
    out, methods, _, _, result = interrupted_then_resumed
    assert [r["status"] for r in result["runs"]] == ["done"] * len(methods)
    assert not [w for w in result["warnings"] if "scored other" in w or "differs from" in w]  # same clients and budget
    # local and fedamole score each client's own model, the others the global one
    assert [w for w in result["warnings"] if w.startswith("arms are evaluated under different protocols")]
    on_disk = json.loads((out / "study.json").read_text())
    assert on_disk["arms"].keys() == set(methods) and on_disk["study"]["seeds"] == [0] and on_disk["claims"] == []
    for m in methods:
        assert (out / "runs" / f"{m}-seed0" / "predictions.jsonl").is_file()
        assert not (out / "runs" / f"{m}-seed0" / "checkpoints").exists()  # pruned once the run finished
        cell = on_disk["arms"][m]["rouge_l"]
        assert cell["n"] == 12 and cell["ci95"][0] <= cell["mean"] <= cell["ci95"][1]
        # FedAMoLE's clients differ in data, not tiers: it reports no per-tier scores
        assert cell["per_tier"].keys() == (set() if m == "fedamole" else {"4", "2", "1"})
        assert on_disk["study"]["arms"][m]["protocol"] == ("personalized" if m in ("fedamole", "local") else "global")
    md = (out / "study.md").read_text()
    assert "## rouge_l" in md and "| flame | flame |" in md and "## Paired differences (rouge_l)" in md


def test_a_finished_run_with_another_config_is_not_reused(interrupted_then_resumed):
    out, methods, *_ = interrupted_then_resumed
    with pytest.raises(ConfigError, match="different config.*data.max_test"):
        run_comparison(TINY, methods[:1], [0], [*FAST, "data.max_test=3"], out)


def test_unknown_method_fails_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match="unknown method.*nope.*known methods: flame"):
        parse_methods("flame,nope", list(METHODS))
    assert main(["compare", TINY, "--methods", "fedit,nope", "--out", str(tmp_path / "c")]) == 2
    assert "known methods: " + ", ".join(METHODS) in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="sets run.method and run.seed itself"):
        run_comparison(TINY, ["fedit"], [0], ["seed=3"], tmp_path / "d")
    with pytest.raises(ConfigError, match="distinct non-negative"):
        parse_seeds("1,1")


def test_cli_prints_intervals(interrupted_then_resumed, capsys):
    out, methods, *_ = interrupted_then_resumed
    args = [x for kv in FAST for x in ("--set", kv)]
    assert main(["compare", TINY, "--methods", ",".join(methods), *args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rouge_l (mean over test examples, 95% interval):" in printed and "  flame " in printed
