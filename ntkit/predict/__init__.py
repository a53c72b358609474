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

from ntkit.predict.ensemble import EnsemblePredictor, gradient_descent_mse_ensemble
from ntkit.predict.gp import GPInference, gp_inference
from ntkit.predict.mse import MSEPredictor, gradient_descent_mse, max_learning_rate
from ntkit.predict.ode import ODEPredictor, gradient_descent
from ntkit.predict.student_t import StudentTPredictor, student_t_inference
from ntkit.predict.types import Gaussian, ODEState, StudentT

__all__ = [
    "gradient_descent_mse",
    "gradient_descent_mse_ensemble",
    "gp_inference",
    "gradient_descent",
    "max_learning_rate",
    "student_t_inference",
    "Gaussian",
    "StudentT",
    "ODEState",
    "MSEPredictor",
    "EnsemblePredictor",
    "GPInference",
    "StudentTPredictor",
    "ODEPredictor",
]
