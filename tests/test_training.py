"""The answer-only loss equals the model's own causal-LM loss."""

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
