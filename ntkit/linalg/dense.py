"""Dense solves with symmetric positive semi-definite kernel matrices, made safe.

Kernel matrices are PSD in exact arithmetic but often numerically singular (duplicated inputs, wide flat
spectra, float32 round-off), which is where NT's users met NaNs (NT issues #76, #128, #198). Everything here
works in float64 by default (inputs are upcast, callers cast results back) and follows one policy:

1. **Checks** (:func:`as_kernel_matrix`): a floating, square, finite matrix, symmetric to round-off of its
   own dtype (``|A - Aᵀ| ≤ 10·sqrt(eps)·max|A|``); it is then symmetrised exactly.
2. **Cholesky first** (:meth:`PSDMatrix.solve`): ``A = L Lᵀ``. If it fails, a *jitter ladder*
   adds ``j·mean(diag A)·I`` for ``j = sqrt(eps)/100, 100x that, ...`` up to the round-off tolerance of the
   input dtype, warning with the jitter used (:class:`NumericalWarning`).
3. **Eigendecomposition fallback**: when no jitter on the ladder works, ``A = V Λ Vᵀ`` and the solve is
   the pseudo-inverse ``V Λ⁺ Vᵀ`` with eigenvalues at or below ``n·eps·λ_max`` treated as zero.
4. **PSD check**: an eigenvalue below ``-tol·λ_max`` (``tol = max(10·sqrt(eps), 10·n·eps)`` of the
   *input* dtype) is not round-off: a clear error reports it. Eigenvalues within tolerance are clipped to 0.

The eigendecomposition (:meth:`PSDMatrix.eigh`) and the Cholesky factor are each computed at most once per
:class:`PSDMatrix` and cached, so one object serves every time ``t`` and every right-hand side.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from ntkit._inputs import all_finite
from ntkit._memory import Device, check_fits

__all__ = [
    "NumericalWarning",
    "PSDMatrix",
    "as_kernel_matrix",
    "add_diagonal_regularizer",
    "psd_rtol",
    "symmetry_rtol",
    "check_memory",
]


class NumericalWarning(RuntimeWarning):
    """A solve needed jitter or a pseudo-inverse: the kernel matrix is numerically singular."""


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def symmetry_rtol(dtype: torch.dtype) -> float:
    """Largest relative asymmetry ``max|A - Aᵀ| / max|A|`` accepted as round-off of ``dtype``."""
    return 10.0 * math.sqrt(_eps(dtype))


def psd_rtol(dtype: torch.dtype, n: int) -> float:
    """Most negative ``λ_min / λ_max`` accepted as round-off for an ``n x n`` kernel stored in ``dtype``.

    ``sqrt(eps)`` covers kernels whose entries lose half their digits (arc-cosines near correlation 1, i.e.
    near-duplicate inputs); ``n·eps`` covers accumulated round-off of a Gram product."""
    e = _eps(dtype)
    return max(10.0 * math.sqrt(e), 10.0 * n * e)


# -------------------------------------------------------------------------------------------------
# memory planning
# -------------------------------------------------------------------------------------------------
def check_memory(nbytes: int, device: Device, what: str) -> None:
    """Raise ``MemoryError`` naming ``what`` if ``nbytes`` do not fit in the memory ``device`` has free
    (:func:`ntkit._memory.check_fits`)."""
    check_fits(nbytes, device, what, "use fewer points or fewer times per call.")


# -------------------------------------------------------------------------------------------------
# checks
# -------------------------------------------------------------------------------------------------
def as_kernel_matrix(a: Any, name: str, *, check_symmetric: bool = True) -> Tensor:
    """Validate a square kernel matrix and return it as a tensor in its own (floating) dtype.

    Raises one clear error for: non-tensor input, non-floating dtype, a shape that is not ``(n, n)``, NaN or
    Inf entries, asymmetry beyond :func:`symmetry_rtol` of the dtype. The result is exactly symmetric.
    """
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}.")
    if not a.is_floating_point():
        raise TypeError(f"{name} has dtype {a.dtype}; pass a floating kernel (float64 recommended).")
    if a.dim() != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a square (n, n) matrix with n >= 1, got shape {tuple(a.shape)}.")
    if not all_finite(a):
        finite = torch.isfinite(a)
        raise ValueError(
            f"{name} contains {int((~finite).sum())} NaN/Inf entries; the kernel must be finite "
            f"(check the inputs and the kernel function)."
        )
    if check_symmetric and not torch.equal(a, a.mT):  # one pass when exactly symmetric (kernel_fn's are)
        scale = float(a.abs().max())
        diff = a - a.T
        asym = float(diff.abs().max())
        tol = symmetry_rtol(a.dtype)
        if asym > tol * scale:
            raise ValueError(
                f"{name} is not symmetric: max|K - Kᵀ| = {asym:.3e} is {asym / max(scale, 1e-300):.2e} of "
                f"max|K| (round-off of {a.dtype} allows {tol:.1e}). A train-train kernel must be "
                f"kernel_fn(x_train, None) (or x_train against itself), not a test-train kernel."
            )
        if asym > 0:
            a = a - 0.5 * diff
    return a


def add_diagonal_regularizer(a: Tensor, diag_reg: float, absolute: bool) -> Tensor:
    """``a + r·I`` with ``r = diag_reg`` if ``absolute`` else ``diag_reg·mean(diag a)`` (NT's convention)."""
    if not (isinstance(diag_reg, (int, float)) and math.isfinite(diag_reg) and diag_reg >= 0):
        raise ValueError(f"diag_reg={diag_reg!r} must be a finite number >= 0.")
    if diag_reg == 0:
        return a
    r = diag_reg if absolute else diag_reg * float(torch.diagonal(a).mean())
    out = a.clone()
    torch.diagonal(out).add_(r)
    return out


# -------------------------------------------------------------------------------------------------
# the factorisation cache
# -------------------------------------------------------------------------------------------------
class PSDMatrix:
    """A symmetric PSD ``n x n`` matrix with cached Cholesky factor and eigendecomposition.

    Args:
      a: the kernel matrix (tensor or numpy array), any floating dtype; checked by :func:`as_kernel_matrix`.
      name: how errors and warnings refer to it.
      diag_reg, diag_reg_absolute_scale: regulariser added before factorising (see
        :func:`add_diagonal_regularizer`).
      dtype: precision of every factorisation and solve (float64 by default).
      checked: ``a`` already passed :func:`as_kernel_matrix` (skip the checks).

    Attributes:
      matrix: the regularised matrix in ``dtype``; ``input_dtype``: the dtype ``a`` came in (tolerances
      for round-off are taken from it); ``jitter``: absolute jitter the Cholesky factor needed (0 if none),
      ``None`` if the eigendecomposition fallback was used.
    """

    def __init__(
        self,
        a: Any,
        name: str = "k_train_train",
        *,
        diag_reg: float = 0.0,
        diag_reg_absolute_scale: bool = False,
        dtype: torch.dtype = torch.float64,
        checked: bool = False,
    ):
        a = a if checked else as_kernel_matrix(a, name)
        self.name = name
        self.input_dtype = a.dtype
        self.n = a.shape[0]
        check_memory(
            4 * self.n * self.n * torch.empty((), dtype=dtype).element_size(),
            a.device,
            f"factorising the {self.n}x{self.n} {name}",
        )
        self.matrix = add_diagonal_regularizer(a.to(dtype), diag_reg, diag_reg_absolute_scale)
        self.diag_reg = diag_reg
        self._chol: Optional[Tensor] = None
        self._eig: Optional[tuple[Tensor, Tensor]] = None
        self.jitter: Optional[float] = 0.0

    # -- tolerances ---------------------------------------------------------------------------------
    @property
    def rtol(self) -> float:
        return psd_rtol(self.input_dtype, self.n)

    @property
    def rank_cutoff(self) -> float:
        """Eigenvalues at or below this are numerically zero (``n·eps(input dtype)·λ_max``)."""
        lam = self.eigh()[0]
        return self.n * _eps(self.input_dtype) * float(lam[-1].clamp_min(0))

    # -- eigendecomposition -------------------------------------------------------------------------
    def eigh(self) -> tuple[Tensor, Tensor]:
        """``(λ, V)`` with ``matrix = V diag(λ) Vᵀ``, ``λ`` ascending and clipped at 0; cached.

        Raises ``ValueError`` (with the smallest eigenvalue) if the matrix is not PSD beyond round-off."""
        if self._eig is None:
            lam, vec = torch.linalg.eigh(self.matrix)
            self._check_psd(lam)
            self._eig = (lam.clamp_min(0), vec)
        return self._eig

    def _check_psd(self, lam: Tensor) -> None:
        lmin, lmax = float(lam[0]), float(lam[-1])
        scale = max(abs(lmax), abs(lmin))
        if lmin < -self.rtol * scale:
            raise ValueError(
                f"{self.name} is not positive semi-definite: smallest eigenvalue {lmin:.4e}, largest "
                f"{lmax:.4e} (ratio {lmin / scale:.2e}; round-off of {self.input_dtype} at n={self.n} allows "
                f"{-self.rtol:.1e}). Kernel matrices of a network are PSD: check that it is a kernel "
                f"between the same inputs, computed in float64."
            )

    # -- Cholesky with jitter ladder ----------------------------------------------------------------
    def _jitter_ladder(self) -> list[float]:
        """Relative jitters ``1e-2·sqrt(eps), 1·sqrt(eps)·..`` (x100) up to the PSD tolerance of the input dtype.

        Starting at ``sqrt(eps)/100`` rather than ``eps`` bounds the amplification of round-off living in
        numerically-null directions (``~eps/jitter``) while perturbing the kernel far less than its own
        round-off tolerance."""
        top = self.rtol
        j, out = 1e-2 * math.sqrt(_eps(self.input_dtype)), []
        while j <= top:
            out.append(j)
            j *= 100.0
        return out

    def cholesky(self) -> Optional[Tensor]:
        """Lower Cholesky factor of ``matrix`` (+ jitter if needed), or ``None`` when even the largest jitter
        fails (then :meth:`solve` uses the eigendecomposition); cached."""
        if self._chol is None and self.jitter is not None:
            L, info = torch.linalg.cholesky_ex(self.matrix)
            if int(info) == 0:
                self._chol = L
                return L
            scale = float(torch.diagonal(self.matrix).mean().abs())
            eye = torch.eye(self.n, dtype=self.matrix.dtype, device=self.matrix.device)
            for rel in self._jitter_ladder():
                L, info = torch.linalg.cholesky_ex(self.matrix + (rel * scale) * eye)
                if int(info) == 0:
                    self.jitter = rel * scale
                    warnings.warn(
                        f"{self.name} is numerically singular; added jitter {rel * scale:.2e} "
                        f"({rel:.0e} x its mean diagonal) to factorise it. Pass diag_reg > 0 to regularise "
                        f"explicitly.",
                        NumericalWarning,
                        stacklevel=3,
                    )
                    self._chol = L
                    return L
            # Not factorisable: the eigendecomposition decides between "not PSD" and "singular".
            self.eigh()
            self.jitter = None
            warnings.warn(
                f"{self.name} is numerically singular and Cholesky failed even with jitter; solving with its "
                f"pseudo-inverse (eigenvalues <= {self.rank_cutoff:.2e} treated as 0). Pass diag_reg > 0 to "
                f"regularise explicitly.",
                NumericalWarning,
                stacklevel=3,
            )
        return self._chol

    def _pinv_eigenvalues(self, power: float) -> tuple[Tensor, Tensor]:
        lam, v = self.eigh()
        keep = lam > self.rank_cutoff
        return torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny) ** power, 0.0), v

    def solve(self, b: Tensor) -> Tensor:
        """``matrix⁻¹ b`` for ``b`` of shape ``(n,)`` or ``(n, k)`` (pseudo-inverse if singular)."""
        b = b.to(self.matrix.dtype)
        vec = b.dim() == 1
        if vec:
            b = b[:, None]
        L = self.cholesky()
        if L is not None:
            x = torch.cholesky_solve(b, L)
        else:
            inv, v = self._pinv_eigenvalues(-1.0)
            x = v @ (inv[:, None] * (v.T @ b))
        return x[:, 0] if vec else x

    def whiten(self, b: Tensor) -> Tensor:
        """``W`` with ``Wᵀ W = bᵀ matrix⁻¹ b`` for ``b`` ``(n, k)``: ``L⁻¹ b`` (one triangular solve, half a
        full solve), or ``Λ⁺^{1/2} Vᵀ b`` on the eigendecomposition fallback."""
        b = b.to(self.matrix.dtype)
        L = self.cholesky()
        if L is not None:
            return torch.linalg.solve_triangular(L, b, upper=False)
        inv_sqrt, v = self._pinv_eigenvalues(-0.5)
        return inv_sqrt[:, None] * (v.T @ b)

    def max_eigenvalue(self) -> float:
        """Largest eigenvalue (from the cached eigendecomposition if present, else a symmetric solver)."""
        if self._eig is not None:
            return float(self._eig[0][-1])
        return float(torch.linalg.eigvalsh(self.matrix)[-1])
