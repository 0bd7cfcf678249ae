"""Local training of an adapter on one client's batches (the client step's inner loop)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedmole.adapters.inject import MoLEAdapter
from fedmole.data.tokenize import IGNORE_INDEX


def answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens, projecting only those positions.

    The vocabulary projection is ~20% of a small LM's FLOPs and the answer is a
    few tokens of a long prompt, so the head runs on the (n_answer, H) rows that
    have a label instead of all (B, T, H). Models whose head does more than a
    linear map (soft-capping, logit scaling) take the model's own loss.
    """
    cfg = model.config
    head = model.get_output_embeddings()
    if head is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return model(**batch, use_cache=False).loss
    hidden = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (B, T, H)
    labels = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    keep = labels != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep])  # (n_answer, V)
    return F.cross_entropy(logits.float(), labels[keep])


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@dataclass
class LocalTrainer:
    """Adam(W) on the adapter tensors; loss on answer tokens plus the load-balancing loss.

    `optimizer` is `adamw` (decoupled weight decay) or `adam` (weight decay as an L2
    term; FedAMoLE's official recipe, with eps 1e-6). Round t trains at
    lr * lr_decay^(t-1), the same schedule for every method; the rate is set after
    restoring kept optimizer moments, whose saved state would otherwise bring back the
    rate of the round that saved them. Learned tier rescalers get their own parameter
    group (`rescale_lr`, decayed alike, no weight decay): each is one scalar per tier
    and module, which at the LoRA rate moves by well under 1% in a short local budget,
    and decay would pull it towards 0 instead of its k_ref/k start. `grad_clip` = 0
    leaves the gradients unclipped.

    `keep_optimizer` (train.optimizer_state = keep) carries a client's Adam(W) moments from one
    round's local training to its next, through the client's store; otherwise every round
    starts a fresh optimizer (reset, as FedIT, FedAMoLE's code and FlowerTune do).

    Every optimizer step's wall time (batch to device, forward, backward, clip, step) is
    appended to `step_seconds`, which the engine empties before each client step and reads
    after it. `dataclasses.replace` copies share the list, so their steps are counted too.
    """

    steps: int
    lr: float
    weight_decay: float
    grad_clip: float
    aux_weight: float
    device: torch.device
    autocast_dtype: torch.dtype | None = None
    rescale_lr: float | None = None  # None: the LoRA rate
    keep_optimizer: bool = False
    optimizer: str = "adamw"
    eps: float = 1e-8
    lr_decay: float = 1.0
    step_seconds: list[float] = field(default_factory=list, repr=False, compare=False)

    def round_lr(self, rnd: int) -> tuple[float, float]:
        """(adapter rate, rescaler rate) of round `rnd` (1-based)."""
        factor = self.lr_decay ** (rnd - 1)
        return self.lr * factor, (self.rescale_lr or self.lr) * factor

    def train(self, adapter: MoLEAdapter, batches, k: int, store: dict, *, rnd: int, params=None) -> float:
        """Run `steps` optimizer steps of round `rnd` with k active experts; return the mean loss.

        `store` is the client's persistent dict: with `keep_optimizer`, its optimizer state is
        restored from and saved to `store["optimizer"]`. `params` restricts training to a
        subset of the adapter tensors (default: all).
        """
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        params = list(adapter.parameters()) if params is None else list(params)
        rescalers = {id(p) for p in adapter.rescale_parameters()}
        lr, rescale_lr = self.round_lr(rnd)
        groups = [{"params": [p for p in params if id(p) not in rescalers], "lr": lr}]
        scales = [p for p in params if id(p) in rescalers]
        if scales:
            groups.append({"params": scales, "lr": rescale_lr, "weight_decay": 0.0})
        optimizer = OPTIMIZERS[self.optimizer](groups, lr=lr, eps=self.eps, weight_decay=self.weight_decay)
        if self.keep_optimizer and "optimizer" in store:
            optimizer.load_state_dict(store["optimizer"])
            for group, rate in zip(optimizer.param_groups, (lr, rescale_lr)):
                group["lr"], group["eps"] = rate, self.eps
        model = adapter.model
        model.train()
        total = 0.0
        try:
            for _ in range(self.steps):
                started = time.perf_counter()
                batch = {name: t.to(self.device) for name, t in batches.next().items()}
                with adapter.route(k, token_mask=batch["attention_mask"], collect=True):
                    with autocast_context(self.device, self.autocast_dtype):
                        lm_loss = answer_loss(model, batch)
                    loss = lm_loss.float() + self.aux_weight * adapter.aux_loss().float()
                loss.backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += float(lm_loss.detach())
                if self.device.type == "cuda":  # the step's kernels run asynchronously; time them whole
                    torch.cuda.synchronize(self.device)
                self.step_seconds.append(time.perf_counter() - started)
        finally:
            model.eval()
        if self.keep_optimizer:
            store["optimizer"] = optimizer.state_dict()
        return total / self.steps
