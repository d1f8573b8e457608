"""Every models test runs on one torch thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread per test is faster and steadier
    yield
    torch.set_num_threads(threads)
