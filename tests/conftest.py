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


@pytest.fixture(autouse=True, scope="session")
def gemm_choices_in_a_temporary_folder(tmp_path_factory):
    """The tests' measured GEMM engine choices (`swinkit.onednn.engine`) go to a folder of their own,
    not the user's cache (child processes inherit it)."""
    import os
    folder = tmp_path_factory.mktemp("gemm_choices")
    previous = os.environ.get("SWINKIT_CACHE_DIR")
    os.environ["SWINKIT_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("SWINKIT_CACHE_DIR", None)
    else:
        os.environ["SWINKIT_CACHE_DIR"] = previous
