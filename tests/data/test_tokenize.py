"""Prompt encoding, answer-only labels, padding and resumable batches, on the
tiny byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from fedmole.data.tokenize import (
    IGNORE_INDEX,
    TrainBatches,
    collate_prompts,
    collate_train,
    encode_prompt,
    encode_train,
    prompt_messages,
)
from fedmole.data.types import Example
from fedmole.models import tiny_tokenizer

LONG_INSTRUCTION = "Definition: In this task you are given a question and you must write the answer. " * 8
EX = Example(LONG_INSTRUCTION, "What is the capital of France?", ("Paris", "paris"), "geo", "qa")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_messages():
    assert prompt_messages(Example("Do.", "this", ("x",))) == [{"role": "user", "content": "Do.\n\nthis"}]
    assert prompt_messages(Example("Do.", "", ("x",))) == [{"role": "user", "content": "Do."}]


def test_prompt_fits_matches_chat_template(tok):
    text = tok.apply_chat_template(prompt_messages(EX), tokenize=False, add_generation_prompt=True)
    assert encode_prompt(tok, EX, max_prompt_tokens=10_000) == ids(tok, text)
    plain = encode_prompt(tok, EX, max_prompt_tokens=10_000, use_chat_template=False)
    assert tok.decode(plain) == f"{EX.instruction}\n\n{EX.input}\n\nAnswer: "


def test_prompt_truncates_instruction_only(tok):
    full = encode_prompt(tok, EX, max_prompt_tokens=10_000)
    no_instruction = len(encode_prompt(tok, Example("", EX.input, ("x",)), max_prompt_tokens=10_000))
    for cap in (len(full) - 1, len(full) // 2, no_instruction + 20):
        out = encode_prompt(tok, EX, max_prompt_tokens=cap)
        assert len(out) == cap
        text = tok.decode(out)
        assert text.startswith("<|im_start|>user\nDefinition: In this task")
        assert text.endswith(f"\n\n{EX.input}<|im_end|>\n<|im_start|>assistant\n")  # input and cue intact


def test_prompt_cuts_input_end_when_instruction_is_gone(tok):
    framing = len(encode_prompt(tok, Example("", "", ("x",)), max_prompt_tokens=10_000))
    input_len = len(ids(tok, EX.input))
    out = encode_prompt(tok, EX, max_prompt_tokens=framing + input_len - 3)
    assert len(out) == framing + input_len - 3
    text = tok.decode(out)
    assert "Definition" not in text and "What is the capital" in text and "France?" not in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="too small"):
        encode_prompt(tok, EX, max_prompt_tokens=3)


def test_train_labels_mask_exactly_the_prompt(tok):
    for max_len in (400, 60, 30):
        input_ids, labels = encode_train(tok, EX, max_len=max_len)
        answer = ids(tok, "Paris") + [tok.eos_token_id]
        prompt = encode_prompt(tok, EX, max_prompt_tokens=max_len - len(answer))
        assert len(input_ids) == len(labels) <= max_len
        assert input_ids == prompt + answer  # full answer whatever the cap
        assert labels == [IGNORE_INDEX] * len(prompt) + answer


def test_train_answer_cap(tok):
    ex = Example("Repeat.", "", ("yes no " * 40,))
    input_ids, labels = encode_train(tok, ex, max_len=200, max_answer_tokens=10)
    kept = [t for t in labels if t != IGNORE_INDEX]
    assert kept == ids(tok, ex.outputs[0])[:10] + [tok.eos_token_id]
    plain_ids, plain_labels = encode_train(tok, ex, max_len=200, use_chat_template=False)
    assert tok.decode(plain_ids[: plain_labels.count(IGNORE_INDEX)]).endswith("Answer: ")
    with pytest.raises(ValueError, match="no room for a prompt"):
        encode_train(tok, ex, max_len=11, max_answer_tokens=10)


def test_padding_sides():
    batch = collate_train([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    prompts = collate_prompts([[5, 6, 7], [8]], pad_id=0)
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompts["input_ids"].dtype == torch.long


def _items(n):
    return [([i + 1] * (1 + i % 3), [i + 1] * (1 + i % 3)) for i in range(n)]


def _firsts(batch):
    return batch["input_ids"][:, 0].tolist()


def test_train_batches_epochs_and_determinism():
    a, b = TrainBatches(_items(10), 4, seed=7, pad_id=0), TrainBatches(_items(10), 4, seed=7, pad_id=0)
    assert a.batches_per_epoch == 3
    epoch0 = [_firsts(a.next()) for _ in range(3)]
    assert [len(x) for x in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(1, 11))
    epoch1 = [_firsts(a.next()) for _ in range(3)]
    assert sorted(sum(epoch1, [])) == list(range(1, 11)) and epoch1 != epoch0 and a.epoch == 1
    assert [_firsts(next(b)) for _ in range(6)] == epoch0 + epoch1
    assert _firsts(TrainBatches(_items(10), 4, seed=8, pad_id=0).next()) != epoch0[0]


@pytest.mark.parametrize("steps_before", [0, 2, 3, 5])
def test_train_batches_resume(steps_before):
    ref = TrainBatches(_items(10), 4, seed=1, pad_id=0)
    for _ in range(steps_before):
        ref.next()
    state = ref.state_dict()
    expected = [_firsts(ref.next()) for _ in range(7)]
    resumed = TrainBatches(_items(10), 4, seed=999, pad_id=0)
    resumed.load_state_dict(state)
    assert [_firsts(resumed.next()) for _ in range(7)] == expected
    with pytest.raises(ValueError, match="state is for 10 items"):
        TrainBatches(_items(9), 4, seed=1, pad_id=0).load_state_dict(state)
