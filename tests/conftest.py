"""Shared fixtures."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """The machine has 2 shared cores; one intra-op thread is much faster than two fighting.
    Test files that run training use it for every test (`pytestmark`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
