"""GPyTorch kernels from ntkit networks, with the architecture's ``W_std``/``b_std`` as learnable parameters.

``NNGPKernel(net)`` / ``NTKKernel(net)`` are :class:`gpytorch.kernels.Kernel` s whose covariance is the
network's analytic NNGP / NTK. Every layer that declares a ``W_std`` tunable (``Dense``, ``Conv``; see
:meth:`ntkit.layers.base.Layer.tunables`) contributes a positive parameter ``W_std[i]`` and, if it has a
bias, ``b_std[j]``, initialised (in float64) at the network's values. They are passed to the kernel rules
through :meth:`ntkit.nets.Net.with_hyperparameters` (a new net per evaluation; the network and its layers are
never modified). The kernel recursions are differentiable torch code, so the exact marginal likelihood can be
maximised over them (Lee et al. 2018 tune ``σ_w², σ_b²`` this way), e.g.::

    covar = gpytorch.kernels.ScaleKernel(ntkit.gpytorch.NNGPKernel(net))

Needs the optional ``gpytorch`` package (``pip install 'ntkit[gpytorch]'``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import gpytorch
    from gpytorch.constraints import Interval, Positive
except ImportError as e:  # pragma: no cover - exercised only without gpytorch
    raise ImportError(
        "ntkit.gpytorch needs gpytorch; install it with `pip install 'ntkit[gpytorch]'` (or `pip install gpytorch`)."
    ) from e

from ntkit.nets import Net

__all__ = ["NetKernel", "NNGPKernel", "NTKKernel", "weight_layers"]


def weight_layers(net: Net) -> list[str]:
    """Paths (as in :meth:`ntkit.nets.Net.hyperparameters`, without the ``.W_std`` suffix) of the layers with a
    ``W_std`` tunable, depth-first in order of application."""
    return [path[: -len(".W_std")] for path in net.hyperparameters() if path.endswith(".W_std")]


class NetKernel(gpytorch.kernels.Kernel):
    """Base class: the ``get`` kernel (``"nngp"`` or ``"ntk"``) of ``net`` with learnable standard deviations.

    Args:
      net: an ntkit network (never modified).
      get: ``"nngp"`` or ``"ntk"``.
      learn_W_std, learn_b_std: make the weight / bias standard deviations parameters (else fixed).
      W_std_constraint, b_std_constraint: gpytorch constraints (default: positive).
    """

    has_lengthscale = False
    is_stationary = False

    def __init__(
        self,
        net: Net,
        get: str = "nngp",
        learn_W_std: bool = True,
        learn_b_std: bool = True,
        W_std_constraint: Optional[Interval] = None,
        b_std_constraint: Optional[Interval] = None,
        **kwargs,
    ):
        if not isinstance(net, Net):
            raise TypeError(f"net must be an ntkit network (ntkit.serial(...)), got {type(net).__name__}.")
        if get not in ("nngp", "ntk"):
            raise ValueError(f"get={get!r}: choose 'nngp' or 'ntk'.")
        if kwargs.get("batch_shape", torch.Size([])) != torch.Size([]):
            raise ValueError("batched ntkit kernels are not supported; use batch_shape=torch.Size([]).")
        super().__init__(**kwargs)
        self.get = get
        self._net = net
        self._layers = weight_layers(net)
        if not self._layers:
            raise ValueError("the network has no layer with a W_std (Dense, Conv): there is no W_std to learn.")
        hp = net.hyperparameters()
        w0 = torch.tensor([float(hp[f"{p}.W_std"]) for p in self._layers], dtype=torch.float64)
        self._bias_idx = [i for i, p in enumerate(self._layers) if f"{p}.b_std" in hp]
        b0 = torch.tensor([float(hp[f"{self._layers[i]}.b_std"]) for i in self._bias_idx], dtype=w0.dtype)
        self._w_fixed, self._b_fixed = w0.clone(), b0.clone()
        self.learn_W_std, self.learn_b_std = learn_W_std, learn_b_std and len(b0) > 0
        if self.learn_W_std:
            self._register("W_std", w0, W_std_constraint)
        if self.learn_b_std:
            self._register("b_std", b0, b_std_constraint)

    def _register(self, name: str, init: Tensor, constraint: Optional[Interval]) -> None:
        constraint = constraint or Positive()
        init = init.clamp_min(1e-6) if isinstance(constraint, Positive) else init
        self.register_parameter(f"raw_{name}", torch.nn.Parameter(constraint.inverse_transform(init)))
        self.register_constraint(f"raw_{name}", constraint)

    @property
    def W_std(self) -> Tensor:
        """Per weight layer, in order: the current weight standard deviations."""
        if self.learn_W_std:
            return self.raw_W_std_constraint.transform(self.raw_W_std)
        return self._w_fixed

    @property
    def b_std(self) -> Tensor:
        """Per weight layer that has a bias, in order: the current bias standard deviations."""
        if self.learn_b_std:
            return self.raw_b_std_constraint.transform(self.raw_b_std)
        return self._b_fixed

    def kernel_matrix(self, x1: Tensor, x2: Optional[Tensor], W_std: Tensor, b_std: Tensor) -> Tensor:
        """The kernel with the given standard deviations (a differentiable function of them).

        ``x2=None`` means ``x1`` against itself (exactly symmetric).
        """
        if len(W_std) != len(self._layers) or len(b_std) != len(self._bias_idx):
            raise ValueError(f"expected {len(self._layers)} W_std and {len(self._bias_idx)} b_std values.")
        values = {f"{p}.W_std": W_std[i] for i, p in enumerate(self._layers)}
        values.update({f"{self._layers[i]}.b_std": b_std[j] for j, i in enumerate(self._bias_idx)})
        k = self._net.with_hyperparameters(values).kernel_fn(x1, x2, get=self.get)
        assert isinstance(k, Tensor), "kernel_fn with one name (get='nngp' or 'ntk') returns the bare tensor"
        return k

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params) -> Tensor:
        if last_dim_is_batch:
            raise NotImplementedError("ntkit kernels do not support last_dim_is_batch.")
        if x1.dim() != 2 or x2.dim() != 2:
            raise ValueError(
                f"expected (n, d) inputs, got {tuple(x1.shape)} and {tuple(x2.shape)}; "
                f"batched inputs are not supported."
            )
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        w = self.W_std.to(x1.dtype)
        b = self.b_std.to(x1.dtype)
        k = self.kernel_matrix(x1, None if same else x2, w, b)
        return torch.diagonal(k) if diag else k


class NNGPKernel(NetKernel):
    """The network's NNGP kernel (the prior covariance of the infinitely wide network's outputs)."""

    def __init__(self, net: Net, **kwargs):
        super().__init__(net, get="nngp", **kwargs)


class NTKKernel(NetKernel):
    """The network's neural tangent kernel (the NTK-GP of He et al. 2020 when used as a GP covariance)."""

    def __init__(self, net: Net, **kwargs):
        super().__init__(net, get="ntk", **kwargs)
