"""The one client/server message shape used by every engine.

The server sends each client an `Instruction` and gets back a `Reply`.
Both hold only plain values and name->tensor dicts, so any transport
(in-process calls, Flower messages) can carry them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

State = dict[str, torch.Tensor]


@dataclass
class Instruction:
    """What the server sends one client for one round."""

    round: int
    client_id: int
    state: State  # adapter tensors this client starts from (may be a subset)
    tier: int  # experts per token this client may activate (rank multiplier for LoRA baselines)
    config: dict = field(default_factory=dict)  # per-client scalars: local steps, lr, method options


@dataclass
class Reply:
    """What one client returns after local training."""

    round: int
    client_id: int
    state: State  # trained adapter tensors (same keys as sent, unless the method says otherwise)
    num_examples: int  # |D_i|, the client's training-set size
    tier: int
    train_loss: float
    # per adapted module: tokens routed to each expert (E,) and tokens seen (scalar)
    expert_counts: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, float] = field(default_factory=dict)
    extra: State = field(default_factory=dict)  # method-specific tensors (e.g. FedAMoLE embeddings)
    metrics: dict = field(default_factory=dict)  # scalars for logging (steps, seconds, ...)


def state_nbytes(state: State) -> int:
    """Bytes a state dict occupies on the wire (raw tensor payload)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def state_sha256(state: State) -> str:
    """Order-independent fingerprint of a state dict: names, dtypes, shapes and bytes."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
