"""Every fedmole option is a Flower run-config key, parsed and fused by Flower's own code."""

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, get_fused_config_from_dir, parse_config_args

from fedmole.config import ConfigError, load_config
from fedmole.flower.server_app import APP_KEYS, option_keys, run_config_overrides


def test_pyproject_declares_every_fedmole_option():
    declared = flatten_dict(tomllib.loads(Path("pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    expected = set(APP_KEYS) | set(option_keys())
    missing, stale = sorted(expected - set(declared)), sorted(set(declared) - expected)
    assert not missing and not stale, f"[tool.flwr.app.config] lacks {missing} and has stale {stale}"
    assert all(declared[k] == "" for k in option_keys())  # "" = the value of the `config` file


def test_run_config_keys_override_the_config_file():
    given = parse_config_args(["rounds=5 fed.tiers='[4,2]' train.lr=0.01 method='fedit' adapter.dropout=0.2 "
                               "data.source='/data/site 1.jsonl'"])
    fused = get_fused_config_from_dir(Path("."), given)
    cfg = load_config("configs/tiny.toml", run_config_overrides(fused))
    assert (cfg.run.rounds, cfg.fed.tiers, cfg.train.lr, cfg.run.method) == (5, [4, 2], 0.01, "fedit")
    assert cfg.adapter.dropout == 0.2 and cfg.data.source == "/data/site 1.jsonl"
    assert cfg.data.num_clients == 6 and cfg.model.name == "tiny-llama"  # the rest comes from the file

    with pytest.raises(ValueError, match="Key 'fed.tier' is not present"):
        get_fused_config_from_dir(Path("."), parse_config_args(["fed.tier=3"]))  # Flower refuses unknown keys
    with pytest.raises(ConfigError, match="unknown run-config key 'round-timeout'"):
        run_config_overrides({"config": "configs/tiny.toml", "round-timeout": 5.0})
    with pytest.raises(ConfigError, match="fed.robust = 'median'"):
        load_config("configs/tiny.toml", run_config_overrides({"fed.robust": "median"}))
