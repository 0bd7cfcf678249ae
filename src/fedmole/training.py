"""Local training of an adapter on one client's batches (the client step's inner loop)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fedmole.adapters.inject import MoLEAdapter


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class LocalTrainer:
    """AdamW on the adapter tensors; loss on answer tokens plus the load-balancing loss."""

    steps: int
    lr: float
    weight_decay: float
    grad_clip: float
    aux_weight: float
    device: torch.device
    autocast_dtype: torch.dtype | None = None

    def train(self, adapter: MoLEAdapter, batches, k: int, store: dict, params=None) -> float:
        """Run `steps` optimizer steps with k active experts; return the mean loss.

        `store` is the client's persistent dict: its optimizer state is restored
        from and saved to `store["optimizer"]`. `params` restricts training to a
        subset of the adapter tensors (default: all).
        """
        params = list(adapter.parameters()) if params is None else list(params)
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        if "optimizer" in store:
            optimizer.load_state_dict(store["optimizer"])
        model = adapter.model
        model.train()
        total = 0.0
        try:
            for _ in range(self.steps):
                batch = {name: t.to(self.device) for name, t in batches.next().items()}
                with adapter.route(k, token_mask=batch["attention_mask"], collect=True):
                    with autocast_context(self.device, self.autocast_dtype):
                        out = model(**batch)
                    loss = out.loss.float() + self.aux_weight * adapter.aux_loss().float()
                loss.backward()
                if self.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                total += float(out.loss.detach())
        finally:
            model.eval()
        store["optimizer"] = optimizer.state_dict()
        return total / self.steps
