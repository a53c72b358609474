"""Student-t posteriors: a scale mixture of NNGPs with an inverse-gamma prior on the last-layer variance
(Lee et al. 2022)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import Tensor

from ntkit.predict._layout import Axes, get_attr
from ntkit.predict.gp import GPInference
from ntkit.predict.types import StudentT

__all__ = ["StudentTPredictor", "student_t_inference"]


class StudentTPredictor:
    """Predictor returned by :func:`student_t_inference`; ``predict_fn(k_test_train=None, k_test_test=None)``.

    Attributes: ``alpha``, ``beta`` (posterior inverse-gamma parameters of the last-layer variance ``σ²``),
    ``df = 2·alpha`` (degrees of freedom of the predictive).
    """

    def __init__(self, k_train_train, y_train, alpha, beta, diag_reg, diag_reg_absolute_scale, trace_axes):
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a finite number > 0 (inverse-gamma prior on σ²).")
        k = (
            k_train_train
            if isinstance(k_train_train, (Tensor, np.ndarray))
            else get_attr(k_train_train, "nngp", "k_train_train")
        )
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


def student_t_inference(
    k_train_train: Any,
    y_train: Any,
    alpha: float = 2.0,
    beta: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> StudentTPredictor:
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
