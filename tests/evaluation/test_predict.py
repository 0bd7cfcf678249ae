"""Option scoring against a per-option oracle, and per-example prediction records."""

import pytest
import torch

from fedmole.data.tokenize import answer_ids
from fedmole.data.types import Example
from fedmole.evaluation.choice import choose, option_losses
from fedmole.evaluation.generate import greedy_generate
from fedmole.evaluation.predict import mean_scores, predict


def oracle_loss(model, prompt, option):
    """HF's own mean loss over the option tokens, one unpadded sequence at a time."""
    ids = torch.tensor([prompt + option])
    labels = torch.tensor([[-100] * len(prompt) + option])
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def test_batched_option_losses_match_the_oracle(model, tok):
    prompts = [tok(t).input_ids for t in ("Input: What is the capital", "yes", "0 1 2 3 4 5 6 7 8 9 answer")]
    options = [[tok(" yes").input_ids, tok(" no answer here").input_ids],
               [tok(" 7").input_ids, tok(" true").input_ids, tok(" false word").input_ids],
               [tok(" a").input_ids, tok(" bb").input_ids]]
    got = option_losses(model, prompts, options, pad_id=tok.pad_token_id, batch_size=3)
    for p, opts, losses in zip(prompts, options, got):
        assert losses == pytest.approx([oracle_loss(model, p, o) for o in opts], abs=1e-4)
    # batch size and order do not change the scores
    again = option_losses(model, prompts[::-1], options[::-1], pad_id=tok.pad_token_id, batch_size=1)
    for a, b in zip(again[::-1], got):
        assert a == pytest.approx(b, abs=1e-4)
    assert choose([0.5, 0.2, 0.2]) == 1


def test_option_losses_share_the_prompt_on_a_sparse_moe_with_its_adapter(tok):
    from fedmole.adapters.inject import MoLEConfig
    from fedmole.adapters.moe_lora import inject_moe_lora
    from fedmole.adapters.moe_models import tiny_moe

    moe = tiny_moe("qwen2_moe", len(tok), seed=3).eval()
    adapter = inject_moe_lora(moe, MoLEConfig(rank=2, dropout=0.0), k_max=4)
    with torch.no_grad():
        for block in adapter.layers.values():
            block.lora_down_B.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    prompts = [tok(t).input_ids for t in ("Input: What is the capital", "0 1 2 3 4 5 6 7 8 9 answer")]
    options = [[tok(" yes").input_ids, tok(" no answer here").input_ids], [tok(" a").input_ids, tok(" bb").input_ids]]
    with adapter.route(2):  # a capped tier: the cached and the continued tokens route alike
        got = option_losses(moe, prompts, options, pad_id=tok.pad_token_id, batch_size=2)
        for p, opts, losses in zip(prompts, options, got):
            assert losses == pytest.approx([oracle_loss(moe, p, o) for o in opts], abs=1e-4)


def test_option_losses_reject_bad_input(model, tok):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        option_losses(model, [[]], [[[1]]], pad_id=0)
    with pytest.raises(ValueError, match="example 0: options must be"):
        option_losses(model, [[1]], [[[1], []]], pad_id=0)


def test_predict_classifies_options_and_generates_the_rest(model, tok):
    examples = [
        Example("Is it?", "a", ("yes",), id="t/0", options=("yes", "no")),
        Example("Say", "b", ("Paris", "paris"), id="t/1"),
        Example("Is it?", "c", ("no",), id="t/2", options=("yes", "no")),
    ]

    def encode(ex):
        return tok(ex.instruction + " " + ex.input).input_ids

    records = predict(model, tok, examples, encode, max_new_tokens=4, batch_size=2)
    assert [r["example_id"] for r in records] == ["t/0", "t/1", "t/2"]
    for r, ex in zip(records, examples):
        assert r["references"] == list(ex.outputs)
        if ex.options:  # the lowest-loss option (EOS counts, as in training)
            losses = [oracle_loss(model, encode(ex), answer_ids(tok, o)) for o in ex.options]
            assert r["prediction"] == ex.options[min(range(2), key=losses.__getitem__)]
            assert r["scores"]["accuracy"] == (100.0 if r["prediction"] == ex.outputs[0] else 0.0)
        else:
            assert "accuracy" not in r["scores"]
    raw = greedy_generate(model, [encode(examples[1])], pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id],
                          max_new_tokens=4)
    assert records[1]["prediction"] == tok.decode(raw[0], skip_special_tokens=True).strip()
    summary = mean_scores(records)
    assert summary["n"] == 3 and 0 <= summary["accuracy"] <= 100
    assert summary["exact_match"] == pytest.approx(sum(r["scores"]["exact_match"] for r in records) / 3)
    assert "accuracy" not in mean_scores(records[1:2]) and mean_scores([])["n"] == 0
