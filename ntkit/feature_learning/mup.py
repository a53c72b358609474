"""Training finite μP networks the way :func:`ntkit.feature_learning.dmft` describes their limit.

The twin ``net.module(D, width=N, parameterization="mup", gamma=γ₀)`` computes (Bordelon & Pehlevan 2022)::

    h¹ = σ₀W⁰x/√D + β₀b⁰,   h^{ℓ+1} = σ_ℓW^ℓφ(h^ℓ)/√N + β_ℓb^ℓ,   f = (σ_L w^L·φ(h^L)/√N + β_L b^L)/(γ₀√N)

with ``N(0, 1)`` parameters. :func:`train_mup` integrates the gradient flow ``dθ/dt = −η₀ γ₀² N ∇_θ L`` on
``L = (1/2P) Σ_μ |f_c(x_μ) − y_μ|²``, ``f_c = f(θ_t) − f(θ_0)`` (centred outputs, as in the authors' code), by
full-batch gradient descent with small steps ``θ ← θ − δt·η₀γ₀²N ∇L``. In function space this is
``∂f_c/∂t = (η₀/P) K (y − f_c)`` with ``K = γ₀²N ∇f·∇fᵀ``, the empirical NTK of the NTK-parameterised net with the
same parameters: ``t`` here and in :func:`dmft` (and in ``ntkit.predict.gradient_descent_mse`` with
``learning_rate = η₀·out``) are the same time. The default step keeps ``δt·(η₀/P)·tr K ≤ 0.02``, so each step
moves the fastest mode by at most 2 %: the discretisation error of gradient descent relative to the flow is then
``≲ 0.4 %`` of the residual.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ntkit._inputs import as_batch, to_tensor
from ntkit.feature_learning._network import as_float64

__all__ = ["MuPTrajectory", "train_mup"]


@dataclasses.dataclass
class MuPTrajectory:
    """Outputs of a finite μP network along its training (:func:`train_mup`).

    ``f_train`` ``(T, P, out)`` and ``f_test`` ``(T, Q, out)`` (or ``None``) are centred outputs
    ``f(θ_t) − f(θ_0)`` at ``times``; ``step`` is the gradient-descent step used, ``steps`` the number taken.
    """

    times: Tensor
    f_train: Tensor
    f_test: Optional[Tensor]
    y_train: Tensor
    step: float
    steps: int

    @property
    def train_loss(self) -> Tensor:
        """``(T,)``: ``(1/2P) Σ_μ |f_c(x_μ, t) − y_μ|²``."""
        return 0.5 * ((self.f_train - self.y_train) ** 2).sum((1, 2)) / self.f_train.shape[1]


def _output(module: nn.Module, x: Tensor) -> Tensor:
    f = module(x)
    return f[:, None] if f.dim() == 1 else f.reshape(f.shape[0], -1)


def train_mup(
    module: nn.Module,
    x_train: Any,
    y_train: Any,
    *,
    times: Any,
    learning_rate: float = 1.0,
    gamma: Optional[float] = None,
    width: Optional[int] = None,
    step: Optional[float] = None,
    x_test: Any = None,
) -> MuPTrajectory:
    """Full-batch gradient descent with small steps on a μP network (see the module docstring).

    Args:
      module: a μP network, e.g. ``net.module(D, width=N, parameterization="mup", gamma=γ₀, dtype=torch.float64)``
        (its parameters are trained in place).
      x_train, y_train: ``(P, D)`` inputs and ``(P,)`` or ``(P, out)`` targets.
      times: increasing times ``≥ 0`` at which to record the outputs (each is hit exactly: the step before it
        is shortened).
      learning_rate: ``η₀``.
      gamma, width: ``γ₀`` and ``N`` of the learning-rate scale ``η₀γ₀²N``; default: the module's
        ``mup_gamma`` / ``mup_width`` (set by ``net.module(..., parameterization="mup")``).
      step: the gradient-descent step ``δt`` in units of ``t``; default ``0.02·P/(η₀ tr K(0))``.
      x_test: ``(Q, D)`` points whose outputs are recorded too.
    """
    gamma = getattr(module, "mup_gamma", None) if gamma is None else gamma
    width = getattr(module, "mup_width", None) if width is None else width
    if gamma is None or width is None:
        raise ValueError(
            "train_mup needs γ₀ and the readout width N (the learning rate is η₀γ₀²N): build the module with "
            "net.module(..., parameterization='mup', gamma=γ₀), or pass gamma= and width=."
        )
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma={gamma!r} must be a finite number > 0.")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the module has no trainable parameters.")
    dtype, dev = params[0].dtype, params[0].device
    x = as_batch(x_train, "x_train").to(device=dev, dtype=dtype)
    P = x.shape[0]
    y = to_tensor(as_float64(y_train), "y_train", dtype=dtype, device=dev)
    y = y[:, None] if y.dim() == 1 else y.reshape(P, -1)
    xq = None if x_test is None else as_batch(x_test, "x_test").to(device=dev, dtype=dtype)
    ts = to_tensor(as_float64(times), "times", dtype=torch.float64).reshape(-1)
    if ts.numel() == 0 or bool((ts < 0).any()) or bool((ts[1:] <= ts[:-1]).any()):
        raise ValueError("times must be a non-empty, strictly increasing array of times >= 0.")
    lr = float(learning_rate) * float(gamma) ** 2 * int(width)
    with torch.no_grad():
        f0 = _output(module, x)
        fq0 = None if xq is None else _output(module, xq)
    if f0.shape != y.shape:
        raise ValueError(f"the module's outputs have shape {tuple(f0.shape)} but y_train is {tuple(y.shape)}.")
    if step is None:
        # tr K = γ₀²N Σ_μ |∇_θ f(x_μ)|²  bounds the largest eigenvalue of the function-space kernel
        tr = 0.0
        for mu in range(P):
            grads = torch.autograd.grad(_output(module, x[mu : mu + 1]).sum(), params, allow_unused=True)
            tr += sum(float((g**2).sum()) for g in grads if g is not None)
        tr *= float(gamma) ** 2 * int(width)
        step = 0.02 * P / (float(learning_rate) * max(tr, 1e-300))
    if not step > 0:
        raise ValueError(f"step={step!r} must be > 0.")

    t, count = 0.0, 0
    outs, outs_q = [], []
    for target in ts.tolist():
        # steps of exactly `step`, the last one shortened to land on `target`
        n_steps = max(0, math.ceil((target - t) / step - 1e-9))
        for i in range(n_steps):
            dt = step if i < n_steps - 1 else (target - t) - (n_steps - 1) * step
            loss = 0.5 * ((_output(module, x) - f0 - y) ** 2).sum() / P
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(g, alpha=dt * lr)
            count += 1
        t = target
        with torch.no_grad():
            outs.append((_output(module, x) - f0).to(torch.float64))
            if xq is not None:
                assert fq0 is not None
                outs_q.append((_output(module, xq) - fq0).to(torch.float64))
    return MuPTrajectory(
        times=ts,
        f_train=torch.stack(outs),
        f_test=torch.stack(outs_q) if xq is not None else None,
        y_train=y.to(torch.float64),
        step=float(step),
        steps=count,
    )
