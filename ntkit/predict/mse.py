"""Gradient descent on the MSE loss in function space, in closed form at every time ``t`` (Jacot et al. 2018;
Lee et al. 2019), and the stable learning-rate bound.

Under gradient flow on ``L = ||f(X) - Y||² / (2·N)`` (``N = Y.numel()``, NT's normalisation) an infinitely wide
network moves by ``d f_train / dt = -η/N · Θ (f_train - Y)``, whose solution in the eigenbasis
``Θ = V diag(λ) Vᵀ`` is, at every time ``t`` (``t=None`` is ``t = ∞``)::

    f_train(t) = f_train(0) + V expm1(-η λ t/N) Vᵀ (f_train(0) - Y)
    f_test(t)  = f_test(0)  + Θ_test,train V [expm1(-η λ t/N)/λ] Vᵀ (f_train(0) - Y)

so the residual along eigenvector ``i`` decays as ``exp(-η λ_i t / N)``: top principal components are learnt
first (see :meth:`MSEPredictor.residual_modes`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import scipy.linalg
import torch
from torch import Tensor

from ntkit._inputs import to_tensor
from ntkit.linalg.dense import PSDMatrix, as_kernel_matrix, check_memory
from ntkit.predict._layout import (
    F64,
    Axes,
    as_times,
    bytes64,
    check_train_kernel,
    decay,
    expm1_factor,
    inv_expm1_factor,
    ntk_of,
    out_dtype,
    targets,
)

__all__ = ["MSEPredictor", "gradient_descent_mse", "max_learning_rate"]


class MSEPredictor:
    """Predictor returned by :func:`gradient_descent_mse`; call it like NT's ``predict_fn``.

    Besides ``__call__`` it exposes Jacot's spectral view of training: :attr:`eigenvalues`,
    :attr:`eigenvectors`, :attr:`rates` and :meth:`residual_modes`.
    """

    def __init__(self, k_train_train, y_train, learning_rate, diag_reg, diag_reg_absolute_scale, trace_axes):
        k = to_tensor(ntk_of(k_train_train), "k_train_train", check_finite=False)  # PSDMatrix checks it
        if not k.is_floating_point():
            raise TypeError(f"k_train_train has dtype {k.dtype}; pass a floating kernel.")
        self.dtype, self.device = k.dtype, k.device
        self.y, self.layout = targets(y_train, trace_axes, k.device)
        k2 = check_train_kernel(k, self.layout, "k_train_train")
        self.factor = PSDMatrix(k2, "k_train_train", diag_reg=diag_reg, diag_reg_absolute_scale=diag_reg_absolute_scale)
        as_times(0.0, learning_rate, F64, k.device)  # validates learning_rate
        self.learning_rate = float(learning_rate)
        self.y_flat = self.layout.flatten(self.y.to(F64))
        self.norm = float(self.y.numel())
        self.n = self.layout.y_shape[0]

    # -- inputs ------------------------------------------------------------------------------------
    def _fx(self, fx: Any, n: int, name: str) -> Tensor:
        f = to_tensor(fx, name, dtype=F64, device=self.device)
        shape = self.layout.sample_shape(n)
        try:
            f = torch.broadcast_to(f, shape)
        except RuntimeError as e:
            raise ValueError(
                f"{name} has shape {tuple(f.shape)}, which does not broadcast to the outputs' shape {shape}."
            ) from e
        return self.layout.flatten(f)

    def _k_test(self, k_test_train: Any) -> tuple[Tensor, int]:
        k = to_tensor(ntk_of(k_test_train), "k_test_train", dtype=F64, device=self.device)
        if k.dim() < 2:
            raise ValueError(
                f"k_test_train must be (n_test, n_train{', ...' if self.layout.rest_shape else ''})"
                f", got shape {tuple(k.shape)}."
            )
        m = k.shape[0]
        return self.layout.kernel_2d(k, "k_test_train", n2=self.n, n1=m), m

    # -- prediction ----------------------------------------------------------------------------------
    def __call__(self, t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None, k_test_train: Any = None):
        """Outputs at time(s) ``t`` of gradient flow from ``fx_train_0`` (and ``fx_test_0``).

        Args:
          t: ``None`` (infinite time, computed by a Cholesky solve), a number, or an array of times of any
            shape ``S`` (all computed from one cached eigendecomposition); times must be ``>= 0``.
          fx_train_0: train outputs at ``t = 0`` (broadcast to ``y_train``'s shape); ``None`` to skip them.
          fx_test_0: test outputs at ``t = 0``; ``None`` to skip test predictions.
          k_test_train: kernel between test and train inputs, needed with ``fx_test_0``.

        Returns:
          ``fx_train_t`` or ``fx_test_t`` or ``(fx_train_t, fx_test_t)`` (as NT), each of shape ``S + outputs``.
        """
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError("fx_train_0 and fx_test_0 are both None: nothing to predict.")
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError("fx_test_0 is given but k_test_train is not; pass the test-train kernel.")
        f0 = None if fx_train_0 is None else self._fx(fx_train_0, self.n, "fx_train_0")
        k_td: Optional[Tensor] = None
        ft0: Optional[Tensor] = None
        m = 0
        if fx_test_0 is not None:
            k_td, m = self._k_test(k_test_train)
            ft0 = self._fx(fx_test_0, m, "fx_test_0")

        if t is None:
            tr = None if f0 is None else self.y_flat.clone()
            te = None
            if ft0 is not None:
                assert k_td is not None, "k_test_train is read together with fx_test_0"
                rhs = self.y_flat if f0 is None else self.y_flat - f0
                te = ft0 + k_td @ self.factor.solve(rhs)
            t_shape: tuple[int, ...] = ()
        else:
            ts, t_shape = as_times(t, self.learning_rate, F64, self.device)
            lam, vec = self.factor.eigh()
            rhs = -self.y_flat if f0 is None else f0 - self.y_flat
            c = vec.T @ rhs  # (M, T)
            tr = te = None
            if f0 is not None:
                check_memory(bytes64(ts.numel(), *self.y_flat.shape), self.device, "train predictions")
                tr = f0 + vec @ (expm1_factor(lam, ts, self.norm)[:, :, None] * c)
            if ft0 is not None:
                assert k_td is not None, "k_test_train is read together with fx_test_0"
                check_memory(bytes64(ts.numel(), m, self.layout.T), self.device, "test predictions")
                g = inv_expm1_factor(lam, ts, self.norm, self.factor.rank_cutoff)
                te = ft0 + (k_td @ vec) @ (g[:, :, None] * c)
            if tr is not None:
                tr = tr.reshape(t_shape + tuple(tr.shape[1:])) if t_shape else tr[0]
            if te is not None:
                te = te.reshape(t_shape + tuple(te.shape[1:])) if t_shape else te[0]

        outs = [
            self.layout.unflatten(flat, n).to(out_dtype(self.dtype))
            for flat, n in ((tr, self.n), (te, m))
            if flat is not None
        ]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # -- the spectral view ---------------------------------------------------------------------------
    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the (regularised, flattened ``(M, M)``) train kernel, largest first."""
        return self.factor.eigh()[0].flip(0).to(out_dtype(self.dtype))

    @property
    def eigenvectors(self) -> Tensor:
        """Matching unit eigenvectors as columns ``(M, M)`` (column ``i`` belongs to ``eigenvalues[i]``)."""
        return self.factor.eigh()[1].flip(1).to(out_dtype(self.dtype))

    @property
    def rates(self) -> Tensor:
        """Decay rate of each eigen-direction per unit of ``t``: ``learning_rate · λ_i / N``."""
        return self.eigenvalues * (self.learning_rate / self.norm)

    def residual_modes(self, t: Any, fx_train_0: Any = 0.0) -> Tensor:
        """Train residual ``f_train(t) - y`` in the eigenbasis: ``exp(-η λ_i t / N) · v_iᵀ (f_train(0) - y)``.

        Returns shape ``t.shape + (M,) + traced output shape``, eigen-directions ordered as
        :attr:`eigenvalues` (largest first); squared and summed over directions it is ``||f_train(t) - y||²``.
        """
        ts, t_shape = as_times(t, self.learning_rate, F64, self.device)
        lam, vec = self.factor.eigh()
        f0 = self._fx(fx_train_0, self.n, "fx_train_0")
        c = vec.T @ (f0 - self.y_flat)
        r = decay(lam, ts, self.norm)[:, :, None] * c  # (T, M, T_out)
        r = r.flip(1).reshape(t_shape + (c.shape[0],) + self.layout.trace_shape)
        return r.to(out_dtype(self.dtype))


def gradient_descent_mse(
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> MSEPredictor:
    """Closed-form gradient flow on MSE in function space (Jacot et al. 2018; Lee et al. 2019).

    Args:
      k_train_train: NTK (or NNGP) between training inputs, ``(n, n)`` (or zipped ``(n, n, a, a, ..)`` for
        non-traced output axes ``a``), any floating dtype; or a :class:`~ntkit.Kernel` (its ``.ntk`` is used).
      y_train: targets ``(n,)`` or ``(n, *outputs)``.
      learning_rate: ``η``; time is measured in its units (only ``η·t`` matters).
      diag_reg: ``k_train_train + diag_reg·I`` is used (relative to the mean diagonal unless
        ``diag_reg_absolute_scale``).
      trace_axes: output axes of ``y_train`` along which the kernel is ``Θ ⊗ I`` (NT's meaning).

    Returns:
      :class:`MSEPredictor`, called as ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``.
      The kernel is checked (finite, symmetric, PSD to round-off) and factorised once: Cholesky for ``t=None``,
      the eigendecomposition for finite ``t`` (any number of times per call).
    """
    return MSEPredictor(k_train_train, y_train, learning_rate, diag_reg, diag_reg_absolute_scale, trace_axes)


def max_learning_rate(
    ntk_train_train: Any, y_train_size: Optional[int] = None, momentum: float = 0.0, eps: float = 1e-12
) -> float:
    """Largest learning rate for which full-batch (momentum) GD on ``||f - y||²/(2·N)`` is stable at infinite
    width: ``2·(1 + momentum)·N / (λ_max(Θ) + eps)`` (NT's ``max_learning_rate``).

    ``N = y_train_size`` (the number of scalar targets); ``None`` takes the flattened kernel's size, i.e. an
    untraced kernel. A zipped ``(n, n, a, a, ...)`` kernel is flattened first.
    """
    k = to_tensor(ntk_train_train, "ntk_train_train")
    if k.dim() > 2:
        if k.dim() % 2:
            raise ValueError(f"ntk_train_train has odd rank {k.dim()}; expected (n, n) or zipped (n, n, a, a, ..).")
        p = k.dim() // 2
        k = k.permute(tuple(range(0, 2 * p, 2)) + tuple(range(1, 2 * p, 2)))
        side = math.prod(k.shape[:p])
        k = k.reshape(side, side)
    k = as_kernel_matrix(k, "ntk_train_train").to(F64)
    factor = k.shape[0] if y_train_size is None else int(y_train_size)
    if factor <= 0:
        raise ValueError(f"y_train_size={y_train_size!r} must be a positive int.")
    n = k.shape[0]
    if k.device.type == "cpu":
        lmax = float(scipy.linalg.eigh(k.numpy(), eigvals_only=True, subset_by_index=[n - 1, n - 1])[-1])
    else:
        lmax = float(torch.linalg.eigvalsh(k)[-1])
    return 2.0 * (1.0 + momentum) * factor / (lmax + eps)
