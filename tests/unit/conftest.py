import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # Unit tests use tiny networks: a second intra-op thread only adds contention on a
    # shared 2-core machine (and makes timings of neighbouring processes noisier).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
