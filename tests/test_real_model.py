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


def test_short_flame_run_on_the_dense_job(tmp_path):
    cfg = load_config("configs/dense.toml", [
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


def test_smollm2_moe_is_a_plain_transformers_moe_that_reproduces_the_dense_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmole.assets import prepare_smollm2, prepare_smollm2_moe

    path = prepare_smollm2_moe()
    moe = AutoModelForCausalLM.from_pretrained(path)  # no fedmole code involved
    dense = AutoModelForCausalLM.from_pretrained(prepare_smollm2())
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and moe.config.num_experts_per_tok == 4
    assert moe.config.num_experts == 8 and moe.config.norm_topk_prob is False
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is Paris, and the capital of Italy is Rome.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        l_moe = moe(ids, labels=ids).loss.item()
        l_dense = dense(ids, labels=ids).loss.item()
    assert abs(l_moe - l_dense) <= 0.02 * l_dense  # the native top-4 is the dense model
    card = (path / "README.md").read_text()
    assert "| 1 |" in card and "Sparse upcycling" in card


def test_short_flame_run_on_the_sparse_main_job(tmp_path):
    cfg = load_config("configs/default.toml", [
        "rounds=1", "run.progress=false", "data.num_clients=3", "fed.tiers=[4,2,1]", "train.local_steps=1",
        "train.batch_size=4", "data.max_test=4", "eval.max_new_tokens=8", "data.max_per_task=60",
        "data.tasks=['subtask020_mctaco_span_based_question','subtask022_cosmosqa_passage_inappropriate_binary',"
        "'subtask050_multirc_answerability']", "eval.before=false",
    ])
    summary = run_local(cfg, tmp_path)
    assert summary["model"] == "smollm2-moe" and set(summary["per_tier"]) == {"4", "2", "1"}
    compute = summary["compute"]["per_tier"]
    assert compute["4"]["flops_per_token"] > compute["2"]["flops_per_token"] > compute["1"]["flops_per_token"]
    assert all(compute[t]["step_seconds"] > 0 for t in ("4", "2", "1"))
    assert 0 <= summary["metrics"]["accuracy"] <= 100  # the three yes/no tasks are scored by their options
