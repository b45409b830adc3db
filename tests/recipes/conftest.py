"""Recipe smoke runs: tiny steps, where one intra-op thread beats two contended ones on shared CPUs."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
