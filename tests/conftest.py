"""Shared pytest set-up.

Every test uses tiny models, for which one intra-op thread is several times faster than many on a small shared
machine; the thread count is set once for the session here (and restored after it) instead of at import time in
individual test modules. Tests that need another count set it themselves and restore it.
"""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_intra_op_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
