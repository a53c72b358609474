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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
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
]


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
    """What NTKRegressor and NTKClassifier share: the parameters, and the NTK gradient-flow predictor on
    (already encoded) targets."""

    _get = "ntk"

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        diag_reg: float = 1e-6,
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

    def _fit_targets(self, X, Y: np.ndarray):
        # numpy's isscalar is a TypeGuard to generic | complex | str | bytes | memoryview, not all of which float()
        # accepts (typeshed); at run time such a t (e.g. complex) raises TypeError here, as it always has
        if self.t is not None and not (np.isscalar(self.t) and float(self.t) >= 0):  # type: ignore[arg-type]
            raise ValueError(f"t={self.t!r} must be None (infinite time) or a number >= 0.")
        k = self._kernels(X, None, (self._get,))[self._get]
        self.X_fit_ = X
        self.predictor_ = gradient_descent_mse(
            k, _as_tensor(Y, torch.float64), learning_rate=self.learning_rate, diag_reg=self.diag_reg
        )
        return self

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

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: ridge ``diag_reg · mean(diag K)`` added to the train kernel (NT's relative convention).
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
      t: training time in units of ``learning_rate`` (``None``: infinite).
      learning_rate: ``η`` (only ``η·t`` matters).
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        return self._fit_targets(X, y.reshape(len(y), -1))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def predict(self, X) -> np.ndarray:
        s = self._scores(X)
        return s[:, 0] if self._y_1d else s


class NTKClassifier(ClassifierMixin, _NTKFlow):
    """Classifier from NTK regression on centred one-hot targets (Arora et al. 2019): the class with the
    largest output of the infinitely wide network trained on MSE for time ``t``.

    ``predict_proba`` is the regression estimate of ``P(y = k | x)``: the outputs plus ``1/K`` (they sum to one
    because the centred targets sum to zero), clipped to ``[0, 1]`` and renormalised.

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: ridge ``diag_reg · mean(diag K)`` added to the train kernel (NT's relative convention).
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
      t, learning_rate: as in :class:`NTKRegressor`.
    """

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        k = max(len(self.classes_), 2)
        Y = np.eye(k)[codes] - 1.0 / k
        return self._fit_targets(X, Y)

    def decision_function(self, X) -> np.ndarray:
        """Network outputs per class (``(n, K)``; for two classes the difference, positive for ``classes_[1]``)."""
        s = self._scores(X)
        return s[:, 1] - s[:, 0] if len(self.classes_) == 2 else s[:, : len(self.classes_)]

    def predict(self, X) -> np.ndarray:
        s = self._scores(X)[:, : len(self.classes_)]
        return self.classes_[np.argmax(s, axis=1)]

    def predict_proba(self, X) -> np.ndarray:
        s = self._scores(X)
        k = s.shape[1]
        p = np.clip(s[:, : len(self.classes_)] + 1.0 / k, 0.0, 1.0)
        total = p.sum(axis=1, keepdims=True)
        return np.where(total > 0, p / np.where(total > 0, total, 1.0), 1.0 / p.shape[1])


class NNGPRegressor(RegressorMixin, _KernelEstimator):
    """Gaussian-process regression with the network's NNGP kernel: the exact Bayesian posterior of the
    infinitely wide network whose last layer is trained (Lee et al. 2018).

    ``mean = K(x, X) (K + r I)⁻¹ y``, ``var = K(x, x) - K(x, X) (K + r I)⁻¹ K(X, x)`` (of the latent
    function, without observation noise). ``diag_reg`` is the observation-noise variance relative to the
    mean prior variance on the training inputs.

    Args:
      net: an ntkit network; ``None`` builds :func:`~ntkit.architectures.fc_net` ``(depth, W_std, b_std)``.
      depth, W_std, b_std: the default network's hidden ReLU layers and weight / bias standard deviations
        (ignored when ``net`` is given).
      diag_reg: ridge ``diag_reg · mean(diag K)`` added to the train kernel (NT's relative convention).
      dtype: ``"float64"`` (recommended) or ``"float32"`` for the kernels; solves run in float64.
      device: where kernels are computed (``None``: CPU).
    """

    def __init__(
        self,
        net: Optional[Net] = None,
        depth: int = 3,
        W_std: float = SQRT2,
        b_std: Optional[float] = 0.05,
        diag_reg: float = 1e-6,
        dtype: str = "float64",
        device: Optional[str] = None,
    ):
        self.net = net
        self.depth = depth
        self.W_std = W_std
        self.b_std = b_std
        self.diag_reg = diag_reg
        self.dtype = dtype
        self.device = device

    def fit(self, X, y):
        X, y = validate_data(self, X, y, dtype=np.float64, multi_output=True, y_numeric=True)
        self._y_1d = y.ndim == 1
        self.k_train_ = self._kernels(X, None, ("nngp",))["nngp"]
        self.X_fit_ = X
        self.y_train_ = _as_tensor(y.reshape(len(y), -1), torch.float64)
        self._posterior = gp_inference(self.k_train_, self.y_train_, diag_reg=self.diag_reg)
        return self

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _post(self):
        """The GP posterior (its Cholesky factor is cached; rebuilt after unpickling)."""
        if getattr(self, "_posterior", None) is None:
            self._posterior = gp_inference(self.k_train_, self.y_train_, diag_reg=self.diag_reg)
        return self._posterior

    def __getstate__(self):
        state = super().__getstate__()
        state["_posterior"] = None
        return state

    def predict(self, X, return_std: bool = False, return_cov: bool = False):
        """Posterior mean; with ``return_std`` also the latent standard deviation, with ``return_cov`` the
        latent covariance (as :class:`sklearn.gaussian_process.GaussianProcessRegressor`)."""
        if return_std and return_cov:
            raise ValueError("choose at most one of return_std and return_cov.")
        check_is_fitted(self, "k_train_")
        X = self._check_X(X, reset=False)
        k_td = self._kernels(X, self.X_fit_, ("nngp",))["nngp"]
        if not (return_std or return_cov):
            mean = self._post()("nngp", k_td).numpy()
            return mean[:, 0] if self._y_1d else mean
        k_tt = self._kernels(X, None, ("nngp",))["nngp"]
        g = self._post()("nngp", k_td, k_tt)
        mean, cov = g.mean.numpy(), g.covariance.numpy()
        mean = mean[:, 0] if self._y_1d else mean
        if return_cov:
            return mean, cov
        return mean, np.sqrt(np.clip(np.diag(cov), 0.0, None))


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
