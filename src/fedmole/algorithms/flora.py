"""FLoRA: stack the clients' LoRA modules, merge the exact weighted sum into the base, restart.

Wang, Shen, Zheng, Chen, Gu, Lin, Zhang, Yuan. "FLoRA: Federated Fine-Tuning
Large Language Models with Heterogeneous Low-Rank Adaptations", NeurIPS 2024
(arXiv:2409.05976).

Server, per module: A_s = [A_1; ...; A_n] (R x d_in), B_s = [p_1 (alpha/r_1) B_1,
..., p_n (alpha/r_n) B_n] (d_out x R), p_i = |D_i| / sum |D|, so
B_s A_s = sum_i p_i (alpha/r_i) B_i A_i exactly, for any mix of ranks. The
product is merged into the frozen base weights and every client starts the
next round from a fresh LoRA (new random A, B = 0).

Server state (checkpointed): the accumulated merged dW per LoRA pair `p` (a
module, or `<block>.gate_up` / `<block>.down` for the experts of a sparse MoE
base, where dW is stacked over experts), the last round's stack and which
merge version each client's base is known to hold. A client one merge behind
gets the stack (`<p>.stack_A`, `<p>.stack_B`); one further behind (it missed
rounds, or its reply was rejected) gets the whole merged dW (`<p>.merged`),
which it installs instead. A client keeps its merged base delta in its store
(what a real client's merged weights would hold; clients of one process that
reach the same merge version share one copy, since it is the same tensor, and
in the local engine that copy is the server's own merged dW).
Global evaluation uses the server's merged base with the fresh LoRA (B = 0);
personalised evaluation, the client's own base with the LoRA it trained on it.
An evaluated state carries its base as `<p>.merged` keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedmole.adapters.inject import split_key
from fedmole.adapters.lora import LoRAAdapter, init_lora_A, is_lora_A, pair_keys
from fedmole.algorithms.aggregate import State
from fedmole.algorithms.base import ClientRuntime
from fedmole.algorithms.lora_common import LoRAMethod, stack_lora
from fedmole.messages import Instruction, Reply

BASE_TENSORS = ("stack_A", "stack_B", "merged")  # base-update keys an instruction may carry


@dataclass
class FLoRAOptions:
    """Options of FLoRA (`[flora]` table); it has none beyond [adapter] and [fed]."""


def fresh_lora(shapes: Mapping[str, tuple[int, ...]], seed: int, rnd: int) -> State:
    """A new LoRA init for round rnd + 1: A ~ LoRA's uniform init (seeded by seed and round), B = 0."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rnd)
    out: State = {}
    for key in sorted(shapes):  # draw order independent of the dict's order (checkpoints sort keys)
        shape, name = shapes[key], split_key(key)[1]
        out[key] = init_lora_A(shape[-2], shape[-1], gen, lead=tuple(shape[:-2])) if is_lora_A(name) \
            else torch.zeros(shape)
    return out


def merge_stacks(merged: Mapping[str, torch.Tensor], stacks: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """merged[p] + B_s A_s per LoRA pair (float32), from zeros (shape (..., d_out, d_in)) for new pairs."""
    out = {}
    for module, (A_s, B_s) in stacks.items():
        base = merged.get(module)
        base = torch.zeros(shapes[module], dtype=torch.float64) if base is None else base.to(torch.float64)
        out[module] = (base + B_s.to(torch.float64) @ A_s.to(torch.float64)).to(torch.float32)
    return out


def base_update_kind(version: int, update: State, target: int) -> str:
    """How a client at merge `version` reaches `target` with `update`: "current" (nothing to do),
    "replace" (the update carries the whole dW) or "merge" (one stack, from target - 1); raise
    when it cannot."""
    if version == target:
        return "current"
    if any(k.endswith(".merged") for k in update):
        return "replace"
    stacks = any(k.endswith(".stack_A") for k in update)
    if stacks and version == target - 1:
        return "merge"
    raise RuntimeError(f"FLoRA base out of sync: client holds merge version {version}, server is at {target}, "
                       f"and the update carries {'one merge' if stacks else 'nothing'}")


def apply_base_update(base: dict, version: int, update: State, target: int) -> tuple[dict, int]:
    """Client side: bring (merged delta per module, version) to `target` with the update sent.

    `update` holds `<m>.merged` (the whole dW: replace), or `<m>.stack_A`/`<m>.stack_B`
    (one merge: add, valid only from version target - 1), or nothing (already current).
    """
    kind = base_update_kind(version, update, target)
    if kind == "current":
        return base, version
    if kind == "replace":
        merged = {split_key(k)[0]: v for k, v in update.items() if k.endswith(".merged")}
        return {m: v.to(torch.float32).clone() for m, v in merged.items()}, target
    stacks = {split_key(k)[0] for k in update if k.endswith(".stack_A")}
    pairs = {m: (update[f"{m}.stack_A"], update[f"{m}.stack_B"]) for m in stacks}
    shapes = {m: (*B.shape[:-1], A.shape[-1]) for m, (A, B) in pairs.items()}
    return merge_stacks(base, pairs, shapes), target


class FLoRA(LoRAMethod):
    """FLoRA (Wang et al., NeurIPS 2024, arXiv:2409.05976): stacked heterogeneous LoRA modules,
    exact weighted sum merged into the base each round, fresh LoRA after."""

    name = "flora"
    Options = FLoRAOptions
    keep_optimizer_refused = ("every round starts a fresh LoRA on a newly merged base, so last round's moments "
                              "describe tensors that no longer exist")

    def __init__(self, options, adapter: LoRAAdapter, tiers: list[int], seed: int):
        super().__init__(options, adapter, tiers, seed)
        self.dims = {p: (*self.shapes[b][:-1], self.shapes[a][-1])
                     for p, (a, b) in pair_keys(self.shapes).items()}  # pair -> (..., d_out, d_in)
        self.merged: dict[str, torch.Tensor] = {}  # pair -> accumulated dW (..., d_out, d_in)
        self.stack: State = {}  # the last merge: <p>.stack_A (..., R, d_in), <p>.stack_B (..., d_out, R)
        self._bases: dict[int, dict] = {}  # client side: merged base per version, shared by in-sync clients
        self.version = 0  # merges done
        self.synced = [0] * len(tiers)  # merge version each client's base is known to hold

    # -- server side ---------------------------------------------------------
    def configure(self, rnd: int, client_ids: list[int], global_state: State) -> list[Instruction]:
        out = []
        for c in client_ids:
            state = self.client_view(global_state, c)
            if self.synced[c] == self.version - 1:
                state.update(self.stack)
            elif self.synced[c] < self.version - 1:
                state.update({f"{m}.merged": d for m, d in self.merged.items()})
            out.append(Instruction(rnd, c, state, self.tiers[c], config={"base_version": self.version}))
        return out

    def aggregate(self, rnd: int, replies: list[Reply], previous: State) -> State:
        if not replies:
            return {k: v.clone() for k, v in previous.items()}
        for r in replies:  # an accepted reply was trained on the base this round's instructions named
            self.synced[r.client_id] = self.version
        stacks = stack_lora([r.state for r in replies], [r.num_examples for r in replies], self.alpha)
        # the float32 stacks the clients receive: merging the same ones makes the server's dW the
        # clients', bit for bit
        stacks = {m: (A_s.to(torch.float32), B_s.to(torch.float32)) for m, (A_s, B_s) in stacks.items()}
        self.merged = merge_stacks(self.merged, stacks, self.dims)
        self.stack = {}
        for m, (A_s, B_s) in stacks.items():
            self.stack[f"{m}.stack_A"] = A_s
            self.stack[f"{m}.stack_B"] = B_s
        self.version += 1
        return fresh_lora({k: tuple(v.shape) for k, v in previous.items()}, self.seed, rnd)

    def final_state(self, global_state: State) -> State:
        """The fresh LoRA plus every module's merged base delta: the whole trained update. The deltas
        are the server's own tensors (read-only: a merge replaces them, never writes into them)."""
        return {**global_state, **_merged_keys(self.merged)}

    def load_final_state(self, saved: State) -> State:
        """Take the merged base deltas back out of a saved final state; the rest is the global LoRA."""
        self.merged = {split_key(k)[0]: v.clone() for k, v in saved.items() if split_key(k)[1] == "merged"}
        return {k: v for k, v in saved.items() if split_key(k)[1] != "merged"}

    def state_dict(self) -> dict:
        return {"merged": dict(self.merged), "stack": dict(self.stack), "version": self.version,
                "synced": list(self.synced)}

    def load_state_dict(self, state: dict) -> None:
        self.merged = dict(state["merged"])
        self.stack = dict(state["stack"])
        self.version = int(state["version"])
        self.synced = [int(v) for v in state["synced"]]

    # -- client side ---------------------------------------------------------
    def client_update(self, rt: ClientRuntime, instruction: Instruction) -> Reply:
        update = {k: v for k, v in instruction.state.items() if split_key(k)[1] in BASE_TENSORS}
        target, held = instruction.config["base_version"], rt.store.get("base_version", 0)
        kind = base_update_kind(held, update, target)  # raises when the client cannot follow
        if target and target == self.version and self._sent_by_server(update, kind):
            # this process's server made merge `target` and sent its own tensors unchanged: its dW
            # is, bit for bit, what the update builds (merge_stacks on the same float32 stacks
            # and base, or a copy of it), so share it, read-only
            base, version = self.merged, target
            self._bases = {}
        elif target in self._bases and kind != "replace":
            base, version = self._bases[target], target  # another client of this process built it already
        else:
            base, version = apply_base_update(rt.store.get("merged", {}), held, update, target)
            self._bases = {version: base}  # older versions are no longer sent
        rt.store["merged"], rt.store["base_version"] = base, version
        rt.adapter.set_merged(base)
        lora = {k: v for k, v in instruction.state.items() if k not in update}
        state, loss = self.train_view(rt, lora, instruction.tier, instruction.round)
        self.keep_personal(rt, state)
        return Reply(instruction.round, rt.client_id, state, len(rt.data.train), instruction.tier, loss)

    def _sent_by_server(self, update: State, kind: str) -> bool:
        """Whether `update` holds this instance's own server tensors (not a re-encoded copy, which a
        transport's payload dtype may have rounded)."""
        if kind == "current":
            return True
        own = self.stack if kind == "merge" else _merged_keys(self.merged)
        return bool(update) and all(own.get(k) is v for k, v in update.items())

    def global_view(self, rt: ClientRuntime, global_state: State, tier: int) -> State:
        """What `final_state` holds, at the tier's rank: the fresh LoRA and the merged base deltas. The
        deltas come with the state, not from this instance, because a Flower node's method never aggregates."""
        lora = {k: v for k, v in global_state.items() if split_key(k)[1] != "merged"}
        merged = {k: v for k, v in global_state.items() if split_key(k)[1] == "merged"}
        return {**super().global_view(rt, lora, tier), **merged}

    def evaluated_state(self, rt: ClientRuntime, global_state: State, tier: int | None = None) -> State:
        state = super().evaluated_state(rt, global_state, tier)
        if self.protocol == "personalized" and "personal" in rt.store:  # the base it trained on
            state = {**state, **_merged_keys(rt.store.get("merged", {}))}
        return state

    def load_view(self, rt: ClientRuntime, state: State, tier: int | None = None) -> int:
        rt.adapter.set_merged({split_key(k)[0]: v for k, v in state.items() if split_key(k)[1] == "merged"})
        return super().load_view(rt, {k: v for k, v in state.items() if split_key(k)[1] != "merged"}, tier)


def _merged_keys(merged: Mapping[str, torch.Tensor]) -> State:
    return {f"{m}.merged": d for m, d in merged.items()}
