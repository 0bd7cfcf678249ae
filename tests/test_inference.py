"""Loading a finished run for inference: views, eval mode, generation and scoring."""

import dataclasses

import pytest

from fedmole.config import load_config
from fedmole.data.types import Example
from fedmole.engine.local import run_local
from fedmole.inference import RunError, load_run


@pytest.fixture(scope="module")
def flame_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("flame")
    run_local(load_config("configs/tiny.toml", ["rounds=1", "run.progress=false", "train.local_steps=2",
                                                "data.num_clients=3", "fed.tiers=[4,2,1]", "data.max_test=2",
                                                "eval.max_new_tokens=2", "data.max_per_task=24"]), path)
    return path


def test_views_follow_client_and_tier(flame_run):
    assert load_run(flame_run).k == 4  # the largest tier by default
    loaded = load_run(flame_run, client=2)
    assert (loaded.k, loaded.client.client_id) == (1, 2)
    assert load_run(flame_run, client=loaded.client.name, tier=3).k == 3  # any k the adapter runs
    assert not any(m.training for m in loaded.model.modules())
    with pytest.raises(RunError, match="tier 9 is outside what this adapter runs: 1..4"):
        load_run(flame_run, tier=9)


@pytest.mark.parametrize("method", ["flame", "fedamole"])
def test_scoring_a_clients_test_split_reproduces_the_runs_own_evaluation(flame_run, tmp_path, method):
    import json

    from fedmole.config import assign_tiers
    from fedmole.engine.setup import load_clients

    run = flame_run
    if method == "fedamole":  # personalised: each client's own model, from the last checkpoint
        run = tmp_path / "fedamole"
        run_local(load_config(flame_run / "config.toml", ["method=fedamole", "fedamole.pool_size=6",
                                                          "fedamole.max_experts=4"]), run)
    cfg = load_config(run / "config.toml")
    clients, _ = load_clients(cfg, assign_tiers(cfg))
    scored = json.loads((run / "summary.json").read_text())["per_client"]
    for c in clients:
        res = load_run(run, client=c.name).evaluate(c.test)
        assert res["rouge_l"] == pytest.approx(scored[c.name]["rouge_l"]), c.name


def test_generate_and_evaluate_use_the_training_encoding(flame_run):
    loaded = load_run(flame_run)
    answer = loaded.generate("Write the first word.", "red blue", max_new_tokens=3)
    assert isinstance(answer, str)
    examples = [Example("Write the first word.", "red blue", ("red",)), Example("Reverse.", "a b", ("b a",))]
    res = loaded.evaluate(examples, max_new_tokens=3)
    assert res["n"] == 2 and 0 <= res["rouge_l"] <= 100 and "accuracy" not in res
    # the same prompt ids as evaluation during training
    from fedmole.data.tokenize import encode_prompt

    assert loaded.encode(examples[0]) == encode_prompt(loaded.tokenizer, examples[0], max_prompt_tokens=64)


def test_rows_with_options_get_an_accuracy(flame_run):
    @dataclasses.dataclass(frozen=True)
    class WithOptions(Example):  # stands in for rows read with an `options` field
        options: tuple = ()

    loaded = load_run(flame_run)
    rows = [WithOptions("Pick the colour.", "", ("red",), options=("red", "dog")),
            WithOptions("Pick the animal.", "", ("dog",), options=("red", "dog"))]
    res = loaded.evaluate(rows, max_new_tokens=2)
    assert res["n_options"] == 2 and res["accuracy"] in (0.0, 50.0, 100.0)
