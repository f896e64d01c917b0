import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Unit tests use tiny tensors: one thread is faster than two on a shared 2-core machine (no sync per op)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
