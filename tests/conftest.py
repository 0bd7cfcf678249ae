"""Test-wide settings."""

import pytest
import torch

DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run fastest on one thread: their ops are too small to split,
    and a second OpenMP thread only adds synchronisation. Real-model tests
    (marked slow) keep torch's default."""
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1)
    yield
