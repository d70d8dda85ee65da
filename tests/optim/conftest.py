"""Optimizer tests run single-threaded: their tensors are small, and on a loaded 2-core machine every
OpenMP-parallel op otherwise waits ~10 ms for a descheduled second thread (50x slower in total)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
