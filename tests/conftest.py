"""Shared fixtures: NT 0.6.5 reference cases (../shared/reference, or $NTKIT_REFERENCE_DIR)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

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


REPO = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("NTKIT_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def load_reference(name: str) -> dict:
    """Arrays of one NT reference case; skips the test when the reference folder is absent."""
    path = REFERENCE_DIR / "cases" / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"NT reference case {name} not found under {REFERENCE_DIR}")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the parity measure used throughout)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture
def reference():
    return load_reference
