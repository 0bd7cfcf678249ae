"""`fedmole compare`: every method on one tiny job, resume after an interruption, bad method names."""

import json

import pytest

from fedmole.algorithms import METHODS
from fedmole.cli import main
from fedmole.compare import parse_methods, parse_seeds, run_comparison
from fedmole.config import ConfigError
from fedmole.engine.local import run_local
from fedmole.reporting.comparison import markdown, mean_std

TINY = "configs/tiny.toml"
FAST = ["rounds=1", "train.local_steps=1", "data.max_test=2", "eval.max_new_tokens=2", "run.threads=1"]


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
        run_comparison(TINY, methods, [0], FAST, out, progress=False, runner=dies_in_third_run)
    first = list(calls)

    calls.clear()

    def counting(cfg, run_dir):
        calls.append(cfg.run.method)
        assert not run_dir.exists()  # the unfinished directory was cleared first
        return run_local(cfg, run_dir)

    result = run_comparison(TINY, methods, [0], FAST, out, progress=False, runner=counting)
    return out, methods, first, list(calls), result


def test_resume_runs_only_what_did_not_finish(interrupted_then_resumed):
    out, methods, first, second, _ = interrupted_then_resumed
    assert first == methods[:2]
    assert second == methods[2:]  # finished runs are kept, the interrupted one starts over
    again = []
    run_comparison(TINY, methods, [0], FAST, out, progress=False, runner=lambda c, d: again.append(c) or {})
    assert again == []


def test_every_method_gets_a_result_on_the_same_clients(interrupted_then_resumed):
    out, methods, _, _, result = interrupted_then_resumed
    assert [r["status"] for r in result["runs"]] == ["done"] * len(methods)
    assert result["fairness"] == []  # same clients, tiers and test sizes for every method
    on_disk = json.loads((out / "comparison.json").read_text())
    assert on_disk["table"].keys() == set(methods) and on_disk["seeds"] == [0]
    for m in methods:
        assert (out / f"{m}-seed0" / "summary.json").is_file()
        assert not (out / f"{m}-seed0" / "checkpoints").exists()  # pruned once the run finished
        row = on_disk["table"][m]
        # FedAMoLE's clients differ in data, not tiers: it reports no per-tier scores
        assert row["per_tier"].keys() == (set() if m == "fedamole" else {"4", "2", "1"}) and row["rouge_l"]["n"] == 1
        assert row["protocol"] == ("personalized" if m in ("fedamole", "local") else "global")
    assert on_disk["table"]["local"]["comm_up_per_round"]["mean"] == 0  # nothing leaves a local client
    # a single LoRA rank for FedIT: less traffic than HetLoRA's per-tier ranks
    up = {m: row["comm_up_per_round"]["mean"] for m, row in on_disk["table"].items()}
    assert up["fedit"] < up["hetlora"]
    md = (out / "comparison.md").read_text()
    assert "| method | protocol | seeds | ROUGE-L | EM | ROUGE-L k=4 |" in md and "| centralized † |" in md
    assert (out / "plot_per_round.png").stat().st_size > 0 and (out / "plot_per_tier.png").stat().st_size > 0


def test_a_finished_run_with_another_config_is_not_reused(interrupted_then_resumed):
    out, methods, *_ = interrupted_then_resumed
    with pytest.raises(ConfigError, match="different config.*data.max_test"):
        run_comparison(TINY, methods[:1], [0], [*FAST, "data.max_test=3"], out, progress=False)


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


def test_table_formats_mean_and_sample_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "n": 2}
    assert mean_std([5.0])["std"] is None
    cell = {"mean": 2.0, "std": 1.5, "n": 2}
    result = {"meta": {"config": "c.toml", "overrides": []}, "methods": ["fedit"], "seeds": [0, 1], "runs": [],
              "fairness": [], "plots": [],
              "table": {"fedit": {"seeds": [0, 1], "protocol": "personalized", "rouge_l": cell, "exact_match": cell,
                                  "per_tier": {"2": {"rouge_l": cell, "exact_match": cell}},
                                  "comm_up_per_round": {"mean": 2048.0, "std": 0.0, "n": 2},
                                  "comm_down_per_round": {"mean": 512.0, "std": None, "n": 1},
                                  "wall_seconds": {"mean": 10.0, "std": 1.0, "n": 2}}}}
    assert "| fedit | personalized | 2 | 2.00 ± 1.50 | 2.00 ± 1.50 | 2.00 ± 1.50 | 2.00 ± 1.50 | 2.00 KiB ± 0 B | 512 B | " \
           "10 s ± 1 s |" in markdown(result)
