"""Shared fixtures of the evaluation tests: a tiny tokenizer and a tiny Llama with varied outputs."""

import pytest
import torch

from fedmole.models import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny Llama with larger weights than the default init: the default makes a tied-embedding
    toy model echo its last token forever (hiding ordering bugs) and give every option about the
    same loss; larger weights give varied continuations and clearly different option losses."""
    model = tiny_llama(len(tok), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3, generator=gen)
    return model.eval()
