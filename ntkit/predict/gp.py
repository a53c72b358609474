"""GP posteriors of infinitely wide networks (``t = ∞``): the NNGP posterior, the infinite NTK ensemble trained
to convergence (Lee et al. 2019) and the NTK-GP (He et al. 2020); NT's ``gp_inference``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from ntkit._inputs import to_tensor
from ntkit.kernel import normalize_get
from ntkit.linalg.dense import PSDMatrix, as_kernel_matrix
from ntkit.predict._layout import F64, Axes, check_train_kernel, get_attr, out_dtype, package, targets
from ntkit.predict.types import Gaussian

__all__ = ["GPInference", "gp_inference"]


class GPInference:
    """Predictor returned by :func:`gp_inference`; ``predict_fn(get=None, k_test_train=None, k_test_test=None)``.

    Train-train factorisations and ``K⁻¹ y`` are cached per kernel name.
    """

    def __init__(
        self,
        k_train_train: Any,
        y_train: Any,
        diag_reg: float = 0.0,
        diag_reg_absolute_scale: bool = False,
        trace_axes: Axes = (-1,),
    ):
        first = (
            k_train_train
            if isinstance(k_train_train, (Tensor, np.ndarray))
            else (
                getattr(k_train_train, "nngp", None)
                if getattr(k_train_train, "nngp", None) is not None
                else get_attr(k_train_train, "ntk", "k_train_train")
            )
        )
        first = to_tensor(first, "k_train_train", check_finite=False)
        self._setup(
            lambda g: get_attr(k_train_train, g, "k_train_train"),
            y_train,
            diag_reg,
            diag_reg_absolute_scale,
            trace_axes,
            first.dtype,
            first.device,
        )

    @classmethod
    def from_kernel_source(
        cls,
        source: Callable[[str], Any],
        y_train: Any,
        diag_reg: float,
        diag_reg_absolute_scale: bool,
        trace_axes: Axes,
        dtype: torch.dtype,
        device: torch.device,
    ) -> GPInference:
        """A posterior whose train-train kernels are computed on first use by ``source(name)`` (e.g. by a
        ``kernel_fn``), returned in ``dtype`` on ``device``."""
        self = cls.__new__(cls)
        self._setup(source, y_train, diag_reg, diag_reg_absolute_scale, trace_axes, dtype, device)
        return self

    def _setup(
        self,
        source: Callable[[str], Any],
        y_train: Any,
        diag_reg: float,
        absolute: bool,
        trace_axes: Axes,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._source = source
        self.dtype, self.device = out_dtype(dtype), device
        self.y, self.layout = targets(y_train, trace_axes, device)
        self.y_flat = self.layout.flatten(self.y.to(F64))
        self.n = self.layout.y_shape[0]
        self.diag_reg, self.absolute = diag_reg, absolute
        self._k2: dict[str, Tensor] = {}
        self._factors: dict[str, PSDMatrix] = {}
        self._kinv_y: dict[str, Tensor] = {}

    def _checked(self, g: str) -> Tensor:
        """Flattened ``(M, M)`` train-train kernel ``g``, checked finite and symmetric, in its own dtype."""
        if g not in self._k2:
            k2 = check_train_kernel(self._source(g), self.layout, f"k_train_train.{g}")
            self._k2[g] = as_kernel_matrix(k2, f"k_train_train.{g}")
        return self._k2[g]

    def k_dd(self, g: str) -> Tensor:
        """The unregularised train-train kernel ``g`` in float64, flattened to ``(M, M)``."""
        return self._checked(g).to(F64)

    def factor(self, g: str) -> PSDMatrix:
        if g not in self._factors:
            self._factors[g] = PSDMatrix(
                self._checked(g),
                f"k_train_train.{g}",
                diag_reg=self.diag_reg,
                diag_reg_absolute_scale=self.absolute,
                checked=True,
            )
        return self._factors[g]

    def kinv_y(self, g: str) -> Tensor:
        if g not in self._kinv_y:
            self._kinv_y[g] = self.factor(g).solve(self.y_flat)
        return self._kinv_y[g]

    def test_kernel(self, k: Any, g: str, name: str = "k_test_train") -> Tensor:
        """Test-train kernel ``g`` of ``k`` (a matrix or a Kernel) checked and flattened to ``(m·A, M)``."""
        t = to_tensor(get_attr(k, g, name), name, dtype=F64, device=self.device)
        if t.dim() < 2:
            raise ValueError(f"{name} must be (n_test, n_train), got shape {tuple(t.shape)}.")
        return self.layout.kernel_2d(t, name, n2=self.n, n1=t.shape[0])

    def test_test_kernel(self, k: Any, g: str, m: int) -> Tensor:
        """Test-test kernel ``g`` of ``k`` for ``m`` test points, checked and flattened to ``(m·A, m·A)``."""
        t = to_tensor(get_attr(k, g, "k_test_test"), "k_test_test", dtype=F64, device=self.device)
        return self.layout.kernel_2d(t, "k_test_test", n2=m, n1=m)

    def __call__(self, get: Union[str, Sequence[str], None] = None, k_test_train: Any = None, k_test_test: Any = None):
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
        names, single = normalize_get(get, ("nngp", "ntk", "ntkgp"), default=("nngp", "ntk"))
        out: dict[str, Union[Tensor, Gaussian]] = {}
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
            k_td = self.test_kernel(k_test_train, kg, "k_test_train")
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
            return self.test_test_kernel(k_test_test, kg, m) - w.T @ w
        # ntk: the infinite ensemble trained to convergence (Lee et al. 2019, eq. 16):
        #   Σ = K_tt + A K_dd Aᵀ - (A K_td,nngpᵀ + transpose),   A = Θ_td Θ_dd⁻¹
        if isinstance(k_test_train, (Tensor, np.ndarray)):
            raise ValueError(
                "the NTK posterior covariance needs both the NTK and the NNGP: pass k_test_train "
                "(and k_train_train) as Kernels computed with get=('nngp', 'ntk')."
            )
        nngp_td = self.test_kernel(k_test_train, "nngp", "k_test_train")
        k_tt = self.test_test_kernel(k_test_test, "nngp", m)
        a_t = self.factor("ntk").solve(k_td.T)  # Θ_dd⁻¹ Θ_dt = Aᵀ, (M, m)
        term2 = a_t.T @ nngp_td.T  # A K_dt
        return k_tt + a_t.T @ (self.k_dd("nngp") @ a_t) - term2 - term2.T


def gp_inference(
    k_train_train: Any,
    y_train: Any,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> GPInference:
    """Posterior of the NNGP / infinite NTK ensemble / NTK-GP given training data (NT's ``gp_inference``).

    ``mean = K_td (K_dd + r I)⁻¹ y``; NNGP covariance ``K_tt - K_td (K_dd + r I)⁻¹ K_dt``; the NTK
    covariance is that of an infinite ensemble trained to convergence (Lee et al. 2019). ``k_train_train`` is
    a matrix or a Kernel with the kernels you will ``get`` (both for the NTK covariance).
    """
    return GPInference(k_train_train, y_train, diag_reg, diag_reg_absolute_scale, trace_axes)
