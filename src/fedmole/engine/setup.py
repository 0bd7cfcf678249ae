"""Build what a run needs from its config: device, precision, base model with
adapter, client data (partitioned, split, tokenised) and client runtimes."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from fedmole.adapters.inject import MoLEAdapter
from fedmole.algorithms import METHODS, Method
from fedmole.algorithms.base import ClientRuntime
from fedmole.config import Config, assign_tiers
from fedmole.data import partition as partitioning
from fedmole.data.splits import build_clients
from fedmole.data.synthetic import synthetic_examples
from fedmole.data.tokenize import TrainBatches, collate_train, encode_prompt, encode_train
from fedmole.data.types import ClientData, Example
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
    d, seed = cfg.data, cfg.run.seed
    examples = load_examples_for(cfg)
    if d.partition == "task":
        return partitioning.by_task(examples, d.num_clients, seed, tasks=d.tasks or None)
    if d.partition == "dirichlet":
        return partitioning.dirichlet(examples, d.num_clients, d.dirichlet_alpha, seed, min_size=d.min_client_size)
    return partitioning.iid(examples, d.num_clients, seed)


def build_client_data(cfg: Config) -> list[ClientData]:
    d = cfg.data
    return build_clients(
        partitions_for(cfg), cfg.run.seed, val_frac=d.val_frac, test_frac=d.test_frac,
        max_train=d.max_train or None, max_test=d.max_test or None,
    )


class Setup:
    """The frozen base model with its adapter, the clients and the method of one run.

    clients: the clients this process serves (default: every client, built from cfg.data);
    a Flower server passes none (it never loads client data), a site its own one.
    """

    def __init__(self, cfg: Config, clients: list[ClientData] | None = None):
        seed_everything(cfg.run.seed)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.cfg = cfg
        self.device = pick_device(cfg.run.device)
        self.autocast = pick_autocast(cfg.run.autocast, self.device)
        self.tiers = assign_tiers(cfg)
        self.model, self.tokenizer = load_base(cfg.model.name, seed=cfg.run.seed)
        method_cls = METHODS[cfg.run.method]
        self.adapter: MoLEAdapter = method_cls.build_adapter(
            self.model, cfg.adapter, cfg.run.seed, self.tiers, cfg.method_options()
        )
        self.model.to(self.device)
        self.clients = build_client_data(cfg) if clients is None else clients
        self.method: Method = method_cls(cfg.method_options(), self.adapter, self.tiers, cfg.run.seed)
        if cfg.fed.robust == "trimmed_mean":
            self.method.trim = cfg.fed.trim_fraction
        self.trainer = LocalTrainer(
            steps=cfg.train.local_steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
            grad_clip=cfg.train.grad_clip, aux_weight=cfg.adapter.aux_loss_weight,
            device=self.device, autocast_dtype=self.autocast,
        )
        self.runtimes = [self._runtime(c) for c in self.clients]
        if self.runtimes:
            self.method.attach_clients(self.runtimes)

    def _runtime(self, client: ClientData) -> ClientRuntime:
        d = self.cfg.data
        items = [
            encode_train(self.tokenizer, ex, max_len=d.max_len, max_answer_tokens=d.max_answer_tokens,
                         use_chat_template=d.chat_template)
            for ex in client.train
        ]
        batches = TrainBatches(
            items, batch_size=self.cfg.train.batch_size, seed=self.cfg.run.seed * 1000 + client.client_id,
            pad_id=self.tokenizer.pad_token_id,
        )
        aux = [
            encode_train(self.tokenizer, ex, max_len=d.max_len, max_answer_tokens=d.max_answer_tokens,
                         use_chat_template=d.chat_template)
            for ex in client.aux
        ]
        bs = self.cfg.train.batch_size
        aux_batches = [collate_train(aux[i : i + bs], self.tokenizer.pad_token_id) for i in range(0, len(aux), bs)]
        return ClientRuntime(client.client_id, self.tiers[client.client_id], client, batches, self.adapter,
                             self.trainer, aux_batches=aux_batches)

    def encode_prompt(self, ex: Example) -> list[int]:
        return encode_prompt(
            self.tokenizer, ex, max_prompt_tokens=self.cfg.eval.max_prompt_tokens,
            use_chat_template=self.cfg.data.chat_template,
        )
