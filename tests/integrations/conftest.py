"""Shared by the tests of tests/integrations."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is fastest, and on a shared 2-core machine a second thread that
    waits for a busy core makes every small matmul wait too (observed: 10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
