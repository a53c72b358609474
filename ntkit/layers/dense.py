"""Dense (fully-connected) layer and Identity.

Kernel rule of ``Dense`` (Lee et al. 2018, Jacot et al. 2018; Sohl-Dickstein et al. 2020 for the standard
parameterisation). With input covariance ``K``, input NTK ``Θ`` and input width ``n``:

* NTK parameterisation, ``z = W_std/sqrt(n) W x + b_std b`` with ``W, b ~ N(0, 1)``::

      K' = W_std² K + b_std²,        Θ' = K' + W_std² Θ

* standard parameterisation, ``z = W x + b`` with ``W ~ N(0, W_std²/n)``, ``b ~ N(0, b_std²)``::

      K' = W_std² K + b_std²,        Θ' = n K + W_std² Θ + [1 if bias]

Applied along the channel axis (axis 1), pixel by pixel for spatial inputs, as ``nn.Linear`` on the
channel dimension would be.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel, map_kernels
from ntkit.layers.base import (
    Features,
    FeatureSpec,
    Layer,
    LayerError,
    LiftOptions,
    LinearUse,
    gaussian,
    lift_rule,
    single,
    single_shape,
)

__all__ = ["Dense", "Identity", "DenseModule", "PARAMETERIZATIONS"]

PARAMETERIZATIONS = ("ntk", "standard")


def check_parameterization(p: str) -> str:
    p = p.lower()
    if p not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization={p!r}: choose 'ntk' or 'standard'.")
    return p


def check_std(W_std: float, b_std: Optional[float]) -> None:
    if not (isinstance(W_std, (int, float)) and math.isfinite(W_std) and W_std >= 0):
        raise ValueError(f"W_std={W_std!r} must be a finite number >= 0.")
    if b_std is not None and not (isinstance(b_std, (int, float)) and math.isfinite(b_std) and b_std >= 0):
        raise ValueError(f"b_std={b_std!r} must be None (no bias) or a finite number >= 0.")


def affine_rule(
    k: Kernel, W_std: float, b_std: Optional[float], parameterization: str, fan_in_scale: float, out_width: int
) -> Kernel:
    """The Dense/Conv rule on already-channel-contracted kernels (see module docstring).

    ``fan_in_scale`` is the ``n`` in the standard parameterisation's NTK term (input width times the
    receptive field for a convolution is handled by the caller through the transformed kernel).
    """
    # products, not **2: a float W_std of 1e160 gives inf (named by the network's finite check), not OverflowError
    w2 = W_std * W_std
    b2 = 0.0 if b_std is None else b_std * b_std

    def aff(x):
        if not b2 and not isinstance(w2, torch.Tensor) and w2 == 1.0:
            return x  # the identity map (W_std = 1, no bias): no pass over the kernel
        y = x * w2
        return y.add_(b2) if (b2 and not y.requires_grad) else (y + b2 if b2 else y)

    nngp_in = k.nngp
    out = map_kernels(k, aff)
    ntk = k.ntk
    if ntk is not None:
        assert nngp_in is not None and out.nngp is not None, "the NTK recursion needs the NNGP"
        if parameterization == "ntk":
            ntk = out.nngp + w2 * ntk if isinstance(w2, torch.Tensor) else torch.add(out.nngp, ntk, alpha=w2)
        else:
            ntk = (
                nngp_in * fan_in_scale + w2 * ntk
                if isinstance(w2, torch.Tensor)
                else torch.add(nngp_in * fan_in_scale, ntk, alpha=w2)
            )
            if b_std is not None:
                ntk = ntk + 1.0
    shape1 = (k.shape1[0], out_width) + tuple(k.shape1[2:])
    shape2 = (k.shape2[0], out_width) + tuple(k.shape2[2:])
    # zero-mean Gaussian outputs of fresh weights: independent of every other branch (Kernel.fresh)
    return out.replace(
        ntk=ntk,
        shape1=shape1,
        shape2=shape2,
        is_gaussian=True,
        is_input=False,
        mean1=None,
        mean2=None,
        mean_kind="exact",
        fresh=(True,) * len(k.fresh),
    )


class DenseModule(nn.Module):
    """Finite twin of :class:`Dense` along the channel axis (axis 1).

    NTK parameterisation: parameters ``N(0, 1)``, ``z = W_std/sqrt(n) W x + b_std b``.
    Standard: ``W ~ N(0, W_std²/n)``, ``b ~ N(0, b_std²)``, ``z = W x + b``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        W_std: float,
        b_std: Optional[float],
        parameterization: str,
        generator: Optional[torch.Generator] = None,
        s_in: int = 1,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.W_std, self.b_std, self.parameterization = W_std, b_std, parameterization
        self.s_in = s_in
        w = gaussian((out_features, in_features), generator)
        b = None if b_std is None else gaussian((out_features,), generator)
        if parameterization == "standard":
            w = w * (W_std / math.sqrt(in_features / s_in))
            if b is not None:
                assert b_std is not None, "a bias is drawn only with a b_std"
                b = b * b_std
        self.weight = nn.Parameter(w)
        self.bias = None if b is None else nn.Parameter(b)

    def forward(self, x: Tensor) -> Tensor:
        xc = x.movedim(1, -1) if x.dim() > 2 else x
        if self.parameterization == "ntk":
            y = (xc @ self.weight.T) * (self.W_std / math.sqrt(self.in_features))
            if self.bias is not None:
                assert self.b_std is not None, "a bias exists only with a b_std"
                y = y + self.b_std * self.bias
        else:
            y = xc @ self.weight.T
            if self.s_in != 1:
                y = y / math.sqrt(self.s_in)
            if self.bias is not None:
                y = y + self.bias
        return y.movedim(-1, 1) if x.dim() > 2 else y

    @property
    def weight_scale(self) -> float:
        """``c`` in ``y = c · x Wᵀ + (bias term)``: ``W_std/√in_features`` (NTK parameterisation), ``1/√s_in``
        (standard)."""
        return (
            self.W_std / math.sqrt(self.in_features) if self.parameterization == "ntk" else 1.0 / math.sqrt(self.s_in)
        )

    def structured_uses(self, x: Tensor, G: Tensor, names: set[str]) -> dict[str, Any]:
        """Structured-derivative hook (:mod:`ntkit.empirical`): the uses of ``weight`` and ``bias`` given this
        module's input ``x`` ``(n, 1, in_features, *spatial)`` and output cotangents ``G``
        ``(n, M, 1, out_features, *spatial)``. Every pixel is a position ``t``; under the NTK parameterisation
        the inputs carry the factor ``W_std/sqrt(in_features)`` and the bias cotangents ``b_std``."""
        n, M = G.shape[:2]
        fin, fout = self.in_features, self.out_features
        ntk = self.parameterization == "ntk"
        g = G[:, :, 0]
        Gt = (g.movedim(2, -1) if g.dim() > 3 else g).reshape(n, M, -1, 1, fout)
        out: dict[str, Any] = {}
        if "weight" in names:
            xi = x[:, 0]
            X = (xi.movedim(1, -1) if xi.dim() > 2 else xi).reshape(n, -1, 1, fin)
            scale = self.weight_scale
            out["weight"] = LinearUse(X * scale if scale != 1.0 else X, Gt)
        if "bias" in names:
            assert self.b_std is not None, "a bias exists only with a b_std"
            out["bias"] = Gt.sum(2).reshape(n, M, fout) * (self.b_std if ntk else 1.0)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_features}, {self.out_features}, W_std={self.W_std}, b_std={self.b_std}, "
            f"parameterization={self.parameterization!r}" + (f", s_in={self.s_in}" if self.s_in != 1 else "")
        )


def check_s(s: Any, parameterization: str) -> tuple[int, int]:
    """NT's width scales ``s = (s_in, s_out)`` (two positive ints)."""
    try:
        s_in, s_out = (int(v) for v in s)
    except (TypeError, ValueError):
        raise ValueError(f"s={s!r} must be a pair of positive ints (s_in, s_out).") from None
    if s_in < 1 or s_out < 1 or (s_in, s_out) != tuple(s):
        raise ValueError(f"s={s!r} must be a pair of positive ints (s_in, s_out).")
    return s_in, s_out


class Dense(Layer):
    """Fully-connected layer ``Dense(out_features, W_std=1.0, b_std=None, parameterization="ntk", s=(1, 1))``.

    NT's defaults: no bias unless ``b_std`` is given; NTK parameterisation. See the module docstring for
    the kernel rule. On inputs with spatial axes it acts on the channel axis of every pixel.

    ``s = (s_in, s_out)``: NT's width scales of the standard parameterisation (Sohl-Dickstein et al. 2020): the
    finite twin's weight is ``(s_out·out_features, s_in·in_features)``, ``W ~ N(0, W_std² s_in/n)`` and
    ``z = W x/√s_in + b`` (``n`` its actual fan-in), so that the infinite-width NTK is that of the widths
    ``out_features`` (the kernel does not depend on ``s``). ``s_in`` must equal the previous layer's ``s_out``
    (1 for the first layer); under the NTK parameterisation ``s`` has no effect (as in NT).
    """

    has_params = True
    tracks_means = True

    def __init__(
        self,
        out_features: int,
        W_std: float = 1.0,
        b_std: Optional[float] = None,
        parameterization: str = "ntk",
        s: tuple[int, int] = (1, 1),
    ):
        if not (isinstance(out_features, int) and out_features > 0):
            raise ValueError(f"out_features={out_features!r} must be a positive int.")
        check_std(W_std, b_std)
        self.out_features = out_features
        self.W_std = float(W_std)
        self.b_std = None if b_std is None else float(b_std)
        self.parameterization = check_parameterization(parameterization)
        self.s = check_s(s, self.parameterization) if self.parameterization == "standard" else (1, 1)

    def kernel(self, k):
        k = single(k, self)
        return affine_rule(k, self.W_std, self.b_std, self.parameterization, float(k.width), self.out_features)

    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        s_in, s_out = self.s
        out = self.out_features * s_out if (width is None or readout) else width
        mod = DenseModule(s[0], out, self.W_std, self.b_std, self.parameterization, generator, s_in=s_in)
        return mod, (out,) + tuple(s[1:])

    def tunables(self) -> dict[str, Any]:
        return {"W_std": self.W_std} if self.b_std is None else {"W_std": self.W_std, "b_std": self.b_std}

    def __repr__(self) -> str:
        s = "" if self.s == (1, 1) else f", s={self.s!r}"
        return (
            f"Dense(out_features={self.out_features!r}, W_std={self.W_std!r}, b_std={self.b_std!r}, "
            f"parameterization={self.parameterization!r}{s})"
        )

    def random_features(self, spec: FeatureSpec, generator: torch.Generator):
        """``g = [W_std·f, b_std]`` (``g·g' = W_std² K + b_std²``) and for the NTK ``θ ← [W_std·θ, g]``
        (``Θ' = K' + W_std² Θ``); see :mod:`ntkit.random_features`."""
        if spec.get == "ntk" and self.parameterization != "ntk":
            raise LayerError("NTK random features need Dense(..., parameterization='ntk').")
        W, b = self.W_std, self.b_std
        dim_g = spec.dim + (0 if b is None else 1)
        ntk = spec.get == "ntk"

        def fmap(feats: Features) -> Features:
            f = feats.f
            parts = [W * f]
            if b is not None:
                parts.append(torch.full((f.shape[0], 1), b, dtype=f.dtype, device=f.device))
            g = torch.cat(parts, 1)
            theta = None
            if ntk:
                theta = g if feats.theta is None else torch.cat([W * feats.theta, g], 1)
            return Features(g, theta)

        ntk_dim = (spec.ntk_dim + dim_g if spec.ntk_dim else dim_g) if ntk else 0
        return fmap, dataclasses.replace(spec, dim=dim_g, ntk_dim=ntk_dim, gaussian=True)


class Identity(Layer):
    """The identity: kernel and function unchanged."""

    tracks_means = True

    def kernel(self, k):
        return k

    def build(self, in_shape, width, generator, readout):
        return nn.Identity(), in_shape

    def random_features(self, spec: FeatureSpec, generator: torch.Generator):
        return (lambda feats: feats), spec


@lift_rule(nn.Linear)
def _lift_linear(m: nn.Module, opts: LiftOptions) -> Layer:
    """``nn.Linear`` -> ``Dense`` (standard parameterisation; fan-in = in_features)."""
    assert isinstance(m, nn.Linear)
    fan_in = m.in_features
    return Dense(
        m.out_features,
        W_std=opts.weight_std(m.weight, fan_in),
        b_std=opts.bias_std(m.bias, fan_in),
        parameterization=opts.parameterization,
    )


@lift_rule(nn.Identity)
def _lift_identity(m: nn.Module, opts: LiftOptions) -> Layer:
    return Identity()
