"""The embedded SmolLM2-135M-Instruct and Natural Instructions, end to end (marked slow)."""

import json

import pytest
import torch

from fedmole.adapters.inject import MoLEConfig, inject_mole
from fedmole.config import load_config
from fedmole.engine.local import run_local
from fedmole.models import load_base

pytestmark = pytest.mark.slow


def test_mole_on_smollm2_starts_as_the_base_model():
    model, tokenizer = load_base("smollm2-135m-instruct")
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
        adapter = inject_mole(model, MoLEConfig(), k_max=8)
        for k in (8, 1):
            with adapter.route(k):
                torch.testing.assert_close(model(ids).logits, before)
    assert len(adapter.layers) == 2 * model.config.num_hidden_layers
    # 30 layers x (q: 8*8*576 + 8*576*8 + 8*576 + 8) + (v: 8*8*576 + 8*192*8 + 8*576 + 8)
    assert adapter.num_parameters() == 30 * ((73728 + 4608 + 8) + (36864 + 12288 + 4608 + 8))


def test_short_flame_run_on_the_default_job(tmp_path):
    cfg = load_config("configs/default.toml", [
        "rounds=1", "run.progress=false", "data.num_clients=3", "fed.tiers=[8,4,2]", "train.local_steps=2",
        "data.max_test=4", "eval.max_new_tokens=8", "data.max_per_task=60",
        "data.tasks=['subtask020_mctaco_span_based_question','subtask022_cosmosqa_passage_inappropriate_binary',"
        "'subtask050_multirc_answerability']",
    ])
    summary = run_local(cfg, tmp_path)
    assert summary["model"] == "smollm2-135m-instruct"
    assert set(summary["per_tier"]) == {"8", "4", "2"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] > 0 and not rows[1]["rejected"]
    assert 0 <= summary["metrics"]["rouge_l"] <= 100
