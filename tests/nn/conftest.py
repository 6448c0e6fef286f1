"""Shared settings for the torchmech.nn tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed, and one intra-op thread: these tests use tiny tensors, for which thread start-up and
    contention on a shared 2-core machine cost far more than they gain (restored afterwards)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
