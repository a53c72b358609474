"""Shared fixtures. Helpers (NT reference cases, ``rel_err``) are in ``helpers.py``."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import load_reference

# Each pytest-xdist worker gets one intra-op thread: with `-n 2` on two cores, two workers of two threads each
# oversubscribe the machine and small-tensor ops slow down many-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module, with or without xdist (two workers share two cores: one
    thread each avoids oversubscription). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def reference():
    return load_reference
