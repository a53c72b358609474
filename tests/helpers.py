"""Helpers shared by the tests (importable from any test directory: ``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
#: NT 0.6.5 reference cases, committed with their generator (tests/data/make_nt_reference.py)
REFERENCE_DIR = REPO / "tests" / "data" / "nt"


def load_reference(name: str) -> dict:
    """Arrays of one NT reference case. A missing file is an error, never a skip: the cases are part of the
    repository (regenerate them with tests/data/make_nt_reference.py)."""
    path = REFERENCE_DIR / f"{name}.npz"
    if not path.exists():
        raise FileNotFoundError(f"NT reference case {name} not found at {path}; it is committed with the tests "
                                f"(regenerate with tests/data/make_nt_reference.py).")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the parity measure used throughout)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())
