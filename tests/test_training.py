"""Local training: the answer-only loss, the rescalers' own rate, and optimizer state across rounds."""

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
    trainer.train(adapter, _Batches(batch), k=1, store=store)
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
    for store in stores:
        trainer.train(adapter, _Batches(batch), k=2, store=store)
    return torch.cat([p.detach().flatten() for p in adapter.parameters()])


def test_reset_starts_every_round_afresh_and_keep_carries_the_moments():
    kept = {}
    with_reset, fresh = _trained(False, [kept, kept]), _trained(False, [{}, {}])
    assert torch.equal(with_reset, fresh) and kept == {}  # reset: round 2 = a fresh optimizer, nothing stored
    with_keep = _trained(True, [kept, kept])
    assert not torch.equal(with_keep, fresh)
    assert all(int(s["step"]) == 4 for s in kept["optimizer"]["state"].values())  # two rounds of two steps
