"""Fold a trained adapter into the base weights: a standalone Hugging Face model, where the maths allows it.

- single LoRA (FedIT, HetLoRA, FlexLoRA, FLoRA, local, centralised):
  W = W0 (+ FLoRA's merged dW) + (alpha/r) B A at the exported tier's rank;
- LoRA on a sparse MoE base's experts at tier k: each expert's gate/up and
  down projections absorb their LoRA, the tier rescaler s_k is folded into
  the down projections (the block output is linear in them:
  s_k sum_j g_j W^d_j h_j = sum_j g_j (s_k W^d_j) h_j), a trained router
  replaces the base router, and `num_experts_per_tok` becomes k, so the
  model's own top-k routing does exactly what the adapter did.

Dense MoLE and FedAMoLE cannot be folded: their update depends on the input
through the routing gates (`MERGE_REFUSALS` says why, per kind).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from fedmole.adapters.lora import LoRAAdapter, LoRALinear
from fedmole.adapters.moe_lora import MoELoRABlock
from fedmole.export.native import ExportError, adapter_kind

MERGE_REFUSALS = {
    "mole": "a dense MoLE layer computes W0 x + s_k sum_j g_j(x) (alpha/r) B_j A_j x with gates g(x) that depend "
            "on each token, so no single weight matrix equals it",
    "amole": "FedAMoLE routes each token by the match of its keys A_j x with the query W_t x, so the mixture of "
             "experts changes with the input and no single weight matrix equals it",
}


def _lora_weight(layer: LoRALinear, rank: int) -> torch.Tensor:
    """The folded weight in the base layer's own layout (Conv1D stores d_in x d_out)."""
    w = layer.base_layer.weight.detach()  # already W0 + FLoRA's merged delta, when there is one
    delta = (layer.alpha / rank) * (layer.lora_B[:, :rank].double() @ layer.lora_A[:rank].double())  # (d_out, d_in)
    delta = delta if isinstance(layer.base_layer, nn.Linear) else delta.t()
    return (w.double() + delta).to(w.dtype)


def _moe_weights(block: MoELoRABlock, k: int) -> dict[str, torch.Tensor]:
    """Folded expert weights of one block at tier k: `experts.gate_up_proj`, `experts.down_proj`, `gate.weight`."""
    experts = block.experts
    gate_up = block.merged_weight("gate_up_proj").double() + block.scaling * torch.bmm(
        block.lora_gate_up_B.detach().double(), block.lora_gate_up_A.detach().double())  # (E, 2I, H)
    down = block.merged_weight("down_proj").double() + block.scaling * torch.bmm(
        block.lora_down_B.detach().double(), block.lora_down_A.detach().double())  # (E, H, I)
    down = down * float(block.rescale[k - 1].detach())
    out = {"experts.gate_up_proj": gate_up.to(experts.gate_up_proj.dtype),
           "experts.down_proj": down.to(experts.down_proj.dtype)}
    if block.router is not None:
        out["gate.weight"] = block.router.detach().to(block.gate.weight.dtype)
    return out


def merged_model(loaded) -> nn.Module:
    """A plain transformers model equal to the loaded run's model at its tier (`fedmole.inference.LoadedRun`)."""
    adapter, model, k = loaded.adapter, loaded.model, loaded.k
    kind = adapter_kind(adapter)
    if kind in MERGE_REFUSALS:
        raise ExportError(f"--merge is not possible for {loaded.cfg.run.method}: {MERGE_REFUSALS[kind]}; "
                          "export it with --format fedmole and load it with fedmole.load_adapter")
    state = model.state_dict()
    config = copy.deepcopy(model.config)
    for name, layer in adapter.layers.items():
        prefix = f"{name}."
        for key in [key for key in state if key.startswith(prefix)]:
            rest = key[len(prefix):]
            value = state.pop(key)
            if rest.startswith("base_layer."):
                state[prefix + rest[len("base_layer."):]] = value
            elif rest.split(".")[0] not in layer.adapter_names():
                state[key] = value
        if isinstance(adapter, LoRAAdapter):
            state[f"{prefix}weight"] = _lora_weight(layer, adapter.rank_of(k))
        else:
            state.update({prefix + key: value for key, value in _moe_weights(layer, k).items()})
    if kind == "moe-lora":
        config.num_experts_per_tok = k
    plain = type(model)(config)
    plain.load_state_dict(state, strict=True)
    plain.eval()
    return plain


def save_merged(loaded, out: str | Path) -> Path:
    """Write the merged model and the run's tokenizer as a Hugging Face checkpoint into `out`."""
    out = Path(out)
    plain = merged_model(loaded)
    plain.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
