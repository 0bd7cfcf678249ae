"""Config loading: defaults, overrides, and clear errors before any work starts."""

import pytest

from fedmole.config import ConfigError, assign_tiers, load_config


def test_defaults_and_overrides(tmp_path):
    cfg = load_config()
    assert cfg.run.method == "flame" and cfg.adapter.targets == ["q_proj", "v_proj"]
    p = tmp_path / "c.toml"
    p.write_text('[run]\nrounds = 5\n[fed]\ntiers = [2, 1]\n')
    cfg = load_config(p, ["flame.t=4", "seed=3", "adapter.targets=['all-linear']", "model.name=tiny-llama"])
    assert (cfg.run.rounds, cfg.run.seed, cfg.method_options().t) == (5, 3, 4.0)
    assert cfg.adapter.targets == ["all-linear"] and cfg.model.name == "tiny-llama"


@pytest.mark.parametrize(
    "override,message",
    [
        ("rounds=0", r"run.rounds = 0 is out of range; allowed: \[1, inf\]"),
        ("run.bogus=1", "unknown key run.bogus; allowed in \\[run\\]: method"),
        ("bogus.key=1", r"unknown section \[bogus\]"),
        ("method=nope", "run.method = 'nope'; allowed: flame"),
        ("adapter.rescale=sometimes", "adapter.rescale = 'sometimes'; allowed: learned, fixed, off"),
        ("fed.tiers=[16]", r"fed.tiers contains 16; each tier must be in 1..adapter.num_experts \(8\)"),
        ("train.lr='fast'", "train.lr: expected a number, got 'fast'"),
        ("train.lr=nan", "train.lr = nan; allowed: a finite number"),
        ("fed.client_timeout=inf", "fed.client_timeout = inf; allowed: a finite number"),
        ("fed.tier_proportions=[1.0, -inf, 1.0, 1.0]", r"fed.tier_proportions\[1\] = -inf; allowed: a finite number"),
        ("data.num_clients=2.5", "data.num_clients: expected an integer"),
        ("fed.tier_proportions=[1.0]", "fed.tier_proportions has 1 entries but fed.tiers has 4"),
        ("fed.min_clients=99", "fed.min_clients = 99 exceeds data.num_clients = 6"),
        ("noequals", "is not key=value"),
        ("fed.update_norm_factor=0.5", r"fed.update_norm_factor = 0.5; allowed: 0 \(off\) or >= 1"),
        ("fed.robust=median", "fed.robust = 'median'; allowed: none, clip, trimmed_mean"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_trimmed_mean_only_for_methods_that_average():
    with pytest.raises(ConfigError, match="does not apply to flexlora.*allowed for: flame, fedit, hetlora"):
        load_config(None, ["method=flexlora", "fed.robust=trimmed_mean"])
    assert load_config(None, ["fed.robust=trimmed_mean"]).fed.trim_fraction == 0.1


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nrounds = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_tier_assignment():
    cfg = load_config(None, ["data.num_clients=4", "fed.tiers=[8,4,2,1]"])
    assert assign_tiers(cfg) == [8, 4, 2, 1]
    cfg = load_config(None, ["data.num_clients=6", "fed.tiers=[8,2]", "fed.tier_proportions=[2,1]"])
    assert assign_tiers(cfg) == [8, 8, 8, 8, 2, 2]
    cfg = load_config(None, ["data.num_clients=7", "fed.tiers=[4,2,1]"])
    assert sorted(assign_tiers(cfg), reverse=True) == assign_tiers(cfg) and len(assign_tiers(cfg)) == 7


def test_named_configs_ship_inside_the_package_and_match_the_repository(tmp_path, monkeypatch):
    from pathlib import Path

    from fedmole.config import named_configs, to_toml

    repo = Path(__file__).resolve().parents[1] / "configs"
    named = named_configs()
    assert set(named) == {p.stem for p in repo.glob("*.toml")} >= {"tiny", "default", "tiny-moe", "compare"}
    for name, resource in named.items():  # one source of truth: the copies may not drift apart
        assert resource.read_text(encoding="utf-8") == (repo / f"{name}.toml").read_text(encoding="utf-8"), name
    monkeypatch.chdir(tmp_path)  # away from the repository's configs/
    cfg = load_config("tiny", ["rounds=2"])
    assert (cfg.model.name, cfg.run.rounds) == ("tiny-llama", 2)
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert load_config(tmp_path / "again.toml").to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match=r"does not exist, and it is not a named config \(compare, default"):
        load_config("tiniest")


def test_config_and_cli_load_without_torch():
    import subprocess
    import sys

    code = "import sys, fedmole.cli; fedmole.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tracker_that_is_not_installed_fails_at_load_time(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"run.tracker = 'mlflow' needs the mlflow package: pip install 'fedmole\[mlflow\]'"):
        load_config(None, ["run.tracker=mlflow"])
    with pytest.raises(ConfigError, match="allowed: none, tensorboard, mlflow"):
        load_config(None, ["run.tracker=wandb"])


def test_shuffled_tiers_are_a_seeded_permutation():
    base = ["data.num_clients=8", "fed.tiers=[8, 4, 2, 1]", "adapter.num_experts=8"]
    fixed = assign_tiers(load_config(None, base))
    assert fixed == [8, 8, 4, 4, 2, 2, 1, 1]
    maps = [assign_tiers(load_config(None, [*base, "fed.tier_assignment=shuffled", f"seed={s}"])) for s in range(4)]
    assert all(sorted(m) == sorted(fixed) for m in maps)  # the same tiers, reassigned
    assert len({tuple(m) for m in maps}) > 1  # seeds differ
    again = assign_tiers(load_config(None, [*base, "fed.tier_assignment=shuffled", "seed=2", "method=hetlora"]))
    assert again == maps[2]  # the method does not enter the map


def test_cross_tier_evaluation_needs_the_local_engine():
    with pytest.raises(ConfigError, match="eval.tiers = 'all' needs run.engine = 'local'"):
        load_config(None, ["eval.tiers=all", "run.engine=flower-sim"])
    with pytest.raises(ConfigError, match="eval.tiers = 'some'; allowed: own, all"):
        load_config(None, ["eval.tiers=some"])


@pytest.mark.parametrize("method", ["flexlora", "flora", "fedamole"])
def test_methods_that_restart_their_adapter_refuse_kept_moments(method):
    with pytest.raises(ConfigError, match=f"train.optimizer_state = 'keep' does not apply to {method}: .*"
                                          "allowed: reset"):
        load_config("configs/tiny.toml", [f"method={method}", "train.optimizer_state=keep"])
    assert load_config("configs/tiny.toml", ["method=hetlora", "train.optimizer_state=keep"]).train.optimizer_state == "keep"


def test_evaluation_protocol_per_method():
    from fedmole.config import eval_protocol

    assert eval_protocol(load_config(None, [])) == "global"
    assert eval_protocol(load_config("configs/tiny.toml", ["method=fedamole"])) == "personalized"
    assert eval_protocol(load_config("configs/tiny.toml", ["method=local"])) == "personalized"
    for method in ("flame", "fedit", "hetlora", "flexlora", "flora", "centralized"):
        cfg = load_config("configs/tiny.toml", [f"method={method}", "eval.protocol=personalized"])
        assert eval_protocol(cfg) == "personalized" and cfg.to_dict()["eval"]["protocol"] == "personalized"
    for method in ("fedamole", "local"):
        with pytest.raises(ConfigError, match=rf"eval.protocol = 'global': {method} evaluates each client's own "
                                              r"model .*allowed: auto, personalized"):
            load_config("configs/tiny.toml", [f"method={method}", "eval.protocol=global"])
    with pytest.raises(ConfigError, match="eval.protocol = 'best'; allowed: auto, global, personalized"):
        load_config(None, ["eval.protocol=best"])
