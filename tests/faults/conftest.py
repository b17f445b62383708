"""Shared set-up of the fault tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _threads():
    """One intra-op thread: the fault tests fork and spawn processes, which must not oversubscribe the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
