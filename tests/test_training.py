"""Local training: the answer-only loss, the rescalers' own rate, and optimizer state across rounds."""

import pytest
import torch

from fedmole.models import tiny_llama
from fedmole.training import answer_loss


def test_answer_loss_matches_the_models_loss():
    model = tiny_llama(320, seed=0)
    ids = torch.randint(0, 320, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0  # right padding
    labels = ids.clone()
    labels[:, :7] = -100  # prompt
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss)


class _Batches:
    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch


def _rescaler_run(rescale_lr, weight_decay=0.0, steps=12):
    from fedmole.adapters.inject import MoLEConfig, inject_mole
    from fedmole.training import LocalTrainer

    model = tiny_llama(320, seed=0)
    adapter = inject_mole(model, MoLEConfig(num_experts=4, rank=2, dropout=0.0), k_max=4)
    with torch.no_grad():  # experts that already contribute, so the rescaler has a gradient
        for layer in adapter.layers.values():
            layer.lora_B.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 320, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    trainer = LocalTrainer(steps=steps, lr=1e-3, weight_decay=weight_decay, grad_clip=0.0, aux_weight=0.0,
                           device=torch.device("cpu"), rescale_lr=rescale_lr, keep_optimizer=True)
    start = torch.stack([layer.rescale.detach().clone() for layer in adapter.layers.values()])
    store = {}
    trainer.train(adapter, _Batches(batch), k=1, store=store, rnd=1)
    end = torch.stack([layer.rescale.detach() for layer in adapter.layers.values()])
    return start, end, store["optimizer"]["param_groups"]


def test_learned_rescalers_have_their_own_rate_and_no_weight_decay():
    start, slow, _ = _rescaler_run(rescale_lr=None)  # the LoRA rate: about 1% of the start at most
    assert ((slow - start)[:, 0].abs() / start[:, 0]).max() < 0.02
    _, fast, _ = _rescaler_run(rescale_lr=0.05)
    assert ((fast - start)[:, 0].abs() / start[:, 0]).max() > 0.05
    assert torch.equal(fast[:, 1:], start[:, 1:])  # only the trained tier's entry moves
    _, _, groups = _rescaler_run(rescale_lr=0.05, weight_decay=0.5, steps=1)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(1e-3, 0.5, 4 * 3), (0.05, 0.0, 4)]  # 2 layers x q, v


def _trained(keep: bool, stores: list[dict]) -> torch.Tensor:
    """The adapter after one round of two steps per store in `stores`, each round starting from the
    previous round's result; returns every adapter tensor, flattened."""
    from fedmole.adapters.inject import MoLEConfig, inject_mole
    from fedmole.training import LocalTrainer

    adapter = inject_mole(tiny_llama(320, seed=0), MoLEConfig(num_experts=4, rank=2, dropout=0.0), k_max=4)
    ids = torch.randint(0, 320, (4, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    trainer = LocalTrainer(steps=2, lr=1e-2, weight_decay=0.0, grad_clip=0.0, aux_weight=0.0,
                           device=torch.device("cpu"), keep_optimizer=keep)
    for rnd, store in enumerate(stores, start=1):
        trainer.train(adapter, _Batches(batch), k=2, store=store, rnd=rnd)
    return torch.cat([p.detach().flatten() for p in adapter.parameters()])


def test_reset_starts_every_round_afresh_and_keep_carries_the_moments():
    kept = {}
    with_reset, fresh = _trained(False, [kept, kept]), _trained(False, [{}, {}])
    assert torch.equal(with_reset, fresh) and kept == {}  # reset: round 2 = a fresh optimizer, nothing stored
    with_keep = _trained(True, [kept, kept])
    assert not torch.equal(with_keep, fresh)
    assert all(int(s["step"]) == 4 for s in kept["optimizer"]["state"].values())  # two rounds of two steps


def test_rates_decay_per_round_and_survive_restored_moments():
    from fedmole.training import LocalTrainer

    trainer = LocalTrainer(steps=1, lr=1e-3, weight_decay=0.0, grad_clip=0.0, aux_weight=0.0,
                           device=torch.device("cpu"), rescale_lr=0.05, lr_decay=0.5, optimizer="adam", eps=1e-6,
                           keep_optimizer=True)
    assert trainer.round_lr(1) == (1e-3, 0.05) and trainer.round_lr(3) == (0.25e-3, 0.0125)
    from fedmole.adapters.inject import MoLEConfig, inject_mole

    adapter = inject_mole(tiny_llama(320, seed=0), MoLEConfig(num_experts=4, rank=2, dropout=0.0), k_max=4)
    ids = torch.randint(0, 320, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    store = {}
    for rnd in (1, 2, 3):  # moments kept across rounds: the saved rate of round 1 must not come back
        trainer.train(adapter, _Batches(batch), k=2, store=store, rnd=rnd)
        assert [(g["lr"], g["eps"]) for g in store["optimizer"]["param_groups"]] == \
            [(1e-3 * 0.5 ** (rnd - 1), 1e-6), (0.05 * 0.5 ** (rnd - 1), 1e-6)]
    assert store["optimizer"]["param_groups"][0]["decoupled_weight_decay"] is False  # plain Adam, not AdamW
    _, _, groups = _rescaler_run(rescale_lr=0.05, steps=1)
    assert groups[0]["decoupled_weight_decay"] is True and groups[0]["eps"] == 1e-8  # the default: AdamW


def test_grad_clip_zero_never_clips(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with train.grad_clip = 0")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", refuse)
    _rescaler_run(rescale_lr=None, steps=2)  # grad_clip=0.0


@pytest.mark.parametrize("method", ["flame", "fedamole", "fedit", "hetlora", "flexlora", "flora", "local",
                                    "centralized"])
def test_every_method_trains_at_the_rate_of_the_round(method):
    """lr_decay is applied identically: every method's client step hands the trainer its round."""
    from fedmole.config import load_config
    from fedmole.engine.setup import Setup

    cfg = load_config("configs/tiny.toml", [f"method={method}", "train.local_steps=1", "data.max_per_task=24",
                                            "train.lr_decay=0.5", "run.progress=false"])
    setup = Setup(cfg)
    seen = []
    real = type(setup.trainer).train

    def spy(self, *args, rnd, **kwargs):
        seen.append((rnd, self.round_lr(rnd)[0]))
        return real(self, *args, rnd=rnd, **kwargs)

    type(setup.trainer).train = spy
    try:
        state = setup.method.initial_state(setup.adapter)
        rt = setup.runtime(0)
        for rnd in (1, 2, 3):
            (instruction,) = setup.method.configure(rnd, [0], state)
            setup.method.client_update(rt, instruction)
    finally:
        type(setup.trainer).train = real
    assert seen == [(1, 1e-2), (2, 5e-3), (3, 2.5e-3)]
