"""Fixtures shared by the benchmarks."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One thread for the module's benchmarks, as every cpu-suite run trains; the thread count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
