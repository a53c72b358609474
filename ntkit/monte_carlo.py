"""Monte-Carlo kernels: NNGP and NTK averaged over randomly initialised finite networks.

For a network described with ntkit layers, ``net.module(in_features, width=w, seed=s)`` is a finite twin.
Over ``n_samples`` independent twins ``f_s`` (seeds ``seed, seed + 1, ...``)::

    NNGP ≈ mean_s  f_s(x1) · f_s(x2) / O          (outputs averaged over the O output channels)
    NTK  ≈ mean_s  Θ_s(x1, x2)                    (the empirical NTK, traced over output channels)

As the width grows both converge to the analytic kernels of ``net.kernel_fn`` (Neal 1996; Lee et al. 2018;
Jacot et al. 2018): the NNGP estimate is unbiased at any width with a standard error falling as
``1/sqrt(n_samples · O)``; the NTK's fluctuations fall as ``1/sqrt(width)`` (and its bias as ``1/width``).
For the standard parameterisation the NTK depends on the widths themselves: compare with the analytic
kernel of a net described with those widths (``width=None`` keeps them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ntkit._inputs import as_batch
from ntkit._memory import memory_budget
from ntkit.empirical import IMPLEMENTATIONS, compute_mode, feature_gram, ntk_implementation
from ntkit.kernel import Kernel, normalize_get
from ntkit.nets import Net

__all__ = ["monte_carlo_kernel_fn", "MonteCarloKernelFn"]


class MonteCarloKernelFn:
    """Callable ``(x1, x2=None, get=None) -> Kernel`` averaging kernels of sampled finite twins.

    Use :meth:`samples` for the per-network kernels (e.g. to estimate the Monte-Carlo error).
    """

    def __init__(
        self,
        net,
        n_samples: int,
        width: Optional[int],
        seed: int = 0,
        get: Union[str, Sequence[str]] = ("nngp", "ntk"),
        implementation: str = "auto",
    ):
        if not isinstance(net, Net):
            raise TypeError(
                f"net must be an ntkit network (ntkit.serial(...)), got {type(net).__name__}; for a "
                f"torch module use ntkit.empirical.empirical_ntk on each sampled model."
            )
        if not (isinstance(n_samples, int) and n_samples >= 1):
            raise ValueError(f"n_samples={n_samples!r} must be a positive int.")
        if width is not None and not (isinstance(width, int) and width >= 1):
            raise ValueError(f"width={width!r} must be a positive int or None (the net's own widths).")
        if not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an int.")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}.")
        self.net, self.n_samples, self.width, self.seed = net, n_samples, width, seed
        self.get = normalize_get(get)
        self.implementation = implementation

    def _axes(self, out: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Trace the channel axis 1; spatial axes kept as the analytic kernel keeps them."""
        spatial = tuple(range(2, out.dim()))
        diag = () if self.net.requires_full_spatial() else spatial
        return (1,), diag

    def model(self, in_shape: Sequence[int], k: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
        """The ``k``-th sampled finite network (seed ``seed + k``) in ``dtype`` on ``device``, in eval mode."""
        # built in the target dtype directly (parameters are drawn in float64 and cast once; a round trip through
        # the default dtype would cost two conversions per tensor and float32 round-off)
        return self.net.module(tuple(in_shape), width=self.width, seed=self.seed + k, dtype=dtype, device=device).eval()

    def samples(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None) -> dict[str, Tensor]:
        """Per-network kernels: ``{name: tensor (n_samples, N1, N2, ...)}`` for the requested names.

        Networks are processed in chunks: their parameters are stacked (``torch.func.stack_module_state``)
        and the kernel computation is vmapped over them, so the per-network cost is a batched computation,
        not a Python loop. The chunk size keeps the work within the memory budget.
        """
        names, _ = self.get if get is None else normalize_get(get)
        x1 = as_batch(x1, "x1")
        x2 = None if x2 is None else as_batch(x2, "x2")
        base = self.model(x1.shape[1:], 0, x1.dtype, x1.device)
        with torch.no_grad():
            out0 = base(x1[:1])
        trace, diag = self._axes(out0)
        impl, spec = None, None
        if "ntk" in names:
            impl, spec = ntk_implementation(base, x1, x2, self.implementation, trace, diag)
        n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        per_model = sum(p.numel() * p.element_size() for p in base.parameters())
        if impl is not None:
            per_model += (n1 + n2) * impl.feature_bytes() + n1 * n2 * impl.pair_bytes()
        chunk = max(1, min(self.n_samples, memory_budget(x1.device) // max(1, int(per_model))))

        def one(p, b):
            allp = {**p, **b}
            res = {}
            if "nngp" in names:
                f1 = torch.func.functional_call(base, allp, (x1,))
                f2 = f1 if x2 is None else torch.func.functional_call(base, allp, (x2,))
                res["nngp"] = _nngp(f1, f2, diag)
            if impl is not None:
                assert spec is not None, "ntk_implementation returns the implementation with its OutSpec"
                a = impl.features(x1, allp)
                bb = a if x2 is None else impl.features(x2, allp)
                res["ntk"] = impl.pair(a, bb) / spec.trace_size
            return res

        out: dict[str, list] = {n: [] for n in names}
        with compute_mode(), impl.active() if impl is not None else contextlib.nullcontext():
            for s in range(0, self.n_samples, chunk):
                models = [
                    base if k == 0 else self.model(x1.shape[1:], k, x1.dtype, x1.device)
                    for k in range(s, min(self.n_samples, s + chunk))
                ]
                params, buffers = torch.func.stack_module_state(models)
                params = {k: v.detach() for k, v in params.items()}
                res = torch.func.vmap(one)(params, buffers)
                for n in names:
                    out[n].append(res[n])
        return {n: torch.cat(v) for n, v in out.items()}

    def __call__(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = None) -> Union[Kernel, Tensor]:
        names, single = self.get if get is None else normalize_get(get)
        s = self.samples(x1, x2, names)
        means = {n: v.mean(0) for n, v in s.items()}
        if single:
            return means[names[0]]
        x1t = torch.as_tensor(x1)
        cov1, cov2 = self._variances(x1t, None if x2 is None else torch.as_tensor(x2), means.get("nngp"))
        return Kernel(
            nngp=means.get("nngp"),
            ntk=means.get("ntk"),
            cov1=cov1,
            cov2=cov2,
            shape1=tuple(x1t.shape),
            shape2=tuple((x1t if x2 is None else torch.as_tensor(x2)).shape),
            diagonal_spatial=not self.net.requires_full_spatial(),
            x1_is_x2=x2 is None,
            is_gaussian=False,
            is_input=False,
        )

    def _variances(self, x1: Tensor, x2: Optional[Tensor], nngp: Optional[Tensor]):
        """Monte-Carlo ``cov1``/``cov2`` (per-sample output variances), from ``nngp``'s diagonal when possible."""
        if nngp is not None and x2 is None:
            return torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0).clone(), None
        v1 = self.samples(x1, None, "nngp")["nngp"].mean(0)
        cov1 = torch.diagonal(v1, 0, 0, 1).movedim(-1, 0).clone()
        if x2 is None:
            return cov1, None
        v2 = self.samples(x2, None, "nngp")["nngp"].mean(0)
        return cov1, torch.diagonal(v2, 0, 0, 1).movedim(-1, 0).clone()


def _nngp(f1: Tensor, f2: Tensor, diag: tuple[int, ...]) -> Tensor:
    """Channel-averaged output products ``f1·f2 / C`` in the Kernel layout (spatial axes diagonal or paired)."""
    if f1.dim() == 2:
        return f1 @ f2.T / f1.shape[1]
    return feature_gram(f1, f2, (1,), diag)


def monte_carlo_kernel_fn(
    net,
    n_samples: int,
    width: Optional[int],
    seed: int = 0,
    get: Union[str, Sequence[str]] = ("nngp", "ntk"),
    implementation: str = "auto",
) -> MonteCarloKernelFn:
    """Monte-Carlo estimate of ``net.kernel_fn`` from ``n_samples`` finite twins of width ``width``.

    Returns a callable ``kernel_fn(x1, x2=None, get=None)`` with the same return conventions as
    ``net.kernel_fn`` (a :class:`~ntkit.Kernel`, or a tensor when ``get`` is one name); see the module
    docstring for what is estimated. ``implementation`` chooses the empirical-NTK algorithm
    (:func:`ntkit.empirical.empirical_ntk`).
    """
    return MonteCarloKernelFn(net, n_samples, width, seed, get, implementation)
