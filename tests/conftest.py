import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: models at batch 2 gain nothing from more, and on a loaded 2-core machine two
    contending threads make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
