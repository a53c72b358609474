"""Reference kernels of torch's activations for tests/lift/test_lift_activations.py, by nested adaptive scipy
quadrature split at every kink (independent of ntkit's rules): ``E[φ(u)φ(v)]`` and ``E[φ'(u)φ'(v)]`` for
``(u, v) ~ N(0, [[q11, q12], [q12, q22]])`` as ``∫ϕ(z) φ(√q11 z) ∫ϕ(t) φ(m + s t) dt dz`` with
``m = ρ√q22 z``, ``s = √(q22(1 − ρ²))`` (for ``s = 0``: the 1-D integral of ``φ(√q11 z) φ(m)``).

Run: ``python tests/data/make_activation_reference.py`` (a few minutes); writes
``tests/data/activation_reference.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from scipy import integrate

SA, SS = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x > -700 else 0.0


def sp(x: float, beta: float = 1.0, thr: float = 20.0) -> float:
    return x if beta * x > thr else math.log1p(math.exp(beta * x)) / beta


def tanh_sp(x: float) -> float:
    return math.tanh(sp(x))


#: name -> (φ, φ', kinks)
ACTIVATIONS = {
    "relu6": (lambda x: min(max(x, 0.0), 6.0), lambda x: 1.0 if 0 < x <= 6 else 0.0, [0.0, 6.0]),
    "hardtanh": (lambda x: min(max(x, -1.0), 1.0), lambda x: 1.0 if -1 < x <= 1 else 0.0, [-1.0, 1.0]),
    "hardtanh(-0.5,2)": (lambda x: min(max(x, -0.5), 2.0), lambda x: 1.0 if -0.5 < x <= 2 else 0.0, [-0.5, 2.0]),
    "hardswish": (
        lambda x: 0.0 if x <= -3 else (x if x > 3 else x * (x + 3) / 6),
        lambda x: 0.0 if x <= -3 else (1.0 if x > 3 else (2 * x + 3) / 6),
        [-3.0, 3.0],
    ),
    "hardsigmoid": (
        lambda x: 0.0 if x <= -3 else (1.0 if x > 3 else x / 6 + 0.5),
        lambda x: 1 / 6 if -3 < x <= 3 else 0.0,
        [-3.0, 3.0],
    ),
    "softshrink": (
        lambda x: x - 0.5 if x > 0.5 else (x + 0.5 if x <= -0.5 else 0.0),
        lambda x: 0.0 if -0.5 < x <= 0.5 else 1.0,
        [-0.5, 0.5],
    ),
    "hardshrink": (lambda x: x if abs(x) > 0.5 else 0.0, lambda x: 0.0 if -0.5 < x <= 0.5 else 1.0, [-0.5, 0.5]),
    "threshold(0.3,-0.2)": (lambda x: x if x > 0.3 else -0.2, lambda x: 1.0 if x > 0.3 else 0.0, [0.3]),
    "elu": (lambda x: x if x > 0 else math.expm1(x), lambda x: 1.0 if x > 0 else math.exp(x), [0.0]),
    "elu(2)": (lambda x: x if x > 0 else 2 * math.expm1(x), lambda x: 1.0 if x > 0 else 2 * math.exp(x), [0.0]),
    "celu(0.5)": (
        lambda x: x if x > 0 else 0.5 * math.expm1(2 * x),
        lambda x: 1.0 if x > 0 else math.exp(2 * x),
        [0.0],
    ),
    "selu": (
        lambda x: SS * x if x > 0 else SS * SA * math.expm1(x),
        lambda x: SS if x > 0 else SS * SA * math.exp(x),
        [0.0],
    ),
    "tanh": (math.tanh, lambda x: 1 - math.tanh(x) ** 2, []),
    "sigmoid": (sig, lambda x: sig(x) * (1 - sig(x)), []),
    "silu": (lambda x: x * sig(x), lambda x: sig(x) * (1 + x * (1 - sig(x))), []),
    "mish": (lambda x: x * tanh_sp(x), lambda x: tanh_sp(x) + x * (1 - tanh_sp(x) ** 2) * sig(x), []),
    "softplus": (sp, lambda x: 1.0 if x > 20 else sig(x), []),
    "softplus(2,5)": (lambda x: sp(x, 2.0, 5.0), lambda x: 1.0 if 2 * x > 5 else sig(2 * x), [2.5]),
    "logsigmoid": (lambda x: -sp(-x), lambda x: sig(-x), []),
    "softsign": (lambda x: x / (1 + abs(x)), lambda x: 1 / (1 + abs(x)) ** 2, [0.0]),
    "tanhshrink": (lambda x: x - math.tanh(x), lambda x: math.tanh(x) ** 2, []),
}

#: (q11, q22, ρ): variances 0.05–20, correlations including ±1 (duplicated and parallel inputs)
TRIPLES = [
    (1.0, 1.0, 0.5),
    (1.0, 1.0, 1.0),
    (0.05, 0.3, 0.9),
    (0.05, 0.05, -1.0),
    (4.0, 20.0, -0.5),
    (4.0, 20.0, 0.99),
    (20.0, 20.0, 0.999),
    (20.0, 20.0, 1.0),
    (2.0, 0.5, 0.99999),
    (2.0, 0.5, 1.0),
    (2.0, 0.5, -1.0),
    (0.3, 8.0, 0.0),
]

_EPS = 1e-13


def _pdf(t: float) -> float:
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def expectation(f, kinks, q11: float, q22: float, rho: float) -> float:
    if q11 < q22:
        q11, q22 = q22, q11
    r1, r2 = math.sqrt(q11), math.sqrt(q22)
    perp = math.sqrt(max(0.0, 1 - rho * rho))
    s = perp * r2
    zp = {k / r1 for k in kinks}
    if rho != 0:
        zp |= {k / (rho * r2) for k in kinks}
    if s == 0:
        pts = sorted(z for z in zp if abs(z) < 12)
        return integrate.quad(
            lambda z: _pdf(z) * f(r1 * z) * f(rho * r2 * z),
            -12,
            12,
            points=pts or None,
            limit=500,
            epsabs=_EPS,
            epsrel=_EPS,
        )[0]

    def inner(z: float) -> float:
        m = rho * r2 * z
        pts = sorted({(k - m) / s for k in kinks if abs((k - m) / s) < 12})
        return integrate.quad(
            lambda t: _pdf(t) * f(m + s * t), -12, 12, points=pts or None, limit=500, epsabs=_EPS, epsrel=_EPS
        )[0]

    if rho != 0:
        w = 8 * perp / abs(rho)
        zp |= {k / (rho * r2) + d for k in kinks for d in (-w, w)}
    pts = sorted(z for z in zp if abs(z) < 12)
    return integrate.quad(
        lambda z: _pdf(z) * f(r1 * z) * inner(z), -12, 12, points=pts or None, limit=500, epsabs=_EPS, epsrel=_EPS
    )[0]


def main() -> None:
    out = {"triples": TRIPLES, "kernels": {}}
    for name, (f, df, kinks) in ACTIVATIONS.items():
        out["kernels"][name] = {
            "nngp": [expectation(f, kinks, *t) for t in TRIPLES],
            "dot": [expectation(df, kinks, *t) for t in TRIPLES],
        }
        print(name, flush=True)
    path = Path(__file__).with_name("activation_reference.json")
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
