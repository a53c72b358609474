"""scikit-learn estimators backed by infinite-width kernels.

* :class:`NTKRegressor` — the mean output of an infinitely wide network trained by gradient flow on MSE for
  time ``t`` (``t=None``: to convergence, i.e. NTK kernel regression; Jacot et al. 2018, Lee et al. 2019).
* :class:`NTKClassifier` — the same on one-hot targets centred as in Arora et al. 2019 (``1 - 1/K`` for the
  true class, ``-1/K`` otherwise; ``0.9 / -0.1`` for ten classes), prediction by the largest output.
* :class:`NNGPRegressor` — the exact Bayesian posterior of the infinitely wide network (a GP with the NNGP
  kernel): posterior mean, and standard deviation with ``return_std=True``.
* :class:`NTKSVC` — a support vector machine on the NTK (precomputed-kernel :class:`sklearn.svm.SVC`); a
  soft-margin SVM is the infinite-width limit of a network trained on the hinge loss (Chen et al. 2021).
* :func:`kernel` — a network's kernel as a :class:`sklearn.gaussian_process.kernels.Kernel`, usable by any
  scikit-learn estimator that takes a kernel (``SVC``, ``KernelRidge``, ``GaussianProcessRegressor``, ...).

Each estimator takes ``net`` (any ntkit network); with ``net=None`` it uses
:func:`~ntkit.architectures.fc_net` with the
estimator's ``depth``, ``W_std`` and ``b_std``, so those can be tuned by ``GridSearchCV``. The predictions
use :mod:`ntkit.predict`; kernels are computed in float64 by default, in memory-bounded tiles
(:func:`ntkit.tiling.kernel_matrix`). Inputs are used as given: put a scaler in front in a ``Pipeline``.

Defaults (since 0.2): the regressors standardise the targets (``normalize_y=True``: subtract the mean, divide by
the standard deviation, undo both on the predictions), so predictions are invariant to shifting ``y`` and
equivariant to scaling it; the ridge is chosen from the data (``diag_reg="auto"``): by closed-form leave-one-out
cross-validation for the NTK estimators, by the GP marginal likelihood for :class:`NNGPRegressor`, over
:data:`DIAG_REG_GRID` (relative to the mean train-kernel diagonal); and :meth:`NTKClassifier.predict_proba` is a
softmax of the outputs with a temperature fitted by leave-one-out log-loss (never exactly 0 or 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import scipy.optimize
import scipy.special
import torch

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.gaussian_process.kernels import Kernel as _SkKernel
    from sklearn.svm import SVC
    from sklearn.utils.multiclass import check_classification_targets
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # pragma: no cover - exercised only without scikit-learn
    raise ImportError(
        "ntkit.sklearn needs scikit-learn >= 1.6; install it with `pip install 'ntkit[sklearn]'` "
        "(or `pip install scikit-learn`)."
    ) from e

from ntkit._inputs import parse_dtype
from ntkit.architectures import SQRT2, fc_net
from ntkit.memory import check_fits
from ntkit.nets import Net
from ntkit.predict import gp_inference, gradient_descent_mse
from ntkit.tiling import kernel_matrix

__all__ = [
    "NTKRegressor",
    "NTKClassifier",
    "NNGPRegressor",
    "NTKSVC",
    "NetKernel",
    "kernel",
    "fc_net",
    "compute_kernels",
    "DIAG_REG_GRID",
    "PROBA_FLOOR",
]

#: Candidate ridges for ``diag_reg="auto"``, relative to the mean train-kernel diagonal: ``1e-6 … 1e1``, four per
#: decade (29 values).
DIAG_REG_GRID: tuple[float, ...] = tuple(10.0 ** (k / 4) for k in range(-24, 5))

#: ``predict_proba`` mixes the tempered softmax with the uniform distribution at this weight, so that no
#: probability underflows to exactly 0 (or rounds to exactly 1) far from the data.
PROBA_FLOOR = 1e-9

_F64 = torch.float64


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    return torch.from_numpy(np.array(x, dtype=np.float64)).to(dtype)  # a writable copy


def compute_kernels(
    net: Net,
    x1: Any,
    x2: Any = None,
    get: Union[str, Sequence[str]] = ("nngp", "ntk"),
    dtype: Union[str, torch.dtype] = "float64",
    device: Union[str, torch.device, None] = None,
    progress: Optional[bool] = False,
) -> dict[str, torch.Tensor]:
    """Kernels of ``net`` between ``x1`` and ``x2`` (numpy or torch) as float tensors, tile by tile.

    Returns ``{name: tensor}`` for the names in ``get``.
    """
    dt = parse_dtype(dtype)
    x1 = _as_tensor(x1, dt)
    x2 = None if x2 is None else _as_tensor(x2, dt)
    if device is not None:
        x1 = x1.to(device)
        x2 = None if x2 is None else x2.to(device)
    names = (get,) if isinstance(get, str) else tuple(get)
    out = kernel_matrix(net.kernel_fn, x1, x2, get=names, progress=progress)
    return out if isinstance(out, dict) else {names[0]: out}


# -----------------------------------------------------------------------------------------------------
# choosing the ridge: closed-form leave-one-out and the GP marginal likelihood
# -----------------------------------------------------------------------------------------------------
def _ridge_grid(diag_reg: Any) -> tuple[Optional[np.ndarray], float]:
    """``diag_reg`` validated: ``(candidate ridges, nan)`` for ``"auto"`` or a sequence, ``(None, value)`` for a
    number."""
    if isinstance(diag_reg, str):
        if diag_reg != "auto":
            raise ValueError(
                f"diag_reg={diag_reg!r}: pass 'auto' (chosen from the data over DIAG_REG_GRID), a number >= 0, "
                "or a sequence of candidate numbers > 0."
            )
        return np.asarray(DIAG_REG_GRID), float("nan")
    if isinstance(diag_reg, (int, float, np.integer, np.floating)) and not isinstance(diag_reg, bool):
        if not (np.isfinite(diag_reg) and diag_reg >= 0):
            raise ValueError(f"diag_reg={diag_reg!r} must be 'auto', a finite number >= 0, or a sequence of them.")
        return None, float(diag_reg)
    try:
        grid = np.asarray(diag_reg, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"diag_reg={diag_reg!r}: pass 'auto', a number >= 0, or a sequence of candidate numbers > 0."
        ) from e
    if grid.size == 0 or not np.all(np.isfinite(grid) & (grid > 0)):
        raise ValueError(f"diag_reg={diag_reg!r}: a sequence of candidates must be non-empty, finite and > 0.")
    return grid, float("nan")


class _SpectralLOO:
    """Leave-one-out residuals of the NTK predictor for many ridges from one eigendecomposition.

    The predictor at the training inputs is the linear smoother ``H = V diag(s·φ(s + λ)) Vᵀ`` of the train kernel
    ``K = V diag(s) Vᵀ``, with ``φ(μ) = 1/μ`` at ``t = None`` and ``φ(μ) = (1 - exp(-c μ))/μ`` at finite time
    (``c = η t / N``, :mod:`ntkit.predict.mse`). Its leave-one-out residuals are ``(y - H y)_i / (1 - H_ii)``,
    with ``1 - s·φ(s + λ) = (λ + s·exp(-c (s + λ)))/(s + λ)`` (``λ/(s + λ)`` at ``t = None``). At ``t = None``
    (kernel ridge regression) this is the exact LOO residual ``α_i / [(K + λI)⁻¹]_ii``; at finite time it is the
    standard leave-one-out formula for linear smoothers.
    """

    def __init__(self, k: torch.Tensor, Y: np.ndarray, ct: Optional[float]):
        k = _eigh_ready(k, "leave-one-out")
        s, v = torch.linalg.eigh(k)
        self.s = s.clamp_min(0.0)
        self.v = v
        self.v2 = v * v
        self.c = v.T @ torch.from_numpy(np.ascontiguousarray(Y, dtype=np.float64)).to(k.device)
        self.scale = float(torch.diagonal(k).mean())
        self.ct = ct

    def residuals(self, rel: float) -> np.ndarray:
        lam = rel * self.scale
        if lam <= 0:
            raise ValueError("leave-one-out needs a ridge > 0.")
        if self.ct is None:
            rho = lam / (self.s + lam)
        else:
            rho = (lam + self.s * torch.exp(-self.ct * (self.s + lam))) / (self.s + lam)
        r = self.v @ (rho[:, None] * self.c)
        d = self.v2 @ rho
        return (r / d[:, None]).cpu().numpy()

    def mse(self, rel: float) -> float:
        return float(np.mean(self.residuals(rel) ** 2))


def _eigh_ready(k: torch.Tensor, what: str) -> torch.Tensor:
    """``k`` in float64, after checking that its eigendecomposition (about four ``n × n`` matrices) fits."""
    n = k.shape[0]
    check_fits(
        4 * n * n * 8,
        k.device,
        f"the eigendecomposition of the {n}x{n} train kernel for {what}",
        "use fewer training points, or (regressors) pass a fixed number as diag_reg",
    )
    return k.to(_F64)


def _gp_log_marginal_likelihood(k: torch.Tensor, Y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """``log p(Y | λ)`` of the GP ``Y[:, j] ~ N(0, K + λ·mean(diag K)·I)`` (independent columns) for each relative
    ``λ`` in ``grid`` (the quantity scikit-learn's ``GaussianProcessRegressor`` maximises): by one Cholesky
    factorisation for one ``λ`` (``nan`` if it fails), else from one eigendecomposition."""
    n, T = Y.shape
    y = torch.from_numpy(np.ascontiguousarray(Y, dtype=np.float64)).to(k.device)
    if len(grid) == 1:
        a = k.to(_F64).clone()
        torch.diagonal(a).add_(float(grid[0]) * float(torch.diagonal(a).mean()))
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            return np.array([float("nan")])
        z = torch.linalg.solve_triangular(chol, y, upper=False)
        logdet = 2.0 * float(torch.log(torch.diagonal(chol)).sum())
        return np.array([-0.5 * float((z * z).sum()) - 0.5 * T * logdet - 0.5 * n * T * np.log(2 * np.pi)])
    k = _eigh_ready(k, "the marginal likelihood")
    s, v = torch.linalg.eigh(k)
    s = s.clamp_min(0.0)
    c2 = ((v.T @ y) ** 2).sum(1)
    scale = float(torch.diagonal(k).mean())
    out = np.empty(len(grid))
    for i, rel in enumerate(grid):
        mu = s + rel * scale
        out[i] = float(-0.5 * (c2 / mu).sum() - 0.5 * T * torch.log(mu).sum()) - 0.5 * n * T * np.log(2 * np.pi)
    return out


def _standardize(y: np.ndarray, on: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(Y - mean) / std`` per column (``std`` 0 is taken as 1, as scikit-learn does), and the mean and std;
    with ``on=False`` the identity (mean 0, std 1)."""
    if not on:
        return y, np.zeros(y.shape[1]), np.ones(y.shape[1])
    mean = y.mean(axis=0)
    std = y.std(axis=0)
    std = np.where(std > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0), std, 1.0)
    return (y - mean) / std, mean, std


class _KernelEstimator(BaseEstimator):
    """Shared machinery: the network, kernel computation, input validation."""

    def _net(self) -> Net:
        if self.net is not None:
            if not isinstance(self.net, Net):
                raise TypeError(f"net must be an ntkit network (ntkit.serial(...)), got {type(self.net).__name__}.")
            return self.net
        return fc_net(self.depth, self.W_std, self.b_std)

    def _kernels(self, x1, x2=None, get=("ntk",)) -> dict[str, torch.Tensor]:
        return compute_kernels(self._net(), x1, x2, get, self.dtype, self.device)

    def _check_X(self, X, reset: bool):
        return validate_data(self, X, reset=reset, dtype=np.float64)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = False
        return tags


class _NTKFlow(_KernelEstimator):
    """What NTKRegressor and NTKClassifier share: the parameters, the choice of the ridge, and the NTK
    gradient-flow predictor on (already encoded) targets."""

    _get = "ntk"

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        diag_reg: Union[str, float, Sequence[float]] = "auto",
        t: Optional[float] = None,
        learning_rate: float = 1.0,
        dtype: str = "float64",
        device: Optional[str] = None,
    ):
        self.net = net
        self.depth = depth
        self.W_std = W_std
        self.b_std = b_std
        self.diag_reg = diag_reg
        self.t = t
        self.learning_rate = learning_rate
        self.dtype = dtype
        self.device = device

    def _fit_targets(self, X, Y: np.ndarray, need_loo: bool = False) -> Optional[np.ndarray]:
        """Fit on encoded targets ``Y`` ``(n, T)``; returns the leave-one-out outputs at the chosen ridge when
        ``need_loo`` (else ``None``)."""
        # numpy's isscalar is a TypeGuard to generic | complex | str | bytes | memoryview, not all of which float()
        # accepts (typeshed); at run time such a t (e.g. complex) raises TypeError here, as it always has
        if self.t is not None and not (np.isscalar(self.t) and float(self.t) >= 0):  # type: ignore[arg-type]
            raise ValueError(f"t={self.t!r} must be None (infinite time) or a number >= 0.")
        grid, fixed = _ridge_grid(self.diag_reg)
        k = self._kernels(X, None, (self._get,))[self._get]
        self.X_fit_ = X
        self.diag_reg_ = fixed
        self.cv_results_: Optional[dict[str, np.ndarray]] = None
        loo_out: Optional[np.ndarray] = None
        if grid is not None or need_loo:
            t = None if self.t is None else float(self.t)  # type: ignore[arg-type]  # validated above
            ct = None
            if t is not None and np.isfinite(t):
                lr = self.learning_rate
                if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
                    raise ValueError(f"learning_rate={lr!r} must be a finite number > 0.")
                ct = float(lr) * t / Y.size
            loo = _SpectralLOO(k, Y, ct)
            if grid is not None:
                scores = np.array([loo.mse(float(r)) for r in grid])
                best = int(np.argmin(scores))  # the first (smallest) ridge among ties
                self.diag_reg_ = float(grid[best])
                self.cv_results_ = {"diag_reg": grid.copy(), "loo_mse": scores}
            if need_loo:
                rel = self.diag_reg_ if self.diag_reg_ > 0 else DIAG_REG_GRID[0]  # LOO needs a ridge > 0
                loo_out = Y - loo.residuals(rel)
        self.predictor_ = gradient_descent_mse(
            k, _as_tensor(Y, torch.float64), learning_rate=self.learning_rate, diag_reg=self.diag_reg_
        )
        return loo_out

    def _scores(self, X) -> np.ndarray:
        check_is_fitted(self, "predictor_")
        X = self._check_X(X, reset=False)
        k = self._kernels(X, self.X_fit_, (self._get,))[self._get]
        f0 = torch.zeros((), dtype=torch.float64)
        out = self.predictor_(self.t, None, f0, k)
        return out.detach().cpu().numpy().astype(np.float64)


class NTKRegressor(RegressorMixin, _NTKFlow):
    """Mean prediction of an infinitely wide network trained on MSE by gradient flow for time ``t``.

    ``f_t(x) = Θ(x, X) Θ⁻¹ (I - exp(-η Θ t / N)) y`` (zero initial outputs, the ensemble mean); ``t=None``
    is ``Θ(x, X) (Θ + r I)⁻¹ y``, NTK kernel regression.

    By default the targets are standardised (``normalize_y=True``) and the ridge is chosen by leave-one-out
    cross-validation (``diag_reg="auto"``), so predictions are invariant to shifting ``y`` and equivariant to
    scaling it, and noisy targets are not interpolated.

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: ridge ``r = diag_reg · mean(diag K)`` added to the train kernel (NT's relative convention).
        ``"auto"`` (default) chooses it among :data:`DIAG_REG_GRID` (``1e-6 … 1e1``, four per decade) by the
        smallest leave-one-out MSE on the (standardised) targets, computed in closed form from one
        eigendecomposition of the train kernel: exact leave-one-out for ``t=None``, the linear-smoother
        leave-one-out formula on the spectral filter for finite ``t``; ties go to the smaller ridge. A sequence
        of numbers > 0 is searched the same way; a number is used as given. The value used is ``diag_reg_``.
      t: training time in units of ``learning_rate`` (``None``: infinite).
      learning_rate: ``η`` (only ``η·t`` matters).
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
      normalize_y: standardise the targets before fitting (subtract the mean, divide by the standard deviation,
        per output, as ``GaussianProcessRegressor(normalize_y=True)``) and undo it on the predictions. Default
        ``True``; with ``False`` the network is fitted to ``y`` as given (zero prior mean).

    Attributes:
      diag_reg_: the relative ridge used. ``cv_results_``: ``{"diag_reg": grid, "loo_mse": scores}`` when it was
      chosen by cross-validation (``None`` otherwise). ``y_mean_``, ``y_std_``: the target normalisation (0 and 1
      when ``normalize_y=False``). ``predictor_``: the fitted :class:`~ntkit.predict.mse.MSEPredictor`.
    """

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        diag_reg: Union[str, float, Sequence[float]] = "auto",
        t: Optional[float] = None,
        learning_rate: float = 1.0,
        dtype: str = "float64",
        device: Optional[str] = None,
        normalize_y: bool = True,
    ):
        super().__init__(net, depth, W_std, b_std, diag_reg, t, learning_rate, dtype, device)
        self.normalize_y = normalize_y

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        Y, self.y_mean_, self.y_std_ = _standardize(y.reshape(len(y), -1), bool(self.normalize_y))
        self._fit_targets(X, Y)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def predict(self, X) -> np.ndarray:
        s = self._scores(X) * self.y_std_ + self.y_mean_
        return s[:, 0] if self._y_1d else s


class NTKClassifier(ClassifierMixin, _NTKFlow):
    """Classifier from NTK regression on centred one-hot targets (Arora et al. 2019): the class with the
    largest output of the infinitely wide network trained on MSE for time ``t``.

    ``predict_proba`` is calibrated: ``softmax(f(x) / T)`` over the outputs ``f``, with the temperature ``T``
    (``temperature_``) fitted by minimising the leave-one-out log-loss on the training data (the LOO outputs
    come in closed form with the ridge, see ``diag_reg``), mixed with the uniform distribution at weight
    :data:`PROBA_FLOOR` (``1e-9``) so that no probability is exactly 0 or 1. Its argmax is ``predict``. The
    leave-one-out outputs cost one eigendecomposition of the train kernel at fit time (also with a fixed
    ``diag_reg``; with ``diag_reg=0`` they are taken at the smallest ridge of :data:`DIAG_REG_GRID`).

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: ridge ``r = diag_reg · mean(diag K)`` added to the train kernel (NT's relative convention).
        ``"auto"`` (default) chooses it among :data:`DIAG_REG_GRID` (``1e-6 … 1e1``, four per decade) by the
        smallest closed-form leave-one-out MSE on the encoded targets (as :class:`NTKRegressor`); a sequence of
        numbers > 0 is searched the same way; a number is used as given. The value used is ``diag_reg_``.
      t, learning_rate: as in :class:`NTKRegressor`.
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).

    Attributes:
      ``classes_``, ``diag_reg_``, ``cv_results_`` (as :class:`NTKRegressor`), ``temperature_``, ``predictor_``.
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        k = max(len(self.classes_), 2)
        Y = np.eye(k)[codes] - 1.0 / k
        loo = self._fit_targets(X, Y, need_loo=True)
        assert loo is not None, "_fit_targets returns the LOO outputs when asked"
        self.temperature_ = _fit_temperature(loo[:, : len(self.classes_)], codes)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Network outputs per class (``(n, K)``; for two classes the difference, positive for ``classes_[1]``)."""
        s = self._scores(X)
        return s[:, 1] - s[:, 0] if len(self.classes_) == 2 else s[:, : len(self.classes_)]

    def predict(self, X) -> np.ndarray:
        s = self._scores(X)[:, : len(self.classes_)]
        return self.classes_[np.argmax(s, axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        """``(1 - ε)·softmax(f(x) / temperature_) + ε/K`` with ``ε =`` :data:`PROBA_FLOOR`, ``(n, K)``."""
        s = self._scores(X)[:, : len(self.classes_)]
        p = scipy.special.softmax(s / self.temperature_, axis=1)
        return (1.0 - PROBA_FLOOR) * p + PROBA_FLOOR / p.shape[1]


def _fit_temperature(f: np.ndarray, codes: np.ndarray) -> float:
    """The temperature ``T`` minimising the mean log-loss of ``softmax(f / T)`` for labels ``codes``
    (searched on ``log T`` in ``[log 1e-4, log 1e3]``, deterministic; ``f`` are leave-one-out outputs)."""
    if f.shape[1] < 2:
        return 1.0
    rows = np.arange(len(codes))

    def loss(log_beta: float) -> float:
        z = f * np.exp(log_beta)
        return float(np.mean(scipy.special.logsumexp(z, axis=1) - z[rows, codes]))

    res = scipy.optimize.minimize_scalar(loss, bounds=(np.log(1e-3), np.log(1e4)), method="bounded")
    return float(np.exp(-res.x))


class NNGPRegressor(RegressorMixin, _KernelEstimator):
    """Gaussian-process regression with the network's NNGP kernel: the exact Bayesian posterior of the
    infinitely wide network whose last layer is trained (Lee et al. 2018).

    ``mean = K(x, X) (K + r I)⁻¹ y``, ``var = K(x, x) - K(x, X) (K + r I)⁻¹ K(X, x)`` (of the latent
    function, without observation noise). ``r = diag_reg · mean(diag K)`` is the observation-noise variance.

    By default the targets are standardised (``normalize_y=True``; the mean is added back and the standard
    deviation and covariance are scaled by ``y``'s standard deviation and variance, as in
    ``GaussianProcessRegressor(normalize_y=True)``) and the noise is chosen by the marginal likelihood
    (``diag_reg="auto"``).

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: the noise variance relative to the mean prior variance on the training inputs. ``"auto"``
        (default) chooses it among :data:`DIAG_REG_GRID` (``1e-6 … 1e1``, four per decade) by the largest GP
        log marginal likelihood of the (standardised) targets, ``log N(y | 0, K + r I)`` (the kernel's scale is
        not fitted), from one eigendecomposition; a sequence of numbers > 0 is searched the same way; a number is
        used as given. The value used is ``diag_reg_``.
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
      normalize_y: standardise the targets (per output) before fitting and undo it on the predictions. Default
        ``True``; with ``False`` the GP has zero prior mean on ``y`` as given.

    Attributes:
      diag_reg_: the relative noise used. ``cv_results_``: ``{"diag_reg": grid, "log_marginal_likelihood": values}``
      when it was chosen (``None`` otherwise). ``log_marginal_likelihood_value_``: at ``diag_reg_``, of the
      standardised targets (as scikit-learn's; ``nan`` if ``K + r I`` has no Cholesky factor, e.g. ``diag_reg=0``
      on a singular kernel). ``y_mean_``, ``y_std_``: the target normalisation. ``k_train_``, ``y_train_``
      (the targets as fitted, i.e. standardised).
    """

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        diag_reg: Union[str, float, Sequence[float]] = "auto",
        dtype: str = "float64",
        device: Optional[str] = None,
        normalize_y: bool = True,
    ):
        self.net = net
        self.depth = depth
        self.W_std = W_std
        self.b_std = b_std
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device
        self.normalize_y = normalize_y

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        grid, fixed = _ridge_grid(self.diag_reg)
        Y, self.y_mean_, self.y_std_ = _standardize(y.reshape(len(y), -1), bool(self.normalize_y))
        self.k_train_ = self._kernels(X, None, ("nngp",))["nngp"]
        self.X_fit_ = X
        self.cv_results_: Optional[dict[str, np.ndarray]] = None
        if grid is not None:
            lml = _gp_log_marginal_likelihood(self.k_train_, Y, grid)
            best = int(np.argmax(lml))  # the first (smallest) noise among ties
            self.diag_reg_ = float(grid[best])
            self.cv_results_ = {"diag_reg": grid.copy(), "log_marginal_likelihood": lml}
            self.log_marginal_likelihood_value_ = float(lml[best])
        else:
            self.diag_reg_ = fixed
            self.log_marginal_likelihood_value_ = float(
                _gp_log_marginal_likelihood(self.k_train_, Y, np.array([self.diag_reg_]))[0]
            )
        self.y_train_ = _as_tensor(Y, torch.float64)
        self._posterior = gp_inference(self.k_train_, self.y_train_, diag_reg=self.diag_reg_)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _post(self):
        """The GP posterior (its Cholesky factor is cached; rebuilt after unpickling)."""
        if getattr(self, "_posterior", None) is None:
            self._posterior = gp_inference(self.k_train_, self.y_train_, diag_reg=self.diag_reg_)
        return self._posterior

    def __getstate__(self):
        state = super().__getstate__()
        state["_posterior"] = None
        return state

    def predict(self, X, return_std: bool = False, return_cov: bool = False):
        """Posterior mean; with ``return_std`` also the latent standard deviation, with ``return_cov`` the
        latent covariance (as :class:`sklearn.gaussian_process.GaussianProcessRegressor`: for ``T`` outputs the
        mean is ``(n, T)``, the standard deviation ``(n, T)`` and the covariance ``(n, n, T)``)."""
        if return_std and return_cov:
            raise ValueError("choose at most one of return_std and return_cov.")
        check_is_fitted(self, "k_train_")
        X = self._check_X(X, reset=False)
        k_td = self._kernels(X, self.X_fit_, ("nngp",))["nngp"]
        if not (return_std or return_cov):
            mean = self._post()("nngp", k_td).numpy() * self.y_std_ + self.y_mean_
            return mean[:, 0] if self._y_1d else mean
        k_tt = self._kernels(X, None, ("nngp",))["nngp"]
        g = self._post()("nngp", k_td, k_tt)
        mean = g.mean.numpy() * self.y_std_ + self.y_mean_
        cov = g.covariance.numpy()
        if self._y_1d:
            mean = mean[:, 0]
            if return_cov:
                return mean, cov * self.y_std_[0] ** 2
            return mean, np.sqrt(np.clip(np.diag(cov), 0.0, None)) * self.y_std_[0]
        if return_cov:
            return mean, cov[:, :, None] * self.y_std_**2
        return mean, np.sqrt(np.clip(np.diag(cov), 0.0, None))[:, None] * self.y_std_


class NTKSVC(ClassifierMixin, _KernelEstimator):
    """Support vector classifier on the NTK (a precomputed-kernel :class:`sklearn.svm.SVC`).

    By Chen et al. 2021 ("Equivalence of neural networks and SVMs"), this is the infinite-width limit of the
    network trained by subgradient descent on the soft-margin (hinge) loss. Multi-class is one-vs-one.

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
      C: the SVM's soft-margin penalty.
      class_weight: passed to :class:`sklearn.svm.SVC`.

    For probabilities wrap it: ``CalibratedClassifierCV(NTKSVC(), ensemble=False)`` (scikit-learn's
    replacement for ``SVC(probability=True)``).
    """

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        C: float = 1.0,
        class_weight: Any = None,
        dtype: str = "float64",
        device: Optional[str] = None,
    ):
        self.net = net
        self.depth = depth
        self.W_std = W_std
        self.b_std = b_std
        self.C = C
        self.class_weight = class_weight
        self.dtype = dtype
        self.device = device

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        k = self._kernels(X, None, ("ntk",))["ntk"].double().cpu().numpy()
        self.X_fit_ = X
        self.svc_ = SVC(kernel="precomputed", C=self.C, class_weight=self.class_weight).fit(k, y)
        self.classes_ = self.svc_.classes_
        return self

    def _k_test(self, X) -> np.ndarray:
        check_is_fitted(self, "svc_")
        X = self._check_X(X, reset=False)
        return self._kernels(X, self.X_fit_, ("ntk",))["ntk"].double().cpu().numpy()

    def decision_function(self, X) -> np.ndarray:
        k = self._k_test(X)
        return self.svc_.decision_function(k)

    def predict(self, X) -> np.ndarray:
        k = self._k_test(X)
        return self.svc_.predict(k)


# -----------------------------------------------------------------------------------------------------
# a network's kernel for any scikit-learn estimator
# -----------------------------------------------------------------------------------------------------
class NetKernel(_SkKernel):
    """An ntkit network's NTK or NNGP as a scikit-learn kernel (no tunable hyperparameters).

    ``NetKernel(net, get="ntk")(X, Y=None)`` returns the ``(n_X, n_Y)`` kernel matrix as float64 numpy;
    scikit-learn's ``pairwise_kernels`` evaluates such kernels on whole matrices, so ``SVC``,
    ``KernelRidge``, ``KernelPCA`` and the Gaussian-process estimators all accept it. Combine it with
    ``ConstantKernel``/``WhiteKernel`` for a tunable scale and noise.
    """

    def __init__(self, net: Optional[Net] = None, get: str = "ntk"):
        self.net = net
        self.get = get

    def _net(self) -> Net:
        if self.get not in ("nngp", "ntk"):
            raise ValueError(f"get={self.get!r}: choose 'nngp' or 'ntk'.")
        return fc_net() if self.net is None else self.net

    def __call__(self, X, Y=None, eval_gradient: bool = False):
        X = np.asarray(X, dtype=np.float64)
        if eval_gradient and Y is not None:
            raise ValueError("the gradient can only be evaluated when Y is None.")
        Yv = None if Y is None else np.asarray(Y, dtype=np.float64)
        k = compute_kernels(self._net(), X, Yv, (self.get,))[self.get].numpy()
        if eval_gradient:
            return k, np.empty((X.shape[0], X.shape[0], 0))
        return k

    def diag(self, X) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        net = self._net()
        out = np.empty(len(X))
        block = 256
        for i in range(0, len(X), block):  # diagonal blocks only: O(n · block) work
            kb = net.kernel_fn(torch.from_numpy(X[i : i + block]), None, self.get)
            assert isinstance(kb, torch.Tensor), "kernel_fn with one name returns the bare tensor"
            out[i : i + block] = torch.diagonal(kb).numpy()
        return out

    def is_stationary(self) -> bool:
        return False

    @property
    def requires_vector_input(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"NetKernel(get={self.get!r}, net={self.net!r})"


def kernel(net: Optional[Net] = None, get: str = "ntk") -> NetKernel:
    """``net``'s kernel (``"ntk"`` or ``"nngp"``) as a scikit-learn kernel: ``SVC(kernel=kernel(net))``,
    ``KernelRidge(kernel=kernel(net))``, ``GaussianProcessRegressor(kernel=kernel(net, "nngp"))``."""
    return NetKernel(net, get)
