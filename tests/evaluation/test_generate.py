"""Batched greedy generation on a tiny random Llama."""

import copy

import pytest
import torch

from fedmole.evaluation.generate import greedy_generate, stop_token_ids

TEXTS = [
    "Input: What is the capital of France?",
    "yes",
    "Generate a question about the passage. Classify",
    "0 1 2 3 4",
    "no true false answer question passage sentence word",
]


@pytest.fixture(scope="module")
def prompts(tok):
    ids = [tok(t).input_ids for t in TEXTS]
    assert len({len(p) for p in ids}) > 3  # lengths differ, so padding is exercised
    return ids


def _argmax_loop(model, prompt, n, eos):
    """Oracle: uncached, unpadded greedy decoding one token at a time."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_batched_matches_unbatched_and_oracle(model, tok, prompts):
    eos, pad = {tok.eos_token_id}, tok.pad_token_id
    batched = greedy_generate(model, prompts, pad_id=pad, eos_ids=eos, max_new_tokens=8, batch_size=3)
    single = [greedy_generate(model, [p], pad_id=pad, eos_ids=eos, max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert batched == [_argmax_loop(model, p, 8, eos) for p in prompts]
    assert len({tuple(b) for b in batched}) == len(prompts)  # order restored, not a shared answer


def test_checkpoint_generation_config_cannot_alter_greedy(model, tok, prompts, capfd):
    # Checkpoints ship sampling and penalty settings; greedy evaluation must ignore them, quietly.
    saved = copy.deepcopy(model.generation_config)
    gc = model.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 0.2, 0.9
    gc.repetition_penalty, gc.no_repeat_ngram_size = 1.5, 2
    gc.eos_token_id = [tok.eos_token_id, 5]
    try:
        eos = {tok.eos_token_id}
        out = greedy_generate(model, prompts, pad_id=tok.pad_token_id, eos_ids=eos, max_new_tokens=6, batch_size=2)
        assert out == [_argmax_loop(model, p, 6, eos) for p in prompts]
        assert stop_token_ids(model, tok) == {tok.eos_token_id, 5}
    finally:
        model.generation_config = saved
    err = capfd.readouterr().err
    assert "do_sample" not in err and "temperature" not in err


def test_max_new_tokens_bound(model, tok, prompts):
    out = greedy_generate(model, prompts, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=3)
    assert [len(o) for o in out] == [3] * len(prompts)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, prompts, pad_id=0, eos_ids=[2], max_new_tokens=0)


def test_stops_at_eos_and_strips_it(model, tok, prompts):
    free = greedy_generate(model, prompts, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=8)
    stop = free[0][3]  # a token the first prompt produces mid-way becomes a stop token
    eos = {tok.eos_token_id, stop}
    out = greedy_generate(model, prompts, pad_id=tok.pad_token_id, eos_ids=eos, max_new_tokens=8, batch_size=2)
    for full, cut in zip(free, out):
        expected = full[: full.index(stop)] if stop in full else full
        assert cut == expected
    assert len(out[0]) <= 3


def test_autocast_runs_and_keeps_mode(model, tok, prompts):
    model.train()
    out = greedy_generate(
        model, prompts, pad_id=tok.pad_token_id, eos_ids=[tok.eos_token_id], max_new_tokens=4,
        autocast_dtype=torch.bfloat16,
    )
    assert model.training  # caller's mode restored
    model.eval()
    assert len(out) == len(prompts) and all(len(o) <= 4 for o in out)
