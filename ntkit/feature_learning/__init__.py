"""Feature learning at infinite width: the rich (μP) limit of training and deep kernel machines.

For a network described once (``serial(Dense(N), φ, ..., Dense(out))``) ntkit gives three limits side by side:

* lazy (NTK): ``net.kernel_fn`` and ``ntkit.predict.gradient_descent_mse`` — features frozen;
* rich (μP): :func:`dmft`, the dynamical mean-field theory of Bordelon & Pehlevan 2022, whose finite twins are
  ``net.module(D, width=N, parameterization="mup", gamma=γ₀)`` trained by :func:`train_mup`; ``γ₀ → 0`` is the
  lazy limit, ``γ₀ > 0`` learns features at infinite width (Yang & Hu 2021);
* Bayesian representation learning: :func:`dkm`, the deep kernel machine of Aitchison et al. 2023 (``ν → ∞``
  is the NNGP).
"""

from ntkit.feature_learning.field_theory import DMFTResult, dmft, quadrature_weights
from ntkit.feature_learning.kernel_machines import DKMFit, dkm
from ntkit.feature_learning.mup import MuPTrajectory, train_mup

__all__ = ["DMFTResult", "dmft", "quadrature_weights", "MuPTrajectory", "train_mup", "DKMFit", "dkm"]
