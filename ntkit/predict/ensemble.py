"""The infinite ensemble of infinitely wide networks trained on MSE, at any time ``t`` (Lee et al. 2019,
section 2.3): Gaussian predictions from the NNGP (only the readout trained) and the NTK (all layers)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ntkit.kernel import normalize_get
from ntkit.linalg.dense import check_memory
from ntkit.predict._layout import F64, Axes, as_times, bytes64, decay, expm1_factor, get_attr, inv_expm1_factor, package
from ntkit.predict._matfun import (
    DEFLATION_STEPS,
    EIGH_FLOPS,
    Deflation,
    apply_matfun,
    certified_bound,
    deflate_top,
    deflated_plan,
    deflation_residual,
    is_positive_definite,
    phi_plan,
    quad_form,
    spectrum_bound,
    usable,
)
from ntkit.predict.gp import GPInference
from ntkit.predict.types import Gaussian

__all__ = ["EnsemblePredictor", "gradient_descent_mse_ensemble"]

#: a deflated kernel's spectrum bound is tried at these multiples of the estimate of its top eigenvalue (the
#: estimate of the benchmark's NTK is 10 % low, of its NNGP 13 %), the next one when the proof fails
TIGHTEN = (1.2, 1.6)


class _KernelSource:
    """``kernel_fn`` on the training inputs, its train-train kernels computed on first use and cached by name."""

    def __init__(self, kernel_fn: Callable, x_train: Any, kwargs: dict):
        if not callable(kernel_fn):
            raise TypeError("kernel_fn must be callable as kernel_fn(x1, x2, get), e.g. net.kernel_fn.")
        self.kernel_fn, self.x_train, self.kwargs = kernel_fn, x_train, kwargs
        self.cache: dict[str, Union[Tensor, np.ndarray]] = {}

    def __call__(self, x1: Any, x2: Any, names: tuple[str, ...]) -> dict[str, Union[Tensor, np.ndarray]]:
        k = self.kernel_fn(x1, x2, names, **self.kwargs)
        return {g: get_attr(k, g, "kernel_fn's output") for g in names}

    def prefetch(self, names: tuple[str, ...]) -> None:
        """The train-train kernels ``names`` not yet cached, in one ``kernel_fn`` call."""
        missing = tuple(g for g in names if g not in self.cache)
        if missing:
            self.cache.update(self(self.x_train, None, missing))

    def train(self, g: str) -> Union[Tensor, np.ndarray]:
        self.prefetch((g,))
        return self.cache[g]


class EnsemblePredictor:
    """Predictor returned by :func:`gradient_descent_mse_ensemble`;
    ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``.

    Finite-``t`` test predictions apply ``g_τ(Θ) = Θ⁻¹(I - exp(-τΘ))`` (``τ = η t / N``) to the targets and the
    test-train kernels either through the cached eigendecomposition of ``Θ`` or, without it, by a Chebyshev
    polynomial of ``Θ`` with an a priori error bound (:mod:`ntkit.predict._matfun`). :attr:`method` chooses:
    ``"auto"`` (default: on a predictor's first finite-``t`` call the cheaper by a FLOP model, later ``eigh``,
    computed once and cached), ``"eigh"`` or
    ``"chebyshev"`` (falls back to ``eigh`` where the polynomial cannot guarantee ``1e-13`` relative accuracy or
    the kernel is not positive definite). :attr:`last_method` records what each kernel used in the last call,
    with the degree and error bound of the polynomial.
    """

    method: str = "auto"

    def __init__(
        self,
        kernel_fn,
        x_train,
        y_train,
        learning_rate,
        diag_reg,
        diag_reg_absolute_scale,
        trace_axes,
        kernel_fn_kwargs,
    ):
        self.kernels = _KernelSource(kernel_fn, x_train, kernel_fn_kwargs)
        as_times(0.0, learning_rate, F64, "cpu")
        self.learning_rate = float(learning_rate)
        self._spec: dict[str, dict] = {}
        device = x_train.device if isinstance(x_train, Tensor) else torch.device("cpu")
        dtype = (
            x_train.dtype
            if isinstance(x_train, Tensor)
            else (torch.from_numpy(x_train).dtype if isinstance(x_train, np.ndarray) else torch.get_default_dtype())
        )
        # the posterior reads the train kernels from the source, not from this predictor: no reference cycle, so
        # a predictor's kernels and factorisations are freed by reference counting when it goes out of scope
        self.gp = GPInference.from_kernel_source(
            self.kernels.train, y_train, diag_reg, diag_reg_absolute_scale, trace_axes, dtype, device
        )
        self.layout, self.n = self.gp.layout, self.gp.n
        self.norm = float(self.gp.y.numel())
        self.last_method: dict[str, dict] = {}

    @property
    def kernel_fn(self) -> Callable:
        return self.kernels.kernel_fn

    @property
    def x_train(self) -> Any:
        return self.kernels.x_train

    def __call__(
        self, t: Any = None, x_test: Any = None, get: Union[str, Sequence[str], None] = None, compute_cov: bool = False
    ):
        """Mean (and covariance) over random initialisations of infinitely wide networks trained for time ``t``.

        Args:
          t: ``None`` (infinite time: :func:`gp_inference`), a number or an array of times of any shape ``S``.
          x_test: test inputs; ``None`` predicts on the training inputs (unregularised, NT's convention).
          get: ``"nngp"`` (only the last layer trained), ``"ntk"`` (all layers), or a tuple; ``None``: both.
          compute_cov: also return the covariance over the ensemble.

        Returns: per name the mean ``S + (n_test, *outputs)``, or :class:`Gaussian` with the covariance
        ``S + (n_test, n_test, ...)``; a string ``get`` returns the bare value, a tuple a namedtuple.
        """
        names, single = normalize_get(get, ("nngp", "ntk"))
        needed = tuple(g for g in ("nngp", "ntk") if g in names or (g == "nngp" and compute_cov))
        self.kernels.prefetch(needed)
        k_td = nngp_tt = None
        if x_test is not None:
            k_td = SimpleNamespace(**self.kernels(x_test, self.x_train, needed))
            if compute_cov:
                nngp_tt = self.kernels(x_test, None, ("nngp",))["nngp"]
        if t is None:
            return self.gp(
                names if not single else names[0],
                k_test_train=k_td,
                k_test_test=nngp_tt if x_test is not None else (True if compute_cov else None),
            )
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

    # -- without eigh: Chebyshev polynomials of the train kernel ---------------------------------------
    def _chebyshev_plans(
        self, g: str, ts: Tensor, cols: int, compute_cov: bool
    ) -> Optional[tuple[list, Optional[Deflation]]]:
        """Per time, the plans (``g_τ`` for the mean, and ``g_2τ`` for NNGP covariances) and the deflation of the
        top eigenpair they are made for (or None) when the polynomial path is chosen for kernel ``g``
        (``cols``: test columns the covariance needs), else None."""
        if self.method not in ("auto", "chebyshev", "eigh"):
            raise ValueError(f"method={self.method!r}: choose 'auto', 'eigh' or 'chebyshev'.")
        sp = self._spec.setdefault(g, {})
        sp["finite_calls"] = sp.get("finite_calls", 0) + 1
        # auto: the polynomial on the first finite-t call of a predictor only; from the second on, the
        # eigendecomposition is computed once and reused (its later calls are a few products)
        again = "lam" in sp or sp["finite_calls"] > 1
        if self.method == "eigh" or (self.method == "auto" and again) or not bool(torch.isfinite(ts).all()):
            return None
        A = self.gp.factor(g).matrix
        M = A.shape[0]
        b = spectrum_bound(A)
        taus = [t / self.norm for t in ts.tolist()]
        y_cols = self.gp.y_flat.shape[1]

        def make(plan_of) -> list:
            out = []
            for tau in taus:
                mean_plan = plan_of(tau)
                cov_plan = None
                if compute_cov:
                    cov_plan = mean_plan if g == "ntk" else plan_of(2 * tau)
                out.append((mean_plan, cov_plan))
            return out

        def flops(plans: list) -> float:
            """Products ``Θ · (M × columns)``; an NNGP covariance is a quadratic form (``_matfun.quad_form``:
            half the products and one Gram product)."""
            total = 0.0
            for pm, pc in plans:
                total += 2.0 * M * M * pm.products * y_cols
                if pc is not None and g == "nngp":
                    total += 2.0 * M * cols * (M * (-(-pc.degree // 2)) + cols * (pc.degree // 2 + 1))
                elif pc is not None:
                    total += 2.0 * M * M * pc.products * cols
            return total

        plans = make(lambda tau: phi_plan(tau, b, n=M))
        defl = None
        tau_max = max(taus) * (2.0 if compute_cov and g == "nngp" else 1.0)
        if tau_max > 0.0 and M > 1 and max(p.degree for pair in plans for p in pair if p is not None) > 2:
            # the top eigenpair taken out (_matfun: the polynomial then spans about λ_2, not λ_1), with the
            # residual that keeps the deflation's error below DEFLATION_RTOL at the largest τ
            defl = deflate_top(A, deflation_residual(tau_max, b))
            if defl is not None:

                def on(dp: Deflation) -> list:
                    """The plans for the deflation ``dp``."""
                    return make(lambda tau: deflated_plan(tau, dp, b, n=M))

                deflated = on(defl)
                # a tighter bound on M's spectrum than its norms, proven by a float32 Cholesky factorisation
                # (_matfun.certified_bound), tried at multiples of the estimate of λ_max(M) where the degrees it
                # saves pay for the factorisation
                loose = flops(deflated)
                for mult in TIGHTEN:
                    guess = dataclasses.replace(defl, b=defl.estimate * mult)
                    if guess.b >= defl.b or loose - flops(on(guess)) < M**3 / 3.0:
                        break
                    proven = certified_bound(defl.M, guess.b, defl.fro)
                    if proven is not None:
                        defl = dataclasses.replace(defl, b=min(proven, defl.b))
                        deflated = on(defl)
                        break
                if all(usable(p) for pair in deflated for p in pair if p is not None) and flops(
                    deflated
                ) + 2.0 * M * M * (DEFLATION_STEPS + 2) < flops(plans):
                    plans = deflated
                else:
                    defl = None
        if not all(usable(p) for pair in plans for p in pair if p is not None):
            return None
        if self.method == "auto":
            eig = EIGH_FLOPS * M**3 + (4.0 * M**3 if compute_cov and g == "ntk" else 0.0)
            if flops(plans) >= eig:
                return None
        if not is_positive_definite(A):  # eigenvalues outside [0, b]: eigh decides (singular, or not PSD)
            return None
        return plans, defl

    def _finite_chebyshev(self, g, plans, defl, ts, t_shape, k_td, nngp_tt, compute_cov):
        """Test predictions with ``W = p(Θ) B`` for the plans' polynomials ``p ≈ g_τ`` (same formulas as
        :meth:`_finite`, with ``V g(λ) Vᵀ`` replaced by ``p(Θ)``; with ``defl``, by the deflated form of
        :func:`~ntkit.predict._matfun.apply_matfun`)."""
        A = self.gp.factor(g).matrix
        y, lay = self.gp.y_flat, self.layout
        ktd = self.gp.test_kernel(k_td, g, "k_test_train")
        m = ktd.shape[0] // max(1, math.prod(lay.rest_shape))
        mt, T = ktd.shape[0], len(plans)
        check_memory(
            bytes64(T, mt, mt) * (3 if compute_cov else 0) + bytes64(T, mt, y.shape[1]) + bytes64(3, A.shape[0], mt),
            self.gp.device,
            "ensemble test predictions",
        )
        k_tt = knt = kdd = None
        if compute_cov:
            k_tt = self.gp.test_test_kernel(nngp_tt, "nngp", m)
            if g == "ntk":
                knt = self.gp.test_kernel(k_td, "nngp", "k_test_train")
                kdd = self.gp.k_dd("nngp")
        means, covs = [], []
        W: Optional[Tensor]
        for pm, pc in plans:
            W = None
            if compute_cov and g == "ntk":  # one polynomial for the targets and the test kernel's columns
                w = apply_matfun(A, torch.cat([y, ktd.T], 1), pm, defl)
                gy, W = w[:, : y.shape[1]], w[:, y.shape[1] :]
            else:
                gy = apply_matfun(A, y, pm, defl)
            means.append(ktd @ gy)
            if compute_cov:
                assert pc is not None and k_tt is not None, "covariances have their plan and test kernel"
                if g == "nngp":  # K_tt - K_td g_2τ(K) K_dt, a quadratic form (half the products)
                    covs.append(k_tt - quad_form(A, ktd.T, pc, defl))
                else:
                    assert W is not None, "the NTK covariance reads g(Θ) Θ_dt"
                    assert knt is not None and kdd is not None, "NTK covariances read the NNGP kernels"
                    term2 = W.T @ knt.T
                    covs.append(W.T @ (kdd @ W) - term2 - term2.T + k_tt)
        used = [p for pair in plans for p in pair if p is not None]
        self.last_method[g] = {
            "method": "chebyshev",
            "degree": [pm.degree for pm, _ in plans],
            "float32_from": [pm.float32_from for pm, _ in plans],
            "rel_bound": max(p.rel_bound + p.rel_deflation for p in used),
            "deflated": defl is not None,
        }
        mean = lay.unflatten(torch.stack(means), m)
        mean = (mean.reshape(t_shape + tuple(mean.shape[1:])) if t_shape else mean[0]).to(self.gp.dtype)
        if not compute_cov:
            return mean
        cov = lay.zip_cov(torch.stack(covs), m)
        cov = (cov.reshape(t_shape + tuple(cov.shape[1:])) if t_shape else cov[0]).to(self.gp.dtype)
        return Gaussian(mean, cov)

    def _finite(self, g, ts, t_shape, k_td, nngp_tt, compute_cov):
        if k_td is not None:
            cols = self.gp.test_kernel(k_td, g, "k_test_train").shape[0] if compute_cov else 0
            chosen = self._chebyshev_plans(g, ts, cols, compute_cov)
            if chosen is not None:
                return self._finite_chebyshev(g, *chosen, ts, t_shape, k_td, nngp_tt, compute_cov)
        self.last_method[g] = {"method": "eigh"}
        sp = self._spectral(g, compute_cov and g == "ntk" and k_td is not None)
        lam, vec, c, cutoff = sp["lam"], sp["vec"], sp["c"], sp["cutoff"]
        norm, y, lay = self.norm, self.gp.y_flat, self.layout
        T = ts.numel()
        if k_td is None:
            m, M = self.n, y.shape[0]
            check_memory(
                bytes64(T, M, M) * (3 if compute_cov else 0) + bytes64(T, *y.shape),
                self.gp.device,
                "ensemble predictions on the training set",
            )
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
            ktd = self.gp.test_kernel(k_td, g, "k_test_train")
            m = ktd.shape[0] // max(1, math.prod(lay.rest_shape))
            mt = ktd.shape[0]
            check_memory(
                bytes64(T, mt, mt) * (3 if compute_cov else 0) + bytes64(T, mt, y.shape[1]),
                self.gp.device,
                "ensemble test predictions",
            )
            p = ktd @ vec  # (m, M)
            neg = -inv_expm1_factor(lam, ts, norm, cutoff)  # (T, M)
            mean = p @ (neg[:, :, None] * c)
            cov = None
            if compute_cov:
                k_tt = self.gp.test_test_kernel(nngp_tt, "nngp", m)
                if g == "nngp":
                    h = -inv_expm1_factor(lam, 2 * ts, norm, cutoff)
                    cov = k_tt - (p[None] * h[:, None, :]) @ p.T
                else:
                    q = self.gp.test_kernel(k_td, "nngp", "k_test_train") @ vec  # (m, M)
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


def gradient_descent_mse_ensemble(
    kernel_fn: Callable,
    x_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
    **kernel_fn_train_train_kwargs,
) -> EnsemblePredictor:
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
    return EnsemblePredictor(
        kernel_fn,
        x_train,
        y_train,
        learning_rate,
        diag_reg,
        diag_reg_absolute_scale,
        trace_axes,
        kernel_fn_train_train_kwargs,
    )
