"""Records <-> fedmole messages and client state: exact at float32, narrowed at bfloat16."""

import pytest
import torch
from inprocess import wire

from fedmole.flower import serde
from fedmole.messages import Instruction, Reply, state_nbytes


def _state():
    g = torch.Generator().manual_seed(0)
    return {"m.lora_A": torch.randn(4, 2, 8, generator=g), "m.lora_B": torch.randn(4, 8, 2, generator=g),
            "m.rescale": torch.tensor([4.0, 2.0, 1.33, 1.0]), "m.steps": torch.arange(3),
            "m.mask": torch.tensor([True, False])}


def _equal(a, b):
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_float32_payloads_are_bit_exact_and_counted_like_the_local_engine():
    state = _state()
    record, narrowed = serde.state_to_record(state)
    assert narrowed == {}
    assert _equal(serde.record_to_state(wire({"s": record})["s"]), state)
    assert serde.payload_nbytes(state) == state_nbytes(state)


def test_bfloat16_payloads_narrow_only_float32_tensors_and_halve_their_bytes():
    state = _state()
    record, narrowed = serde.state_to_record(state, "bfloat16")
    assert set(narrowed) == {"m.lora_A", "m.lora_B", "m.rescale"}
    back = serde.record_to_state(wire({"s": record})["s"], narrowed)
    for k, t in state.items():
        assert back[k].dtype == t.dtype
        expected = t.to(torch.bfloat16).to(t.dtype) if k in narrowed else t
        assert torch.equal(back[k], expected)
    floats = sum(state[k].numel() * 4 for k in narrowed)
    assert serde.payload_nbytes(state, "bfloat16") == state_nbytes(state) - floats // 2
    with pytest.raises(ValueError, match="allowed: float32, bfloat16"):
        serde.state_to_record(state, "float16")


def test_instruction_and_reply_round_trip():
    ins = Instruction(3, 2, _state(), tier=2, config={"lr": 0.01, "note": "x"})
    back, dtype = serde.read_instruction(wire(serde.instruction_content(ins, "float32", "cfg = 1\n")))
    assert (back.round, back.client_id, back.tier, back.config, dtype) == (3, 2, 2, ins.config, "float32")
    assert _equal(back.state, ins.state)
    assert serde.read_config_record(wire(serde.instruction_content(ins, "float32", "cfg = 1\n")))[0] == "cfg = 1\n"

    reply = Reply(3, 2, _state(), num_examples=17, tier=2, train_loss=1 / 3,
                  expert_counts={"m": torch.tensor([5.0, 0.0, 3.0, 2.0])}, tokens={"m": 5.0},
                  extra={"m.client_emb": torch.randn(2)}, metrics={"seconds": 0.25})
    got = serde.read_reply(wire(serde.reply_content(reply, "bfloat16")))
    assert (got.round, got.client_id, got.num_examples, got.tier, got.train_loss, got.tokens, got.metrics) == \
        (3, 2, 17, 2, 1 / 3, {"m": 5.0}, {"seconds": 0.25})
    assert _equal(got.expert_counts, reply.expert_counts) and _equal(got.extra, reply.extra)  # never narrowed
    assert torch.equal(got.state["m.lora_A"], reply.state["m.lora_A"].to(torch.bfloat16).float())
    assert serde.reply_payload_nbytes(reply, "bfloat16") < serde.reply_payload_nbytes(reply, "float32")

    with pytest.raises(serde.RecordError, match="no ConfigRecord 'reply'"):
        serde.read_reply(wire(serde.instruction_content(ins, "float32", "")))
