"""Instruction / Reply / evaluation <-> Flower records.

Every fedmole message travels as a `RecordDict`:

    train      "state" ArrayRecord, "instruction" ConfigRecord, "fedmole" ConfigRecord (resolved config)
    reply      "state", "extra", "counts" ArrayRecords, "reply" ConfigRecord, "metrics" MetricRecord
    evaluate   "state" ArrayRecord, "evaluate" ConfigRecord, "fedmole" ConfigRecord
    result     "evaluate" ConfigRecord, "metrics" MetricRecord

Tensors keep their dtype and bytes exactly (numpy encoding, as Flower's own
`Array(torch_tensor)`; raw bytes for bfloat16, which numpy lacks). With
`payload_dtype = "bfloat16"` the float32 adapter tensors of a payload are
narrowed to bfloat16 for the wire and widened back on arrival; counts, token
totals and method extras always travel at full precision. Byte counts follow
`fedmole.messages.state_nbytes`: the tensor payload as sent.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmole.config import Config, load_config
from fedmole.messages import Instruction, Reply, State

PAYLOAD_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RAW_STYPE = "fedmole.raw"  # little-endian bytes of a contiguous tensor
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


class RecordError(ValueError):
    """A message does not hold the records fedmole expects."""


# -- tensors -------------------------------------------------------------------------


def tensor_to_array(t: torch.Tensor) -> Array:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return Array(dtype="bfloat16", shape=tuple(t.shape), stype=RAW_STYPE, data=data)
    return Array(t.numpy())


def array_to_tensor(a: Array) -> torch.Tensor:
    if a.stype == RAW_STYPE:
        if a.dtype not in _TORCH_DTYPES:
            raise RecordError(f"unknown tensor dtype {a.dtype!r}")
        flat = torch.frombuffer(bytearray(a.data), dtype=_TORCH_DTYPES[a.dtype]) if a.data else \
            torch.empty(0, dtype=_TORCH_DTYPES[a.dtype])
        return flat.reshape(a.shape)
    return torch.from_numpy(np.array(a.numpy(), copy=True))


def wire_dtype(payload_dtype: str) -> torch.dtype:
    if payload_dtype not in PAYLOAD_DTYPES:
        raise ValueError(f"payload_dtype = {payload_dtype!r}; allowed: {', '.join(PAYLOAD_DTYPES)}")
    return PAYLOAD_DTYPES[payload_dtype]


def _narrows(t: torch.Tensor, wire: torch.dtype) -> bool:
    return t.dtype == torch.float32 and wire != torch.float32


def state_to_record(state: State, payload_dtype: str = "float32") -> tuple[ArrayRecord, dict[str, str]]:
    """An ArrayRecord of `state` with float32 tensors narrowed to the payload dtype,
    and {key: original dtype} of the narrowed keys (to widen them back)."""
    wire = wire_dtype(payload_dtype)
    record, narrowed = ArrayRecord(), {}
    for key, t in state.items():
        if _narrows(t, wire):
            narrowed[key] = "float32"
            t = t.to(wire)
        record[key] = tensor_to_array(t)
    return record, narrowed


def record_to_state(record: ArrayRecord, narrowed: dict[str, str] | None = None) -> State:
    narrowed = narrowed or {}
    out = {}
    for key, a in record.items():
        t = array_to_tensor(a)
        out[key] = t.to(_TORCH_DTYPES[narrowed[key]]) if key in narrowed else t
    return out


def payload_nbytes(state: State, payload_dtype: str = "float32") -> int:
    """Bytes `state` occupies on the wire at `payload_dtype` (raw tensor payload)."""
    wire = wire_dtype(payload_dtype)
    size = torch.empty((), dtype=wire).element_size()
    return sum(t.numel() * (size if _narrows(t, wire) else t.element_size()) for t in state.values())


def reply_payload_nbytes(reply: Reply, payload_dtype: str = "float32") -> int:
    """`fedmole.engine.local.reply_nbytes` at the payload dtype: state narrowed, the rest as is."""
    counts = sum(c.numel() * c.element_size() for c in reply.expert_counts.values())
    extra = sum(t.numel() * t.element_size() for t in reply.extra.values())
    return payload_nbytes(reply.state, payload_dtype) + extra + counts


# -- the resolved config ----------------------------------------------------------------


def config_to_text(cfg: Config) -> str:
    import tomli_w

    def clean(v):  # TOML has no null
        return {k: clean(x) for k, x in v.items() if x is not None} if isinstance(v, dict) else v

    return tomli_w.dumps(clean(cfg.to_dict()))


def config_from_text(text: str, overrides: list[str] | tuple = ()) -> Config:
    """Load (and validate) a config from its TOML text, with `key=value` overrides."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        return load_config(path, overrides)


def config_record(text: str) -> ConfigRecord:
    return ConfigRecord({"config": text, "config-sha256": hashlib.sha256(text.encode()).hexdigest()})


def read_config_record(content: RecordDict) -> tuple[str, str]:
    """(config TOML text, its sha256) carried by a message."""
    rec = _get(content, "fedmole", ConfigRecord)
    return str(rec["config"]), str(rec["config-sha256"])


# -- messages ---------------------------------------------------------------------------


def _get(content: RecordDict, key: str, kind: type):
    if key not in content or not isinstance(content[key], kind):
        raise RecordError(f"message has no {kind.__name__} {key!r} (has {sorted(content)})")
    return content[key]


def instruction_content(ins: Instruction, payload_dtype: str, config_text: str) -> RecordDict:
    state, narrowed = state_to_record(ins.state, payload_dtype)
    meta = ConfigRecord({
        "round": ins.round, "client-id": ins.client_id, "tier": ins.tier,
        "config": json.dumps(ins.config), "narrowed": json.dumps(narrowed), "payload-dtype": payload_dtype,
    })
    return RecordDict({"state": state, "instruction": meta, "fedmole": config_record(config_text)})


def read_instruction(content: RecordDict) -> tuple[Instruction, str]:
    """The Instruction and the payload dtype its sender used (the reply goes back the same way)."""
    meta = _get(content, "instruction", ConfigRecord)
    state = record_to_state(_get(content, "state", ArrayRecord), json.loads(meta["narrowed"]))
    ins = Instruction(int(meta["round"]), int(meta["client-id"]), state, int(meta["tier"]), json.loads(meta["config"]))
    return ins, str(meta["payload-dtype"])


def reply_content(reply: Reply, payload_dtype: str) -> RecordDict:
    state, narrowed = state_to_record(reply.state, payload_dtype)
    extra, _ = state_to_record(reply.extra)
    counts, _ = state_to_record(reply.expert_counts)
    meta = ConfigRecord({
        "round": reply.round, "client-id": reply.client_id, "tier": reply.tier,
        "tokens": json.dumps(reply.tokens), "metrics": json.dumps(reply.metrics), "narrowed": json.dumps(narrowed),
    })
    metrics = MetricRecord({"num-examples": reply.num_examples, "train-loss": float(reply.train_loss)})
    return RecordDict({"state": state, "extra": extra, "counts": counts, "reply": meta, "metrics": metrics})


def read_reply(content: RecordDict) -> Reply:
    meta = _get(content, "reply", ConfigRecord)
    metrics = _get(content, "metrics", MetricRecord)
    return Reply(
        round=int(meta["round"]),
        client_id=int(meta["client-id"]),
        state=record_to_state(_get(content, "state", ArrayRecord), json.loads(meta["narrowed"])),
        num_examples=metrics["num-examples"],
        tier=int(meta["tier"]),
        train_loss=float(metrics["train-loss"]),
        expert_counts=record_to_state(_get(content, "counts", ArrayRecord)),
        tokens=json.loads(meta["tokens"]),
        extra=record_to_state(_get(content, "extra", ArrayRecord)),
        metrics=json.loads(meta["metrics"]),
    )


@dataclass
class EvaluateRequest:
    round: int
    client_id: int
    state: State  # the global adapter state (Method.eval_view picks what the client uses)


def evaluate_content(req: EvaluateRequest, payload_dtype: str, config_text: str) -> RecordDict:
    state, narrowed = state_to_record(req.state, payload_dtype)
    meta = ConfigRecord({"round": req.round, "client-id": req.client_id, "narrowed": json.dumps(narrowed)})
    return RecordDict({"state": state, "evaluate": meta, "fedmole": config_record(config_text)})


def read_evaluate(content: RecordDict) -> EvaluateRequest:
    meta = _get(content, "evaluate", ConfigRecord)
    state = record_to_state(_get(content, "state", ArrayRecord), json.loads(meta["narrowed"]))
    return EvaluateRequest(int(meta["round"]), int(meta["client-id"]), state)


def result_content(name: str, result: dict) -> RecordDict:
    """One client's evaluation (`fedmole.engine.local.evaluate_client` output) as records."""
    meta = ConfigRecord({"name": name, "client-id": result["client_id"], "tier": result["tier"]})
    if "state_sha256" in result:  # personalised protocol: which of the node's own models was scored
        meta["state-sha256"] = str(result["state_sha256"])
    metrics = MetricRecord({"rouge-l": float(result["rouge_l"]), "exact-match": float(result["exact_match"]),
                            "n": int(result["n"]),
                            **({"accuracy": float(result["accuracy"])} if "accuracy" in result else {})})
    return RecordDict({"evaluate": meta, "metrics": metrics})


def read_result(content: RecordDict) -> tuple[str, dict]:
    meta = _get(content, "evaluate", ConfigRecord)
    m = _get(content, "metrics", MetricRecord)
    result = {"client_id": int(meta["client-id"]), "tier": int(meta["tier"]), "rouge_l": float(m["rouge-l"]),
              "exact_match": float(m["exact-match"]),
              **({"accuracy": float(m["accuracy"])} if "accuracy" in m else {}), "n": int(m["n"])}
    if "state-sha256" in meta:
        result["state_sha256"] = str(meta["state-sha256"])
    return str(meta["name"]), result
