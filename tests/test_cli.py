"""The `fedmole` command from a user's point of view: an empty directory, a named config,
then export, generate and eval of what was trained; the console it prints."""

import json
import logging

import pytest

from fedmole import __version__
from fedmole.cli import main

QUICK = ["--set", "rounds=1", "--set", "train.local_steps=2", "--set", "data.max_test=2",
         "--set", "eval.max_new_tokens=3", "--set", "data.num_clients=3", "--set", "fed.tiers=[4,2,1]",
         "--set", "data.max_per_task=24", "--set", "run.progress=false"]


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logging.getLogger("fedmole").setLevel(logging.NOTSET)


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"fedmole {__version__}"


def test_run_export_generate_eval_from_an_empty_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny", "--set", "method=fedit", *QUICK, "--out", "R"]) == 0
    err = capsys.readouterr().err
    for line in ("run directory R", "trainable adapter parameters", "device cpu, precision float32",
                 "tiers (experts per token): k=4 x1, k=2 x1, k=1 x1", "train 19  val 2  test 2  aux 1",
                 "round 1/1: loss", "up ", "3 accepted, 0 rejected"):
        assert line in err, line

    assert main(["export", "R", "--format", "peft", "--out", "P"]) == 0
    assert "P: peft (tier k=4, base model tiny-llama)" in capsys.readouterr().out
    assert json.loads((tmp_path / "P" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    assert main(["generate", "R", "--prompt", "Write the first word.", "--input", "red blue"]) == 0
    assert capsys.readouterr().out.endswith("\n")

    rows = [{"instruction": "Write the first word.", "input": "red blue", "output": "red"},
            {"instruction": "Write the last word.", "input": "red blue", "output": "blue"}]
    (tmp_path / "mine.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["eval", "R", "--data", "mine.jsonl", "--client", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROUGE-L ") and "exact match" in out and "(2 examples, tier k=2, client " in out


def test_a_run_that_fails_before_training_leaves_no_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    assert main(["run", "tiny", "--set", "data.source='bad.jsonl'", "--set", "data.tasks=[]", "--out", "R"]) == 2
    assert "cannot split 1 examples across 6 clients" in capsys.readouterr().err
    assert not (tmp_path / "R").exists()


def test_config_prints_a_named_config_as_toml_and_lists_every_option(capsys):
    assert main(["config", "tiny", "--set", "rounds=7"]) == 0
    out = capsys.readouterr().out
    assert "[run]" in out and "rounds = 7" in out and 'name = "tiny-llama"' in out
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "named configs" in out and "tiny" in out
    assert "run.tracker = 'none'" in out


def test_verbose_shows_fedmole_debug_lines_only(capsys):
    from fedmole.console import setup_logging

    setup_logging(verbose=True)
    logging.getLogger("fedmole.test").debug("ours")
    logging.getLogger("matplotlib.font_manager").debug("font lookup")
    err = capsys.readouterr().err
    assert "debug fedmole.test: ours" in err and "font lookup" not in err


def test_a_method_without_tiers_prints_no_tier_rows(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tiny", "--set", "method=fedamole", "--set", "fedamole.pool_size=6",
                 "--set", "fedamole.max_experts=4", *QUICK, "--out", "R"]) == 0
    captured = capsys.readouterr()
    assert "no tiers: fedamole's clients differ in data" in captured.err
    assert "tiers (experts per token)" not in captured.err and "  k=" not in captured.err
    assert "(personalized evaluation)" in captured.out and "tier k=" not in captured.out
    summary = json.loads((tmp_path / "R" / "summary.json").read_text())
    assert summary["per_tier"] == {} and summary["protocol"] == "personalized"
