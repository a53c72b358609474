"""Helpers shared by the tests (importable from any test directory: ``tests`` is on pytest's ``pythonpath``)."""

from __future__ import annotations

import math
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
        raise FileNotFoundError(
            f"NT reference case {name} not found at {path}; it is committed with the tests "
            f"(regenerate with tests/data/make_nt_reference.py)."
        )
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def rel_err(a, b) -> float:
    """max |a - b| / max |b| (the parity measure used throughout)."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------------------------------------------
# independent numerical rules
# ---------------------------------------------------------------------------------------------------
_GL_T, _GL_W = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(40))


def angular_expectation(f, degree, q12, q11, q22):
    """``E[f(u) f(v)]`` for ``f`` positively homogeneous of ``degree`` (``f(t·x) = t^degree·f(x)``, t > 0).

    In polar coordinates ``u = √q11·r cos φ``, ``v = √q22·r cos(φ − θ)`` with ``θ = arccos ρ`` and
    ``E[r^(2n)] = 2^n n!``: ``E = (q11 q22)^(n/2)·2^n n!/(2π)·∫_0^{2π} f(cos φ) f(cos(φ − θ)) dφ``. The integral is
    split where either cosine vanishes (the kinks) and done by 40-node Gauss–Legendre per piece, where the
    integrand is a smooth trigonometric polynomial: exact to round-off.
    """
    q12, q11, q22 = torch.broadcast_tensors(q12, q11, q22)
    shape = q12.shape
    q12, q11, q22 = q12.reshape(-1), q11.reshape(-1), q22.reshape(-1)
    prod = torch.sqrt(q11 * q22)
    theta = torch.arccos((q12 / prod.clamp_min(1e-300)).clamp(-1, 1))[:, None]
    fixed = torch.tensor([0, math.pi / 2, 3 * math.pi / 2, 2 * math.pi], dtype=torch.float64).expand(len(q12), 4)
    moving = torch.remainder(torch.cat([theta + math.pi / 2, theta + 3 * math.pi / 2], 1), 2 * math.pi)
    bps = torch.sort(torch.cat([fixed, moving], 1), dim=1).values
    a, b = bps[:, :-1, None], bps[:, 1:, None]
    phi = (a + b) / 2 + (b - a) / 2 * _GL_T
    vals = f(torch.cos(phi)) * f(torch.cos(phi - theta[:, :, None]))
    integral = ((b - a) / 2 * _GL_W * vals).sum((1, 2))
    const = 2**degree * math.factorial(degree) / (2 * math.pi)
    return (prod**degree * const * integral).reshape(shape)


def derivative(f):
    def df(x):
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            return torch.autograd.grad(f(xx).sum(), xx)[0]

    return df


def random_triples(n=40, seed=0, lo=0.3, hi=2.0):
    """PSD ``(q12, q11, q22)`` with moderate variances, correlations in [−0.95, 0.95] plus ρ = ±1 and 0."""
    g = torch.Generator().manual_seed(seed)
    q11 = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    q22 = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    rho = 1.9 * torch.rand(n, generator=g, dtype=torch.float64) - 0.95
    rho[:3] = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    q22[:2] = q11[:2]
    return rho * torch.sqrt(q11 * q22), q11, q22
