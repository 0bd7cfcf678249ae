"""A finished run, loaded for inference: the base model with the trained adapter in the
view one client or one tier is evaluated with, in eval mode (dropout off).

`load_run(RUN_DIR, client=..., tier=...)` rebuilds the base model and adapter
from the run's `config.toml`, loads `adapter.safetensors` (the method's final
state) and lets the method put in the weights it evaluates a client with
(`Method.eval_view`): under the global protocol, the global adapter at the
tier's k for FLAME, the tier's rank view for the LoRA baselines, the merged base
plus LoRA for FLoRA; under the personalised protocol (always for local and
FedAMoLE), the client's own model, read from `RUN_DIR/clients/`
(`fedmole.engine.personal`). `generate` and `evaluate` then run the same prompt
encoding (chat template, truncation) and greedy decoding as evaluation during
training.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedmole.adapters.inject import MoLEAdapter
from fedmole.adapters.lora import LoRAAdapter
from fedmole.algorithms import METHODS
from fedmole.algorithms.base import ClientRuntime, Method
from fedmole.config import Config, assign_tiers, eval_protocol, load_config
from fedmole.data.tokenize import encode_prompt
from fedmole.data.types import Example
from fedmole.evaluation.generate import greedy_generate, stop_token_ids
from fedmole.evaluation.predict import mean_scores, predict
from fedmole.messages import State
from fedmole.models import load_base

log = logging.getLogger("fedmole")


class RunError(ValueError):
    """A run directory cannot serve the request (unfinished run, unknown client or tier)."""


@dataclass
class ClientInfo:
    """One client of a run, as its summary names it."""

    client_id: int
    name: str
    tier: int


@dataclass
class LoadedRun:
    """Base model + trained adapter of one run, set to one view; `k` is the tier every forward uses."""

    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    tokenizer: object
    adapter: MoLEAdapter
    method: Method
    k: int
    client: ClientInfo | None
    extras: State = field(default_factory=dict)  # final-state tensors that are not adapter weights (FLoRA's merged)
    autocast: torch.dtype | None = None

    def encode(self, ex: Example) -> list[int]:
        """Prompt ids exactly as training and evaluation encode them."""
        return encode_prompt(self.tokenizer, ex, max_prompt_tokens=self.cfg.eval.max_prompt_tokens,
                             use_chat_template=self.cfg.data.chat_template)

    def generate(self, instruction: str, text_input: str = "", max_new_tokens: int | None = None) -> str:
        """The greedy answer to one prompt."""
        ex = Example(instruction, text_input, ("",))
        with self.adapter.route(self.k):
            (tokens,) = greedy_generate(
                self.model, [self.encode(ex)], pad_id=_pad_id(self.tokenizer),
                eos_ids=stop_token_ids(self.model, self.tokenizer),
                max_new_tokens=max_new_tokens or self.cfg.eval.max_new_tokens, autocast_dtype=self.autocast,
            )
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def evaluate(self, examples: list[Example], *, max_new_tokens: int | None = None,
                 batch_size: int | None = None, progress: bool = False) -> dict:
        """The run's own scoring: examples with `options` are answered by the option with the lowest LM
        loss (and also scored by accuracy), the others by greedy generation; ROUGE-L and exact match for
        all. Returns the mean scores, "n", "n_options" and the predictions in order."""
        with self.adapter.route(self.k):
            records = predict(
                self.model, self.tokenizer, examples, self.encode,
                max_new_tokens=max_new_tokens or self.cfg.eval.max_new_tokens,
                batch_size=batch_size or self.cfg.eval.batch_size, autocast_dtype=self.autocast, progress=progress,
            )
        result = mean_scores(records)
        result["n_options"] = sum(1 for ex in examples if ex.options)
        result["predictions"] = [r["prediction"] for r in records]
        return result


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def run_clients(run_dir: Path) -> list[ClientInfo]:
    """The clients of a finished run, from its summary (`data.clients`, else `per_client`)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    data = summary.get("data") or {}
    if data.get("clients"):
        return [ClientInfo(c["client_id"], c["name"], c["tier"]) for c in data["clients"]]
    return sorted((ClientInfo(c["client_id"], name, c["tier"]) for name, c in summary["per_client"].items()),
                  key=lambda c: c.client_id)


def find_client(clients: list[ClientInfo], wanted: str | int) -> ClientInfo:
    """A client by name or id; the error lists the clients there are."""
    for c in clients:
        if str(wanted) in (c.name, str(c.client_id)):
            return c
    listed = ", ".join(f"{c.client_id} ({c.name})" for c in clients)
    raise RunError(f"no client {wanted!r} in this run; clients: {listed}")


def check_run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise RunError(f"{run_dir} is not a run directory (no config.toml)")
    if not (run_dir / "summary.json").is_file() or not (run_dir / "adapter.safetensors").is_file():
        raise RunError(f"{run_dir} holds no finished run (no summary.json / adapter.safetensors); "
                       f"continue it with `fedmole resume {run_dir}`")
    return run_dir


def load_run(run_dir: str | Path, *, client: str | int | None = None, tier: int | None = None,
             device: str | None = None) -> LoadedRun:
    """Load a finished run for inference in the view of `client` (name or id) and/or `tier`.

    Global protocol: k = `tier`, else the client's tier, else the largest tier of the run;
    the weights are those a client of that tier is evaluated with. Personalised protocol
    (always for local and fedamole): `client` is needed and its own model is used. The
    model comes back in eval mode on `device` (default: the run's `run.device`).
    """
    from fedmole.engine.setup import pick_autocast, pick_device

    run_dir = check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.toml")
    clients = run_clients(run_dir)
    chosen = find_client(clients, client) if client is not None else None
    method_cls = METHODS[cfg.run.method]
    personalized = eval_protocol(cfg) == "personalized"
    if personalized and chosen is None:
        listed = ", ".join(f"{c.client_id} ({c.name})" for c in clients)
        raise RunError(f"this {cfg.run.method} run evaluated each client's own model: choose one with --client; "
                       f"clients: {listed}")

    model, tokenizer = load_base(cfg.model.name, seed=cfg.run.seed)
    tiers = assign_tiers(cfg)
    options = cfg.method_options()
    adapter = method_cls.build_adapter(model, cfg.adapter, cfg.run.seed, tiers, options)
    method = method_cls(options, adapter, tiers, cfg.run.seed)
    method.set_protocol(eval_protocol(cfg))
    saved = load_file(str(run_dir / "adapter.safetensors"))
    global_state = method.load_final_state(saved)  # also restores what final_state added (FlexLoRA's factors...)
    extras = {k: v for k, v in saved.items() if k not in global_state}
    # eval_view takes the final state, as the engines give it (FLoRA's merged deltas travel with it)

    if personalized:
        if tier is not None and tier != chosen.tier:
            raise RunError(f"this run evaluated client {chosen.name!r} with its own model at its tier "
                           f"{chosen.tier}; --tier {tier} does not apply")
        own = _client_state(run_dir, chosen)
        k = method.load_view(_runtime(chosen, adapter, {}), own)
        extras = {key: v for key, v in own.items() if key not in method.load_final_state(own)}
    else:
        k = tier if tier is not None else (chosen.tier if chosen else max(tiers))
        holder = chosen if chosen is not None and chosen.tier == k else next((c for c in clients if c.tier == k), None)
        if holder is not None:
            method.eval_view(_runtime(holder, adapter, {}), saved)
        elif isinstance(adapter, LoRAAdapter):
            raise RunError(f"no client of tier {k} in this run, so there is no rank view for it; "
                           f"tiers: {sorted(set(tiers), reverse=True)}")
        else:
            adapter.load_state_dict(global_state)
        _check_k(adapter, k)

    dev = pick_device(device or cfg.run.device)
    model.to(dev)
    model.eval()  # injected layers start in training mode; inference runs without dropout
    return LoadedRun(cfg, run_dir, model, tokenizer, adapter, method, k, chosen, extras,
                     autocast=pick_autocast(cfg.run.autocast, dev))


def _check_k(adapter: MoLEAdapter, k: int) -> None:
    if isinstance(adapter, LoRAAdapter):
        return
    limit = min(getattr(layer, "top_k", layer.num_experts) for layer in adapter.layers.values())
    if not 1 <= k <= limit:
        raise RunError(f"tier {k} is outside what this adapter runs: 1..{limit} experts per token")


def _runtime(client: ClientInfo, adapter: MoLEAdapter, store: dict) -> ClientRuntime:
    # eval_view reads only the id, tier, adapter and store of a runtime
    return ClientRuntime(client.client_id, client.tier, data=None, batches=None, adapter=adapter, trainer=None,
                         store=store)


def _client_state(run_dir: Path, client: ClientInfo) -> State:
    """The state `client` was evaluated with, from RUN_DIR/clients/."""
    from fedmole.engine.personal import load_client_state

    try:
        return load_client_state(run_dir, client.client_id)
    except FileNotFoundError:
        raise RunError(f"{run_dir} holds no adapter of client {client.name!r} under clients/ (a personalised run "
                       "keeps each client's model there; on the Flower engines it stays on the client's node)") from None


def read_examples(path: str | Path) -> list[Example]:
    """Examples of a JSONL / JSON / CSV file (the same reader and checks as training data)."""
    from fedmole.data.sources import read_file

    return read_file(path)


__all__ = ["LoadedRun", "RunError", "ClientInfo", "load_run", "run_clients", "find_client", "read_examples"]
