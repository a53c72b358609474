"""The ntkit networks of the committed NT 0.6.5 reference cases (tests/data/nt, made by
tests/data/make_nt_reference.py), one builder per case: used by the family parity tests and by the layer
contract (tests/layers/test_contract.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np
import torch

import ntkit as nk
from ntkit.nets import Net

# NT reference name -> layer (the names of tests/data/nt/fc_<name>_<param>_b<b>.npz)
ACTIVATIONS: dict[str, Callable[[], nk.Layer]] = {
    "relu": lambda: nk.Relu(),
    "leaky_relu_0.1": lambda: nk.LeakyRelu(0.1),
    "abrelu_-0.5_1.5": lambda: nk.ABRelu(-0.5, 1.5),
    "abs": lambda: nk.Abs(),
    "erf": lambda: nk.Erf(),
    "erf_a2_b0.5_c0.3": lambda: nk.Erf(a=2.0, b=0.5, c=0.3),
    "gelu": lambda: nk.Gelu(approximate=False),
    "gelu_tanh": lambda: nk.Gelu(approximate=True),
    "sigmoid_like": lambda: nk.Sigmoid_like(),
    "sin": lambda: nk.Sin(),
    "sin_a2_b0.7_c0.4": lambda: nk.Sin(a=2.0, b=0.7, c=0.4),
    "cos": lambda: nk.Cos(),
    "rbf_0.5": lambda: nk.Rbf(gamma=0.5),
    "gaussian": lambda: nk.Gaussian(a=1.0, b=-1.0),
    "exp": lambda: nk.Exp(a=1.0, b=0.5),
    "exp_normalized": lambda: nk.ExpNormalized(gamma=1.0),
    "sign": lambda: nk.Sign(),
    "monomial_2": lambda: nk.Monomial(2),
    "monomial_3": lambda: nk.Monomial(3),
    "rectified_monomial_2": lambda: nk.RectifiedMonomial(2),
    "polynomial": lambda: nk.Polynomial([0.5, -1.0, 0.25]),
    "elementwise_numerical_tanh": lambda: nk.Elementwise(torch.tanh, deg=25),
}
FC_CASES = [f"fc_{a}_{p}_b{b}" for a in ACTIVATIONS for p in ("ntk", "standard") for b in ("None", "0.3")]
HERMITE_CASES = [f"fc_hermite_{d}" for d in (1, 2, 3)]


def fc_net(act: nk.Layer, b_std: Optional[float], param: str) -> Net:
    """The reference architecture: Dense(64, 1.5)–act–Dense(64, 1.2)–act–Dense(3, 1.0)."""
    return nk.serial(
        nk.Dense(64, 1.5, b_std, param), act, nk.Dense(64, 1.2, b_std, param), act, nk.Dense(3, 1.0, b_std, param)
    )


def parse_case(name: str) -> tuple[str, str, Optional[float]]:
    """``fc_<act>_<param>_b<b>`` -> (activation name, parameterization, b_std)."""
    rest = name[len("fc_") :]
    for param in ("ntk", "standard"):
        for b in ("None", "0.3"):
            suffix = f"_{param}_b{b}"
            if rest.endswith(suffix):
                return rest[: -len(suffix)], param, None if b == "None" else float(b)
    raise ValueError(name)


def hermite_net(degree: int) -> Net:
    return nk.serial(nk.Dense(64), nk.LayerNorm(), nk.Hermite(degree), nk.Dense(2))


def branch_net(name: str) -> Net:
    def block() -> Net:
        return nk.serial(nk.Dense(64, 1.3, 0.1), nk.Relu(), nk.Dense(64, 1.3, 0.1))

    nets: dict[str, Callable[[], Net]] = {
        "branch_residual_sum": lambda: nk.serial(
            nk.Dense(64), nk.FanOut(2), nk.parallel(block(), nk.Identity()), nk.FanInSum(), nk.Relu(), nk.Dense(1)
        ),
        "branch_concat": lambda: nk.serial(
            nk.FanOut(2),
            nk.parallel(nk.serial(nk.Dense(32), nk.Relu()), nk.serial(nk.Dense(32), nk.Erf())),
            nk.FanInConcat(),
            nk.Dense(1),
        ),
        "branch_prod": lambda: nk.serial(
            nk.FanOut(2), nk.parallel(nk.serial(nk.Dense(32), nk.Relu()), nk.Dense(32)), nk.FanInProd(), nk.Dense(1)
        ),
    }
    return nets[name]()


BRANCH_CASES = ["branch_residual_sum", "branch_concat", "branch_prod"]


def conv_net(name: str) -> Net:
    C = nk.Conv
    nets: dict[str, Callable[[], Net]] = {
        "conv1d_gap": lambda: nk.serial(
            C(8, (3,), padding="SAME"),
            nk.Relu(),
            C(8, (3,), strides=(2,), padding="VALID"),
            nk.Relu(),
            nk.GlobalAvgPool(),
            nk.Dense(1),
        ),
        "conv_circular_avgpool": lambda: nk.serial(
            C(16, (3, 3), padding="CIRCULAR"),
            nk.Relu(),
            nk.AvgPool((2, 2), strides=(2, 2)),
            C(16, (3, 3), padding="SAME"),
            nk.Relu(),
            nk.Flatten(),
            nk.Dense(1),
        ),
        "conv_same_flatten": lambda: nk.serial(
            C(16, (3, 3), padding="SAME", b_std=0.1),
            nk.Relu(),
            C(16, (3, 3), padding="SAME", b_std=0.1),
            nk.Relu(),
            nk.Flatten(),
            nk.Dense(1),
        ),
        "conv_standard_param_sumpool": lambda: nk.serial(
            C(16, (3, 3), padding="SAME", parameterization="standard"),
            nk.Gelu(),
            nk.SumPool((2, 2), strides=(1, 1), padding="SAME"),
            nk.GlobalAvgPool(),
            nk.Dense(1, parameterization="standard"),
        ),
        "conv_valid_stride2_gap": lambda: nk.serial(
            C(16, (3, 3), strides=(2, 2), padding="VALID", W_std=1.4),
            nk.Relu(),
            C(16, (2, 2), padding="SAME"),
            nk.Erf(),
            nk.GlobalAvgPool(),
            nk.Dense(1),
        ),
    }
    return nets[name]()


CONV_CASES = [
    "conv1d_gap",
    "conv_circular_avgpool",
    "conv_same_flatten",
    "conv_standard_param_sumpool",
    "conv_valid_stride2_gap",
]


def nchw(x: np.ndarray) -> torch.Tensor:
    """NT's channels-last images as PyTorch's channels-first."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def reference_net(name: str) -> Net:
    """The ntkit network of any layer reference case (fc_*, fc_hermite_*, branch_*, conv*)."""
    if name in HERMITE_CASES:
        return hermite_net(int(name[-1]))
    if name in FC_CASES:
        act, param, b_std = parse_case(name)
        return fc_net(ACTIVATIONS[act](), b_std, param)
    if name in BRANCH_CASES:
        return branch_net(name)
    return conv_net(name)


def reference_inputs(ref: dict) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(x1, x2)`` of a reference case in PyTorch's layout (``x2`` is ``None`` when the case has none)."""
    for key in ("x1", "x1_nhwc", "x1_nwc"):
        if key in ref:
            conv = key != "x1"
            x1 = nchw(ref[key]) if conv else torch.from_numpy(ref[key])
            k2 = key.replace("x1", "x2")
            x2 = None if k2 not in ref else (nchw(ref[k2]) if conv else torch.from_numpy(ref[k2]))
            return x1, x2
    raise KeyError("no x1 in the reference case")
