"""Build what a run needs from its config: device, precision, base model with
adapter, and client data (partitioned and split); a client's runtime (its data
tokenised into batches) is built only when it is opened (`Setup.runtime`, see
engine/clients.py)."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict

import numpy as np
import torch

from fedmole.adapters.inject import MoLEAdapter
from fedmole.algorithms import METHODS, Method
from fedmole.algorithms.base import ClientRuntime
from fedmole.adapters.moe_lora import is_moe_model
from fedmole.assets import model_kind
from fedmole.config import Config, assign_tiers, check_adapter_options, eval_protocol
from fedmole.data import partition as partitioning
from fedmole.data.splits import build_clients
from fedmole.data.summary import data_summary
from fedmole.data.synthetic import synthetic_examples
from fedmole.data.tokenize import TrainBatches, collate_train, encode_prompt, encode_train
from fedmole.data.types import ClientData, Example
from fedmole.engine.clients import clients_per_round
from fedmole.models import load_base
from fedmole.training import LocalTrainer

log = logging.getLogger("fedmole")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    return torch.device(name)


def pick_autocast(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the hardware runs it natively (AVX512-BF16/AMX CPUs, bf16 GPUs)."""
    if mode == "off":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False
    )()
    return torch.bfloat16 if native else None


def load_examples_for(cfg: Config) -> list[Example]:
    d = cfg.data
    if d.source == "synthetic":
        return synthetic_examples(d.tasks or None, per_task=d.max_per_task or 64, seed=cfg.run.seed)
    from fedmole.data.sources import load_examples

    tasks = d.tasks or None
    if d.partition == "task" and tasks is None and d.source == "natural-instructions":
        tasks = _pick_ni_tasks(d.num_clients, cfg.run.seed)
    return load_examples(
        d.source, tasks=tasks, max_per_task=d.max_per_task or None, seed=cfg.run.seed,
        instruction_mode=d.instruction_mode,
    )


def _pick_ni_tasks(n: int, seed: int) -> list[str]:
    """A seeded choice of n Natural Instructions subtasks (loads only those files)."""
    import json

    from fedmole.assets import prepare_natural_instructions

    index = json.loads((prepare_natural_instructions() / "index.json").read_text())
    names = sorted(index if isinstance(index, dict) else [t["task"] for t in index])
    rng = np.random.default_rng(seed)
    return [names[i] for i in sorted(rng.choice(len(names), size=n, replace=False))]


def partitions_for(cfg: Config) -> list[list[Example]]:
    """Every client's examples (before its train / aux / val / test split)."""
    return _partition(cfg, load_examples_for(cfg))


def _partition(cfg: Config, examples: list[Example]) -> list[list[Example]]:
    d, seed = cfg.data, cfg.run.seed
    if d.partition == "task":
        return partitioning.by_task(examples, d.num_clients, seed, tasks=d.tasks or None)
    if d.partition == "dirichlet":
        return partitioning.dirichlet(examples, d.num_clients, d.dirichlet_alpha, seed, min_size=d.min_client_size)
    return partitioning.iid(examples, d.num_clients, seed)


def build_client_data(cfg: Config) -> list[ClientData]:
    return load_clients(cfg, assign_tiers(cfg))[0]


def load_clients(cfg: Config, tiers: list[int], clients: list[ClientData] | None = None
                 ) -> tuple[list[ClientData], dict]:
    """Every client's splits and the summary's `data` block; rows that reach no client, or no
    split, are counted in a log line. `clients` given (a Flower site's own, or none for a
    server): only the summary is built."""
    d, seed = cfg.data, cfg.run.seed
    if clients is not None:
        rows = sum(len(c.train) + len(c.aux) + len(c.val) + len(c.test) for c in clients)
        return clients, data_summary(d.source, d.partition, rows, rows, clients, tiers)
    examples = load_examples_for(cfg)
    parts = _partition(cfg, examples)
    assigned = sum(len(p) for p in parts)
    if assigned < len(examples):
        log.info("the task partition (one task per client) leaves %d of %d rows unused: their tasks went to "
                 "no client", len(examples) - assigned, len(examples))
    clients = build_clients(
        parts, seed, val_frac=d.val_frac, test_frac=d.test_frac, aux_frac=d.aux_frac, aux_max=d.aux_max or None,
        max_train=d.max_train or None, max_val=d.max_val or None, max_test=d.max_test or None,
    )
    summary = data_summary(d.source, d.partition, len(examples), assigned, clients, tiers)
    if summary["rows_used"] < assigned:
        log.info("data.max_train = %d / data.max_test = %d leave %d of the clients' %d rows unused",
                 d.max_train, d.max_test, assigned - summary["rows_used"], assigned)
    return clients, summary


class Setup:
    """The frozen base model with its adapter, the clients' data and the method of one run.

    clients: the clients this process serves (default: every client, built from cfg.data);
    a Flower server passes none (it never loads client data), a site its own one. No client
    is tokenised here: `runtime` builds one when it is needed.
    """

    def __init__(self, cfg: Config, clients: list[ClientData] | None = None):
        seed_everything(cfg.run.seed)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.cfg = cfg
        self.device = pick_device(cfg.run.device)
        self.autocast = pick_autocast(cfg.run.autocast, self.device)
        self.tiers = assign_tiers(cfg)
        # data errors surface before the model loads
        self.clients, self.data_summary = load_clients(cfg, self.tiers, clients)
        self.client_data = {c.client_id: c for c in self.clients}
        self._encoded: OrderedDict[int, tuple[list, list]] = OrderedDict()  # see `encoded`
        self._encoded_kept = clients_per_round(cfg)
        self.model, self.tokenizer = load_base(cfg.model.name, seed=cfg.run.seed)
        if model_kind(cfg.model.name) is None:  # a hub model: only now is it known whether it is sparse
            check_adapter_options(cfg, moe=is_moe_model(self.model))
        method_cls = METHODS[cfg.run.method]
        self.adapter: MoLEAdapter = method_cls.build_adapter(
            self.model, cfg.adapter, cfg.run.seed, self.tiers, cfg.method_options()
        )
        self.model.to(self.device)
        self.model.eval()  # injected layers start in training mode; the trainer switches modes itself
        self.method: Method = method_cls(cfg.method_options(), self.adapter, self.tiers, cfg.run.seed)
        self.method.set_protocol(eval_protocol(cfg))
        if cfg.fed.robust == "trimmed_mean":
            self.method.trim = cfg.fed.trim_fraction
        self.trainer = LocalTrainer(
            steps=cfg.train.local_steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            grad_clip=cfg.train.grad_clip, aux_weight=cfg.adapter.aux_loss_weight,
            device=self.device, autocast_dtype=self.autocast, rescale_lr=cfg.train.rescale_lr,
            keep_optimizer=cfg.train.optimizer_state == "keep", optimizer=cfg.train.optimizer, eps=cfg.train.eps,
            lr_decay=cfg.train.lr_decay,
        )
        if self.clients:  # built one at a time, only if the method consumes them
            self.method.attach_clients(self.runtime(c.client_id) for c in self.clients)

    def runtime(self, client_id: int, train: bool = True) -> ClientRuntime:
        """A new runtime of client `client_id` with an empty store: its training and aux splits
        tokenised into batches, or (`train=False`, evaluation) none."""
        try:
            client = self.client_data[client_id]
        except KeyError:
            raise ValueError(f"this process has no client {client_id} (it serves {sorted(self.client_data)})"
                             ) from None
        tier = self.tiers[client_id]
        if not train:
            return ClientRuntime(client_id, tier, client, None, self.adapter, self.trainer)
        items, aux = self.encoded(client_id)
        bs, pad = self.cfg.train.batch_size, self.tokenizer.pad_token_id
        batches = TrainBatches(items, batch_size=bs, seed=self.cfg.run.seed * 1000 + client_id, pad_id=pad)
        aux_batches = [collate_train(aux[i : i + bs], pad) for i in range(0, len(aux), bs)]
        return ClientRuntime(client_id, tier, client, batches, self.adapter, self.trainer, aux_batches=aux_batches)

    def encoded(self, client_id: int) -> tuple[list, list]:
        """(training items, aux items) of a client, each item (input_ids, labels) as int32 arrays (T,).

        Tokenised when the client is first opened and kept for the last `clients_per_round`
        clients opened, so a client sampled round after round is not tokenised again, while
        memory follows the clients of a round, not the population."""
        if client_id in self._encoded:
            self._encoded.move_to_end(client_id)
            return self._encoded[client_id]
        d, client = self.cfg.data, self.client_data[client_id]

        def encode(ex: Example) -> tuple[np.ndarray, np.ndarray]:
            ids, labels = encode_train(self.tokenizer, ex, max_len=d.max_len, max_answer_tokens=d.max_answer_tokens,
                                       use_chat_template=d.chat_template)
            return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)

        self._encoded[client_id] = [encode(ex) for ex in client.train], [encode(ex) for ex in client.aux]
        while len(self._encoded) > self._encoded_kept:
            self._encoded.popitem(last=False)
        return self._encoded[client_id]

    def encode_prompt(self, ex: Example) -> list[int]:
        return encode_prompt(
            self.tokenizer, ex, max_prompt_tokens=self.cfg.eval.max_prompt_tokens,
            use_chat_template=self.cfg.data.chat_template,
        )


def describe_setup(setup: Setup, engine: str, run_dir) -> list[str]:
    """The console's start-up summary of a built run (see `fedmole.console.startup_lines`)."""
    from fedmole.console import startup_lines

    trainable = setup.adapter.num_parameters()
    total = sum(p.numel() for p in setup.model.parameters())
    precision = f"{str(setup.autocast).replace('torch.', '')} autocast" if setup.autocast else "float32"
    return startup_lines(
        method=setup.cfg.run.method, engine=engine, model=setup.cfg.model.name, base_params=total - trainable,
        trainable_params=trainable, device=str(setup.device), precision=precision, rounds=setup.cfg.run.rounds,
        run_dir=str(run_dir), data=setup.data_summary, tiered=setup.method.tiered,
    )
