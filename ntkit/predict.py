"""Predictions of infinitely wide networks trained by gradient descent, and their Bayesian posteriors.

Under gradient flow on the MSE loss ``L = ||f(X) - Y||² / (2·N)`` (``N = Y.numel()``, NT's normalisation) an
infinitely wide network moves in function space by a linear ODE driven by its NTK ``Θ`` (Jacot et al. 2018;
Lee et al. 2019, "Wide neural networks of any depth evolve as linear models")::

    d f_train / dt = -η/N · Θ (f_train - Y),        d f_test / dt = -η/N · Θ_test,train (f_train - Y)

whose solution in the eigenbasis ``Θ = V diag(λ) Vᵀ`` is, at every time ``t`` (``t=None`` is ``t = ∞``)::

    f_train(t) = f_train(0) + V expm1(-η λ t/N) Vᵀ (f_train(0) - Y)
    f_test(t)  = f_test(0)  + Θ_test,train V [expm1(-η λ t/N)/λ] Vᵀ (f_train(0) - Y)

so the residual along eigenvector ``i`` decays as ``exp(-η λ_i t / N)``: top principal components are learnt
first (see :meth:`MSEPredictor.residual_modes`). Averaging over random initialisations gives Gaussian
predictions (:func:`gradient_descent_mse_ensemble`); at ``t = ∞`` they are GP posteriors
(:func:`gp_inference`). :func:`student_t_inference` gives the Student-t posterior of an NNGP whose last-layer
variance has an inverse-gamma prior (Lee et al. 2022). :func:`gradient_descent` integrates the same function
space ODE for any differentiable loss.

Conventions follow NT 0.6.5 (``neural_tangents.predict``): ``trace_axes`` are output axes along which the
kernel is ``Θ ⊗ I`` (so kernels lack them); ``diag_reg`` is relative to the mean of the train kernel's diagonal
unless ``diag_reg_absolute_scale``; time is in units of ``learning_rate``. All solves run in float64 (inputs are
upcast); results come back in the kernel's (or ``x_train``'s) dtype and device.
"""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ntkit._ode import ODEState, gradient_descent
from ntkit._predict_utils import (Gaussian, Layout, as_times, canonical_get, decay, expm1_factor, get_attr,
                                  inv_expm1_factor, ntk_of, package, to_tensor)
from ntkit.solvers.linalg import PSDMatrix, as_kernel_matrix, check_memory

__all__ = ["gradient_descent_mse", "gradient_descent_mse_ensemble", "gp_inference", "gradient_descent",
           "max_learning_rate", "student_t_inference", "Gaussian", "StudentT", "ODEState", "MSEPredictor",
           "EnsemblePredictor", "GPInference", "StudentTPredictor"]

F64 = torch.float64
Axes = Union[int, Sequence[int]]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _targets(y_train: Any, trace_axes: Axes, device) -> tuple[Tensor, Layout]:
    y = to_tensor(y_train, "y_train", device=device)
    if y.dim() == 0 or y.shape[0] == 0:
        raise ValueError(f"y_train must have shape (n,) or (n, *outputs) with n >= 1, got {tuple(y.shape)}.")
    return y, Layout(y.shape, trace_axes)


def _check_train_kernel(k: Tensor, layout: Layout, name: str) -> Tensor:
    n = layout.y_shape[0]
    return layout.kernel_2d(to_tensor(k, name, check_finite=False), name, n2=n, n1=n)


def _bytes64(*shape: int) -> int:
    return 8 * int(math.prod(shape))


# =================================================================================================
# gradient descent on MSE: closed form at every t
# =================================================================================================
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
        self.y, self.layout = _targets(y_train, trace_axes, k.device)
        k2 = _check_train_kernel(k, self.layout, "k_train_train")
        self.factor = PSDMatrix(k2, "k_train_train", diag_reg=diag_reg,
                                diag_reg_absolute_scale=diag_reg_absolute_scale)
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
            raise ValueError(f"{name} has shape {tuple(f.shape)}, which does not broadcast to the outputs' "
                             f"shape {shape}.") from e
        return self.layout.flatten(f)

    def _k_test(self, k_test_train: Any) -> tuple[Tensor, int]:
        k = to_tensor(ntk_of(k_test_train), "k_test_train", dtype=F64, device=self.device)
        if k.dim() < 2:
            raise ValueError(f"k_test_train must be (n_test, n_train{', ...' if self.layout.rest_shape else ''})"
                             f", got shape {tuple(k.shape)}.")
        m = k.shape[0]
        return self.layout.kernel_2d(k, "k_test_train", n2=self.n, n1=m), m

    # -- prediction ----------------------------------------------------------------------------------
    def __call__(self, t: Any = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                 k_test_train: Any = None):
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
        k_td, m, ft0 = None, 0, None
        if fx_test_0 is not None:
            k_td, m = self._k_test(k_test_train)
            ft0 = self._fx(fx_test_0, m, "fx_test_0")

        if t is None:
            tr = None if f0 is None else self.y_flat.clone()
            te = None
            if ft0 is not None:
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
                check_memory(_bytes64(ts.numel(), *self.y_flat.shape), self.device, "train predictions")
                tr = f0 + vec @ (expm1_factor(lam, ts, self.norm)[:, :, None] * c)
            if ft0 is not None:
                check_memory(_bytes64(ts.numel(), m, self.layout.T), self.device, "test predictions")
                g = inv_expm1_factor(lam, ts, self.norm, self.factor.rank_cutoff)
                te = ft0 + (k_td @ vec) @ (g[:, :, None] * c)
            if tr is not None:
                tr = tr.reshape(t_shape + tuple(tr.shape[1:])) if t_shape else tr[0]
            if te is not None:
                te = te.reshape(t_shape + tuple(te.shape[1:])) if t_shape else te[0]

        outs = [self.layout.unflatten(flat, n).to(_out_dtype(self.dtype))
                for flat, n in ((tr, self.n), (te, m)) if flat is not None]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # -- the spectral view ---------------------------------------------------------------------------
    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the (regularised, flattened ``(M, M)``) train kernel, largest first."""
        return self.factor.eigh()[0].flip(0).to(_out_dtype(self.dtype))

    @property
    def eigenvectors(self) -> Tensor:
        """Matching unit eigenvectors as columns ``(M, M)`` (column ``i`` belongs to ``eigenvalues[i]``)."""
        return self.factor.eigh()[1].flip(1).to(_out_dtype(self.dtype))

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
        return r.to(_out_dtype(self.dtype))


def gradient_descent_mse(k_train_train: Any, y_train: Any, learning_rate: float = 1.0, diag_reg: float = 0.0,
                         diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,)) -> MSEPredictor:
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


# =================================================================================================
# GP posteriors (t = infinity)
# =================================================================================================
class GPInference:
    """Predictor returned by :func:`gp_inference`; ``predict_fn(get=None, k_test_train=None, k_test_test=None)``.

    Train-train factorisations and ``K⁻¹ y`` are cached per kernel name.
    """

    def __init__(self, k_train_train: Any, y_train: Any, diag_reg: float = 0.0,
                 diag_reg_absolute_scale: bool = False, trace_axes: Axes = (-1,),
                 _kernel_source: Optional[Callable[[str], Tensor]] = None, _dtype=None, _device=None):
        self._source = _kernel_source or (lambda g: get_attr(k_train_train, g, "k_train_train"))
        if _kernel_source is None:
            first = k_train_train if isinstance(k_train_train, (Tensor, np.ndarray)) else (
                getattr(k_train_train, "nngp", None) if getattr(k_train_train, "nngp", None) is not None
                else get_attr(k_train_train, "ntk", "k_train_train"))
            first = to_tensor(first, "k_train_train", check_finite=False)
            _dtype, _device = first.dtype, first.device
        self.dtype, self.device = _out_dtype(_dtype), _device
        self.y, self.layout = _targets(y_train, trace_axes, _device)
        self.y_flat = self.layout.flatten(self.y.to(F64))
        self.n = self.layout.y_shape[0]
        self.diag_reg, self.absolute = diag_reg, diag_reg_absolute_scale
        self._k2: dict[str, Tensor] = {}
        self._factors: dict[str, PSDMatrix] = {}
        self._kinv_y: dict[str, Tensor] = {}

    def _checked(self, g: str) -> Tensor:
        """Flattened ``(M, M)`` train-train kernel ``g``, checked finite and symmetric, in its own dtype."""
        if g not in self._k2:
            k2 = _check_train_kernel(self._source(g), self.layout, f"k_train_train.{g}")
            self._k2[g] = as_kernel_matrix(k2, f"k_train_train.{g}")
        return self._k2[g]

    def k_dd(self, g: str) -> Tensor:
        """The unregularised train-train kernel ``g`` in float64, flattened to ``(M, M)``."""
        return self._checked(g).to(F64)

    def factor(self, g: str) -> PSDMatrix:
        if g not in self._factors:
            self._factors[g] = PSDMatrix(self._checked(g), f"k_train_train.{g}", diag_reg=self.diag_reg,
                                         diag_reg_absolute_scale=self.absolute, checked=True)
        return self._factors[g]

    def kinv_y(self, g: str) -> Tensor:
        if g not in self._kinv_y:
            self._kinv_y[g] = self.factor(g).solve(self.y_flat)
        return self._kinv_y[g]

    def _test(self, k: Any, g: str, name: str) -> Tensor:
        t = to_tensor(get_attr(k, g, name), name, dtype=F64, device=self.device)
        if t.dim() < 2:
            raise ValueError(f"{name} must be (n_test, n_train), got shape {tuple(t.shape)}.")
        return self.layout.kernel_2d(t, name, n2=self.n, n1=t.shape[0])

    def _test_test(self, k: Any, g: str, m: int) -> Tensor:
        t = to_tensor(get_attr(k, g, "k_test_test"), "k_test_test", dtype=F64, device=self.device)
        return self.layout.kernel_2d(t, "k_test_test", n2=m, n1=m)

    def __call__(self, get: Union[None, str, Sequence[str]] = None, k_test_train: Any = None,
                 k_test_test: Any = None):
        """Posterior on a test set: the mean, and the covariance when ``k_test_test`` is given.

        Args:
          get: ``"nngp"`` (exact Bayesian posterior of the infinitely wide network), ``"ntk"`` (infinite
            ensemble trained to convergence; needs both kernels), ``"ntkgp"`` (GP with NTK covariance, He et
            al. 2020) or a tuple; ``None`` is ``("nngp", "ntk")``. A string returns the bare result.
          k_test_train: test-train kernel(s) (a tensor or a Kernel); ``None`` predicts on the training set
            (``N(y_train, 0)``, NT's convention).
          k_test_test: test-test kernel(s) for the covariance (NNGP; NTK for ``"ntkgp"``); ``None``: mean only.

        Returns: per name a mean tensor, or a :class:`Gaussian` ``(mean, covariance)`` with ``k_test_test``.
        """
        names, single = canonical_get(get, ("nngp", "ntk", "ntkgp"))
        out = {}
        for g in names:
            kg = "ntk" if g == "ntkgp" else g
            if k_test_train is None:
                mean = self.layout.unflatten(self.y_flat, self.n).to(self.dtype)
                if k_test_test is None:
                    out[g] = mean
                else:
                    M = self.y_flat.shape[0]
                    cov = self.layout.zip_cov(torch.zeros(M, M, dtype=F64, device=self.device), self.n)
                    out[g] = Gaussian(mean, cov.to(self.dtype))
                continue
            k_td = self._test(k_test_train, kg, "k_test_train")
            m = k_td.shape[0] // max(1, math.prod(self.layout.rest_shape))
            mean = self.layout.unflatten(k_td @ self.kinv_y(kg), m).to(self.dtype)
            if k_test_test is None:
                out[g] = mean
                continue
            cov = self._covariance(g, k_td, k_test_train, k_test_test, m)
            out[g] = Gaussian(mean, self.layout.zip_cov(cov, m).to(self.dtype))
        return package(out, single)

    def _covariance(self, g: str, k_td: Tensor, k_test_train: Any, k_test_test: Any, m: int) -> Tensor:
        if g in ("nngp", "ntkgp"):  # K_tt - K_td K⁻¹ K_dt = K_tt - WᵀW, W = L⁻¹ K_dt
            kg = "nngp" if g == "nngp" else "ntk"
            w = self.factor(kg).whiten(k_td.T)
            return self._test_test(k_test_test, kg, m) - w.T @ w
        # ntk: the infinite ensemble trained to convergence (Lee et al. 2019, eq. 16):
        #   Σ = K_tt + A K_dd Aᵀ - (A K_td,nngpᵀ + transpose),   A = Θ_td Θ_dd⁻¹
        if isinstance(k_test_train, (Tensor, np.ndarray)):
            raise ValueError("the NTK posterior covariance needs both the NTK and the NNGP: pass k_test_train "
                             "(and k_train_train) as Kernels computed with get=('nngp', 'ntk').")
        nngp_td = self._test(k_test_train, "nngp", "k_test_train")
        k_tt = self._test_test(k_test_test, "nngp", m)
        a_t = self.factor("ntk").solve(k_td.T)  # Θ_dd⁻¹ Θ_dt = Aᵀ, (M, m)
        term2 = a_t.T @ nngp_td.T  # A K_dt
        return k_tt + a_t.T @ (self.k_dd("nngp") @ a_t) - term2 - term2.T


def gp_inference(k_train_train: Any, y_train: Any, diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                 trace_axes: Axes = (-1,)) -> GPInference:
    """Posterior of the NNGP / infinite NTK ensemble / NTK-GP given training data (NT's ``gp_inference``).

    ``mean = K_td (K_dd + r I)⁻¹ y``; NNGP covariance ``K_tt - K_td (K_dd + r I)⁻¹ K_dt``; the NTK
    covariance is that of an infinite ensemble trained to convergence (Lee et al. 2019). ``k_train_train`` is
    a matrix or a Kernel with the kernels you will ``get`` (both for the NTK covariance).
    """
    return GPInference(k_train_train, y_train, diag_reg, diag_reg_absolute_scale, trace_axes)


# =================================================================================================
# the infinite ensemble at any time
# =================================================================================================
class EnsemblePredictor:
    """Predictor returned by :func:`gradient_descent_mse_ensemble`;
    ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``."""

    def __init__(self, kernel_fn, x_train, y_train, learning_rate, diag_reg, diag_reg_absolute_scale,
                 trace_axes, kernel_fn_kwargs):
        if not callable(kernel_fn):
            raise TypeError("kernel_fn must be callable as kernel_fn(x1, x2, get), e.g. net.kernel_fn.")
        self.kernel_fn, self.kwargs = kernel_fn, kernel_fn_kwargs
        self.x_train = x_train
        as_times(0.0, learning_rate, F64, "cpu")
        self.learning_rate = float(learning_rate)
        self._k_dd: dict[str, Tensor] = {}
        self._spec: dict[str, dict] = {}
        device = x_train.device if isinstance(x_train, Tensor) else torch.device("cpu")
        dtype = x_train.dtype if isinstance(x_train, Tensor) else (
            torch.from_numpy(x_train).dtype if isinstance(x_train, np.ndarray) else torch.get_default_dtype())
        self.gp = GPInference(None, y_train, diag_reg, diag_reg_absolute_scale, trace_axes,
                              _kernel_source=self._train_kernel, _dtype=dtype, _device=device)
        self.layout, self.n = self.gp.layout, self.gp.n
        self.norm = float(self.gp.y.numel())

    # -- kernels (train-train cached) ------------------------------------------------------------------
    def _call(self, x1, x2, names: tuple[str, ...]) -> dict[str, Tensor]:
        k = self.kernel_fn(x1, x2, names, **self.kwargs)
        return {g: get_attr(k, g, "kernel_fn's output") for g in names}

    def _train_kernel(self, g: str) -> Tensor:
        if g not in self._k_dd:
            self._k_dd.update(self._call(self.x_train, None, (g,)))
        return self._k_dd[g]

    def _prefetch(self, names: tuple[str, ...]) -> None:
        missing = tuple(g for g in names if g not in self._k_dd)
        if missing:
            self._k_dd.update(self._call(self.x_train, None, missing))

    def __call__(self, t: Any = None, x_test: Any = None, get: Union[None, str, Sequence[str]] = None,
                 compute_cov: bool = False):
        """Mean (and covariance) over random initialisations of infinitely wide networks trained for time ``t``.

        Args:
          t: ``None`` (infinite time: :func:`gp_inference`), a number or an array of times of any shape ``S``.
          x_test: test inputs; ``None`` predicts on the training inputs (unregularised, NT's convention).
          get: ``"nngp"`` (only the last layer trained), ``"ntk"`` (all layers), or a tuple; ``None``: both.
          compute_cov: also return the covariance over the ensemble.

        Returns: per name the mean ``S + (n_test, *outputs)``, or :class:`Gaussian` with the covariance
        ``S + (n_test, n_test, ...)``; a string ``get`` returns the bare value, a tuple a namedtuple.
        """
        names, single = canonical_get(get, ("nngp", "ntk"))
        needed = tuple(g for g in ("nngp", "ntk") if g in names or (g == "nngp" and compute_cov))
        self._prefetch(needed)
        k_td = nngp_tt = None
        if x_test is not None:
            k_td = SimpleNamespace(**self._call(x_test, self.x_train, needed))
            if compute_cov:
                nngp_tt = self._call(x_test, None, ("nngp",))["nngp"]
        if t is None:
            return self.gp(names if not single else names[0], k_test_train=k_td,
                           k_test_test=nngp_tt if x_test is not None else (True if compute_cov else None))
        ts, t_shape = as_times(t, self.learning_rate, F64, self.gp.device)
        out = {g: self._finite(g, ts, t_shape, k_td, nngp_tt, compute_cov) for g in names}
        return package(out, single)

    def _spectral(self, g: str, with_nngp: bool) -> dict:
        """Cached per kernel: eigenpairs, ``c = Vᵀ y`` and (for NTK covariances) ``S = Vᵀ K_nngp V``."""
        sp = self._spec.setdefault(g, {})
        if "lam" not in sp:
            factor = self.gp.factor(g)
            sp["lam"], sp["vec"] = factor.eigh()
            sp["cutoff"] = factor.rank_cutoff
            sp["c"] = sp["vec"].T @ self.gp.y_flat
        if with_nngp and "s" not in sp:
            sp["s"] = sp["vec"].T @ self.gp.k_dd("nngp") @ sp["vec"]
        return sp

    def _finite(self, g, ts, t_shape, k_td, nngp_tt, compute_cov):
        sp = self._spectral(g, compute_cov and g == "ntk" and k_td is not None)
        lam, vec, c, cutoff = sp["lam"], sp["vec"], sp["c"], sp["cutoff"]
        norm, y, lay = self.norm, self.gp.y_flat, self.layout
        T = ts.numel()
        if k_td is None:
            m, M = self.n, y.shape[0]
            check_memory(_bytes64(T, M, M) * (3 if compute_cov else 0) + _bytes64(T, *y.shape), self.gp.device,
                         "ensemble predictions on the training set")
            mean = vec @ (-expm1_factor(lam, ts, norm)[:, :, None] * c)
            cov = None
            if compute_cov:
                if g == "nngp":
                    w = lam[None, :] * decay(lam, ts, norm) ** 2
                    cov = (vec[None] * w[:, None, :]) @ vec.T
                else:
                    e = (vec[None] * decay(lam, ts, norm)[:, None, :]) @ vec.T  # (T, M, M)
                    cov = e @ self.gp.k_dd("nngp") @ e
        else:
            ktd = self.gp._test(k_td, g, "k_test_train")
            m = ktd.shape[0] // max(1, math.prod(lay.rest_shape))
            mt = ktd.shape[0]
            check_memory(_bytes64(T, mt, mt) * (3 if compute_cov else 0) + _bytes64(T, mt, y.shape[1]),
                         self.gp.device, "ensemble test predictions")
            p = ktd @ vec  # (m, M)
            neg = -inv_expm1_factor(lam, ts, norm, cutoff)  # (T, M)
            mean = p @ (neg[:, :, None] * c)
            cov = None
            if compute_cov:
                k_tt = self.gp._test_test(nngp_tt, "nngp", m)
                if g == "nngp":
                    h = -inv_expm1_factor(lam, 2 * ts, norm, cutoff)
                    cov = k_tt - (p[None] * h[:, None, :]) @ p.T
                else:
                    q = self.gp._test(k_td, "nngp", "k_test_train") @ vec  # (m, M)
                    a = p[None] * neg[:, None, :]  # (T, m, M)
                    term2 = a @ q.T
                    cov = a @ sp["s"] @ a.transpose(1, 2) - term2 - term2.transpose(1, 2) + k_tt
        mean = lay.unflatten(mean, m)
        mean = (mean.reshape(t_shape + tuple(mean.shape[1:])) if t_shape else mean[0]).to(self.gp.dtype)
        if cov is None:
            return mean
        cov = lay.zip_cov(cov, m)
        cov = (cov.reshape(t_shape + tuple(cov.shape[1:])) if t_shape else cov[0]).to(self.gp.dtype)
        return Gaussian(mean, cov)


def gradient_descent_mse_ensemble(kernel_fn: Callable, x_train: Any, y_train: Any, learning_rate: float = 1.0,
                                  diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                                  trace_axes: Axes = (-1,), **kernel_fn_train_train_kwargs) -> EnsemblePredictor:
    """Gaussian over an infinite ensemble of infinitely wide networks trained on MSE for time ``t``
    (Lee et al. 2019, section 2.3): NNGP (only the readout trained) and NTK (all layers).

    With ``Θ = V diag(λ) Vᵀ`` the regularised train kernel (NNGP for ``"nngp"``, NTK for ``"ntk"``), ``K`` the
    NNGP, ``g(t) = V [(1 - exp(-λ t/N))/λ] Vᵀ`` and ``N = y_train.numel()``::

        mean(t)       = Θ_td g(t) y
        cov_nngp(t)   = K_tt - K_td g(2t) K_dt
        cov_ntk(t)    = K_tt + Θ_td g K_dd g Θ_dt - (Θ_td g K_dt + transpose)

    ``kernel_fn(x1, x2, get)`` (e.g. ``net.kernel_fn``) is called once on ``(x_train, None)`` per kernel; the
    train kernels and their factorisations are cached across calls of the returned predictor.
    """
    return EnsemblePredictor(kernel_fn, x_train, y_train, learning_rate, diag_reg, diag_reg_absolute_scale,
                             trace_axes, kernel_fn_train_train_kwargs)


# =================================================================================================
# Student-t posterior (scale mixture of NNGPs)
# =================================================================================================
class StudentT(NamedTuple):
    """Multivariate Student-t ``t_df(mean, scale)``; ``covariance = df/(df-2)·scale`` (``df > 2``)."""
    mean: Tensor
    scale: Optional[Tensor]
    df: float

    @property
    def covariance(self) -> Optional[Tensor]:
        if self.scale is None:
            return None
        if self.df <= 2:
            raise ValueError(f"a Student-t with df={self.df:g} <= 2 has no finite covariance; use .scale.")
        return self.scale * (self.df / (self.df - 2))


class StudentTPredictor:
    """Predictor returned by :func:`student_t_inference`; ``predict_fn(k_test_train=None, k_test_test=None)``.

    Attributes: ``alpha``, ``beta`` (posterior inverse-gamma parameters of the last-layer variance ``σ²``),
    ``df = 2·alpha`` (degrees of freedom of the predictive).
    """

    def __init__(self, k_train_train, y_train, alpha, beta, diag_reg, diag_reg_absolute_scale, trace_axes):
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a finite number > 0 (inverse-gamma prior on σ²).")
        k = k_train_train if isinstance(k_train_train, (Tensor, np.ndarray)) else get_attr(
            k_train_train, "nngp", "k_train_train")
        self.gp = GPInference(k, y_train, diag_reg, diag_reg_absolute_scale, trace_axes)
        n_obs = self.gp.y_flat.numel()
        quad = float((self.gp.y_flat * self.gp.kinv_y("nngp")).sum())
        self.prior = (float(alpha), float(beta))
        self.alpha = alpha + 0.5 * n_obs
        self.beta = beta + 0.5 * quad
        self.df = 2.0 * self.alpha

    def __call__(self, k_test_train: Any = None, k_test_test: Any = None) -> StudentT:
        """Posterior predictive ``t_{2α'}(K_td K⁻¹ y, (β'/α')·(K_tt - K_td K⁻¹ K_dt))`` on a test set.

        ``k_test_test=None`` returns ``scale=None``; ``k_test_train=None`` predicts on the training set
        (``y_train`` with zero scale, NT's convention for ``gp_inference``).
        """
        r = self.gp("nngp", k_test_train=k_test_train, k_test_test=k_test_test)
        if k_test_test is None:
            return StudentT(r, None, self.df)
        return StudentT(r.mean, r.covariance * (self.beta / self.alpha), self.df)


def student_t_inference(k_train_train: Any, y_train: Any, alpha: float = 2.0, beta: float = 1.0,
                        diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                        trace_axes: Axes = (-1,)) -> StudentTPredictor:
    """Closed-form posterior of a scale mixture of NNGPs with an inverse-gamma prior (Lee et al. 2022,
    "Scale mixtures of neural network Gaussian processes"): a Student-t process.

    Model: the last-layer variance ``σ² ~ InvGamma(alpha, beta)`` scales the NNGP, ``f | σ² ~ GP(0, σ² K)``;
    ``diag_reg`` is observation noise ``σ²·r`` (scaled with ``σ²``, which keeps the model conjugate). With
    ``N = y_train.numel()`` scalar observations and ``q = yᵀ (K + r I)⁻¹ y`` (summed over output columns)::

        σ² | y ~ InvGamma(alpha + N/2, beta + q/2)
        f_test | y ~ t_{2·alpha + N}( K_td (K + r I)⁻¹ y,  (2·beta + q)/(2·alpha + N) · Σ_gp )

    where ``Σ_gp = K_tt - K_td (K + r I)⁻¹ K_dt`` is the unit-variance NNGP posterior covariance. The default
    prior ``InvGamma(2, 1)`` has mean 1 (the plain NNGP's scale) and heavy tails.

    ``k_train_train`` is the NNGP train kernel (a matrix or a Kernel, whose ``.nngp`` is used).
    """
    return StudentTPredictor(k_train_train, y_train, alpha, beta, diag_reg, diag_reg_absolute_scale, trace_axes)


# =================================================================================================
# learning-rate bound
# =================================================================================================
def max_learning_rate(ntk_train_train: Any, y_train_size: Optional[int] = None, momentum: float = 0.0,
                      eps: float = 1e-12) -> float:
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
