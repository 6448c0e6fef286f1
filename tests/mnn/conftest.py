import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Small problems: thread start-up costs more than it saves, and CI has 2 cores.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
