"""Generate the neural-tangents 0.6.5 reference cases used by the ntkit test-suite (``tests/data/nt``).

Every case is a small computation run in neural-tangents (NT) 0.6.5 on JAX (float64, CPU). Its inputs and outputs
are saved together in ``<case>.npz`` (``np.savez_compressed``), so the tests never have to reproduce NumPy's random
streams, and ``cases.json`` indexes them all::

    {"<case>": {"description": "<the NT code that made it>", "arrays": {"<array>": [shape, ...]}}}

Running it
----------
NT and JAX live in their own virtual environment (``/tmp/ntenv``), never in the project's one::

    JAX_PLATFORMS=cpu /tmp/ntenv/bin/python tests/data/make_nt_reference.py [--out DIR] [--only PATTERN]

``--out`` defaults to ``tests/data/nt`` next to this file. ``--only`` takes shell-style patterns (``fc_relu_*``,
``conv*``) or family names (``fc``, ``hermite``, ``branch``, ``conv``, ``attention``, ``predict``, ``empirical``),
may be repeated, and then only those cases are rewritten: the other entries of an existing ``cases.json`` are kept. A
full run also deletes ``.npz`` files that the old ``cases.json`` listed but that no case makes any more. ``--list``
prints the cases, and ``--compare REF_DIR`` checks the written files against another copy afterwards
(``compare_reference.py`` in this folder, which only needs NumPy).

Conventions (what a PyTorch implementation has to keep in mind when it reads the files)
--------------------------------------------------------------------------------------
* Images and sequences are stored as NT takes them, channels last: ``x1_nhwc`` (N, H, W, C), ``x1_nwc`` (N, W, C).
  Transpose to NCHW / NCW for PyTorch layouts.
* ``*_12`` arrays are ``kernel_fn(x1, x2)``, ``*_11`` are ``kernel_fn(x1, None)``.
* NT's ``trace_axes`` *average* over the traced output axes (they do not sum): the traced empirical NTK of a net with
  4 outputs is the mean of the 4 diagonal blocks of the full (n1, n2, 4, 4) kernel.
* ``stax.Dense`` defaults: ``W_std=1``, ``b_std=None`` (no bias), ``parameterization='ntk'``; in the NTK
  parameterisation the weights are N(0, 1) and the layer computes ``W_std / sqrt(fan_in) * x @ W + b_std * b``.
  NT stores Dense weights as (in, out) and biases as (1, out).
* ``diag_reg`` of ``nt.predict`` is relative to the mean of the train kernel's diagonal (NT's default).

Reproducibility
---------------
Inputs are bit-identical on every machine. Outputs are too, except for XLA's JIT-compiled dot products (the tanh
quadrature, the empirical NTK), which XLA compiles for the host CPU's vector width: on another CPU they may differ by
a few ulp (measured up to 9e-16 relative against the archived copy made on a different machine).
``compare_reference.py`` checks a run against another copy.

Adding a case
-------------
Write a function that returns a :class:`Result` and register it with ``@case("<family>")`` (the function name is
the case name), or call :func:`register` in a loop for a parameterised family. Build networks from :data:`L`, which
mirrors ``stax`` (``L.serial(L.Dense(64), L.Relu())``): the same object builds the NT layer and prints the NT code
that goes into the description, so the two cannot drift apart. Random inputs come from the cached ``*_inputs``
functions, each of which draws one whole ``np.random.RandomState`` stream in a fixed order, so that a case's inputs
do not depend on which other cases run. Draw new inputs from a new seed rather than extending an existing stream.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# OpenBLAS (behind jaxlib's LAPACK calls in nt.predict) picks its kernels by CPU, and its AVX-512 and AVX2 kernels
# round differently (~1e-14). Pin the AVX2 ("Haswell") ones, with which the predict cases match the archived
# reference bit for bit, so that reruns on other x86 machines give the same bits. Set before NumPy/SciPy load.
os.environ.setdefault("OPENBLAS_CORETYPE", "Haswell")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # NT imports TensorFlow (via tf2jax): silence its CUDA noise

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np
from neural_tangents import stax

jax.config.update("jax_enable_x64", True)
# NT's advisory warnings, each known to hold for the cases here: every FanIn branch has its own Dense/Conv, the
# Hermite inputs are LayerNorm-ed, and the tanh quadrature (deg=25, derivative by autodiff) is the case itself.
for _message in (
    "`FanIn` layers assume independent inputs",
    "Inputs to this layer are assumed to have unit norm",
    "Numerical Activation Layer",
    "Using JAX autodiff to compute the `fn` derivative",
):
    warnings.filterwarnings("ignore", message=_message)

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "nt"
INDEX_NAME = "cases.json"
NT_VERSION = "0.6.5"
BOTH = ("nngp", "ntk")


# ---------------------------------------------------------------------------------------------------------------------
# Networks as data: one object both builds the stax layer and renders its NT code
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Code:
    """A Python object that is rendered by name in a description (e.g. ``jnp.tanh``)."""

    text: str
    value: Any


@dataclass(frozen=True)
class Spec:
    """One ``stax.<fn>(*args, **kwargs)`` call; arguments may themselves be ``Spec`` (for ``serial``/``parallel``)."""

    fn: str
    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self) -> tuple:
        """The stax layer: ``(init_fn, apply_fn, kernel_fn, ...)``."""
        args = [_value(a) for a in self.args]
        kwargs = {k: _value(v) for k, v in self.kwargs}
        return getattr(stax, self.fn)(*args, **kwargs)

    def kernel_fn(self) -> Callable:
        return self.build()[2]

    def __str__(self) -> str:
        parts = [_code(a) for a in self.args] + [f"{k}={_code(v)}" for k, v in self.kwargs]
        return f"stax.{self.fn}({', '.join(parts)})"


def _value(obj: Any) -> Any:
    if isinstance(obj, Spec):
        return obj.build()
    return obj.value if isinstance(obj, Code) else obj


def _code(obj: Any) -> str:
    if isinstance(obj, Spec):
        return str(obj)
    return obj.text if isinstance(obj, Code) else repr(obj)


class _Layers:
    """``L.Dense(64, W_std=1.5)`` -> ``Spec('Dense', (64,), (('W_std', 1.5),))``, for any name that stax has."""

    def __getattr__(self, name: str) -> Callable[..., Spec]:
        if name.startswith("_") or not hasattr(stax, name):
            raise AttributeError(f"neural_tangents.stax has no {name!r}")

        def make(*args: Any, **kwargs: Any) -> Spec:
            return Spec(name, tuple(args), tuple(kwargs.items()))

        return make


L = _Layers()


# ---------------------------------------------------------------------------------------------------------------------
# Case registry
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    description: str
    arrays: dict[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    make: Callable[[], Result]


CASES: dict[str, Case] = {}


def register(family: str, name: str, make: Callable[[], Result]) -> None:
    if name in CASES:
        raise ValueError(f"case {name!r} registered twice")
    CASES[name] = Case(name, family, make)


def case(family: str) -> Callable[[Callable[[], Result]], Callable[[], Result]]:
    """Decorator: register the function under its own name."""

    def deco(fn: Callable[[], Result]) -> Callable[[], Result]:
        register(family, fn.__name__, fn)
        return fn

    return deco


def kernels(kernel_fn: Callable, x1: np.ndarray, x2: np.ndarray | None, tag: str) -> dict[str, np.ndarray]:
    """``{nngp_<tag>, ntk_<tag>}`` of ``kernel_fn(x1, x2)``."""
    k = kernel_fn(x1, x2, BOTH)
    return {f"nngp_{tag}": np.asarray(k.nngp), f"ntk_{tag}": np.asarray(k.ntk)}


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.flags.writeable = False
    return arrays


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: one RandomState stream per group of families, drawn in full and cached
# ---------------------------------------------------------------------------------------------------------------------
@functools.cache
def vector_inputs() -> tuple[np.ndarray, np.ndarray]:
    """x1 (12, 7), x2 (9, 7) from RandomState(42); shared by the fc, hermite and branch families."""
    rs = np.random.RandomState(42)
    return _frozen(rs.randn(12, 7), rs.randn(9, 7))


@functools.cache
def conv_inputs() -> dict[str, np.ndarray]:
    """RandomState(7): two NHWC image batches, then one NWC sequence batch."""
    rs = np.random.RandomState(7)
    im1, im2, seq = _frozen(rs.randn(5, 6, 6, 2), rs.randn(4, 6, 6, 2), rs.randn(4, 10, 3))
    return {"im1": im1, "im2": im2, "seq": seq}


@functools.cache
def regression_inputs() -> dict[str, np.ndarray]:
    """RandomState(3): a 5-d regression task y = sin(sum x) + 0.1 noise, then initial outputs for predict_gd_mse."""
    rs = np.random.RandomState(3)
    x_train = rs.randn(40, 5)
    x_test = rs.randn(15, 5)
    y_train = np.sin(x_train.sum(1, keepdims=True)) + 0.1 * rs.randn(40, 1)
    fx_train_0 = 0.1 * rs.randn(40, 1)
    fx_test_0 = 0.1 * rs.randn(15, 1)
    arrays = {
        "x_train": x_train,
        "x_test": x_test,
        "y_train": y_train,
        "fx_train_0": fx_train_0,
        "fx_test_0": fx_test_0,
    }
    _frozen(*arrays.values())
    return arrays


# =====================================================================================================================
# Family "fc": Dense(64)-act-Dense(64)-act-Dense(3), every activation, both parameterisations, with/without bias
# =====================================================================================================================
FC_ACTIVATIONS: dict[str, Spec] = {
    "relu": L.Relu(),
    "leaky_relu_0.1": L.LeakyRelu(0.1),
    "abrelu_-0.5_1.5": L.ABRelu(-0.5, 1.5),
    "abs": L.Abs(),
    "erf": L.Erf(),
    "erf_a2_b0.5_c0.3": L.Erf(a=2.0, b=0.5, c=0.3),
    "gelu": L.Gelu(approximate=False),
    "gelu_tanh": L.Gelu(approximate=True),
    "sigmoid_like": L.Sigmoid_like(),
    "sin": L.Sin(),
    "sin_a2_b0.7_c0.4": L.Sin(a=2.0, b=0.7, c=0.4),
    "cos": L.Cos(),
    "rbf_0.5": L.Rbf(gamma=0.5),
    "gaussian": L.Gaussian(a=1.0, b=-1.0),
    "exp": L.Exp(a=1.0, b=0.5),
    "exp_normalized": L.ExpNormalized(gamma=1.0),
    "sign": L.Sign(),
    "monomial_2": L.Monomial(2),
    "monomial_3": L.Monomial(3),
    "rectified_monomial_2": L.RectifiedMonomial(2),
    "polynomial": L.Polynomial([0.5, -1.0, 0.25]),
    "elementwise_numerical_tanh": L.ElementwiseNumerical(Code("jnp.tanh", jnp.tanh), deg=25),
    "gabor": L.Gabor(),
}
FC_PARAMETERIZATIONS = ("ntk", "standard")
FC_BIASES = (None, 0.3)
FC_WIDTHS_AND_W_STDS = ((64, 1.5), (64, 1.2), (3, 1.0))


def fc_net(act: Spec, b_std: float | None, parameterization: str) -> Spec:
    layers: list[Spec] = []
    for i, (width, w_std) in enumerate(FC_WIDTHS_AND_W_STDS):
        if i:
            layers.append(act)
        layers.append(L.Dense(width, W_std=w_std, b_std=b_std, parameterization=parameterization))
    return L.serial(*layers)


def fc_case(act: Spec, b_std: float | None, parameterization: str) -> Result:
    net = fc_net(act, b_std, parameterization)
    kernel_fn = net.kernel_fn()
    x1, x2 = vector_inputs()
    arrays = {"x1": x1, "x2": x2, **kernels(kernel_fn, x1, x2, "12"), **kernels(kernel_fn, x1, None, "11")}
    return Result(f"{net}; *_12 = kernel_fn(x1, x2), *_11 = kernel_fn(x1, None)", arrays)


for _param in FC_PARAMETERIZATIONS:
    for _b_std in FC_BIASES:
        for _act_name, _act in FC_ACTIVATIONS.items():
            register("fc", f"fc_{_act_name}_{_param}_b{_b_std}", functools.partial(fc_case, _act, _b_std, _param))


# =====================================================================================================================
# Family "hermite": Hermite polynomials need LayerNorm-ed inputs; the rows are also rescaled to norm sqrt(d)
# =====================================================================================================================
def row_normalized(x: np.ndarray) -> np.ndarray:
    """Rows rescaled to Euclidean norm sqrt(d) (unit mean square)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(x.shape[1])


def hermite_case(degree: int) -> Result:
    net = L.serial(L.Dense(64), L.LayerNorm(), L.Hermite(degree), L.Dense(2))
    x1, x2 = (row_normalized(x) for x in vector_inputs())
    arrays = {"x1": x1, "x2": x2, **kernels(net.kernel_fn(), x1, x2, "12")}
    return Result(f"{net}; x1, x2 rows rescaled to norm sqrt(d) = sqrt(7); *_12 = kernel_fn(x1, x2)", arrays)


for _degree in (1, 2, 3):
    register("hermite", f"fc_hermite_{_degree}", functools.partial(hermite_case, _degree))


# =====================================================================================================================
# Family "branch": FanOut / parallel / FanIn combinators
# =====================================================================================================================
def branch_result(net: Spec) -> Result:
    x1, x2 = vector_inputs()
    return Result(f"{net}; *_12 = kernel_fn(x1, x2)", {"x1": x1, "x2": x2, **kernels(net.kernel_fn(), x1, x2, "12")})


@case("branch")
def branch_residual_sum() -> Result:
    block = L.serial(L.Dense(64, W_std=1.3, b_std=0.1), L.Relu(), L.Dense(64, W_std=1.3, b_std=0.1))
    return branch_result(
        L.serial(L.Dense(64), L.FanOut(2), L.parallel(block, L.Identity()), L.FanInSum(), L.Relu(), L.Dense(1))
    )


@case("branch")
def branch_concat() -> Result:
    return branch_result(
        L.serial(
            L.FanOut(2),
            L.parallel(L.serial(L.Dense(32), L.Relu()), L.serial(L.Dense(32), L.Erf())),
            L.FanInConcat(),
            L.Dense(1),
        )
    )


@case("branch")
def branch_prod() -> Result:
    return branch_result(
        L.serial(L.FanOut(2), L.parallel(L.serial(L.Dense(32), L.Relu()), L.Dense(32)), L.FanInProd(), L.Dense(1))
    )


# =====================================================================================================================
# Family "conv": CNNs on NHWC images (and one NWC sequence net)
# =====================================================================================================================
def image_result(net: Spec) -> Result:
    kernel_fn = net.kernel_fn()
    im1, im2 = conv_inputs()["im1"], conv_inputs()["im2"]
    arrays = {
        "x1_nhwc": im1,
        "x2_nhwc": im2,
        **kernels(kernel_fn, im1, im2, "12"),
        **kernels(kernel_fn, im1, None, "11"),
    }
    return Result(f"{net}; inputs NHWC; *_12 = kernel_fn(x1, x2), *_11 = kernel_fn(x1, None)", arrays)


@case("conv")
def conv_same_flatten() -> Result:
    return image_result(
        L.serial(
            L.Conv(16, (3, 3), padding="SAME", b_std=0.1),
            L.Relu(),
            L.Conv(16, (3, 3), padding="SAME", b_std=0.1),
            L.Relu(),
            L.Flatten(),
            L.Dense(1),
        )
    )


@case("conv")
def conv_valid_stride2_gap() -> Result:
    return image_result(
        L.serial(
            L.Conv(16, (3, 3), strides=(2, 2), padding="VALID", W_std=1.4),
            L.Relu(),
            L.Conv(16, (2, 2), padding="SAME"),
            L.Erf(),
            L.GlobalAvgPool(),
            L.Dense(1),
        )
    )


@case("conv")
def conv_circular_avgpool() -> Result:
    return image_result(
        L.serial(
            L.Conv(16, (3, 3), padding="CIRCULAR"),
            L.Relu(),
            L.AvgPool((2, 2), strides=(2, 2)),
            L.Conv(16, (3, 3), padding="SAME"),
            L.Relu(),
            L.Flatten(),
            L.Dense(1),
        )
    )


@case("conv")
def conv_standard_param_sumpool() -> Result:
    return image_result(
        L.serial(
            L.Conv(16, (3, 3), padding="SAME", parameterization="standard"),
            L.Gelu(),
            L.SumPool((2, 2), strides=(1, 1), padding="SAME"),
            L.GlobalAvgPool(),
            L.Dense(1, parameterization="standard"),
        )
    )


@case("conv")
def conv1d_gap() -> Result:
    net = L.serial(
        L.Conv(8, (3,), padding="SAME"),
        L.Relu(),
        L.Conv(8, (3,), strides=(2,), padding="VALID"),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    seq = conv_inputs()["seq"]
    return Result(
        f"{net}; inputs NWC; *_11 = kernel_fn(x1, None)", {"x1_nwc": seq, **kernels(net.kernel_fn(), seq, None, "11")}
    )


# =====================================================================================================================
# Family "attention": GlobalSelfAttention, every mechanism with linear (1/d) scaling and IDENTITY with 1/sqrt(d)
# (NT has no kernel for the others), positional embeddings NONE/SUM/CONCAT, 1-D and 2-D, inside residual blocks;
# and apply_fn with stored parameters (the finite twin)
# =====================================================================================================================
@functools.cache
def attention_inputs() -> dict[str, np.ndarray]:
    """RandomState(11): two NHWC image batches (4 x 5 pixels, not square), then two NWC sequence batches."""
    rs = np.random.RandomState(11)
    im1, im2, seq1, seq2 = _frozen(rs.randn(4, 4, 5, 2), rs.randn(3, 4, 5, 2), rs.randn(4, 7, 3), rs.randn(3, 7, 3))
    return {"im1": im1, "im2": im2, "seq1": seq1, "seq2": seq2}


ATTENTION_DECAYS: dict[str, Code] = {
    "exp": Code("lambda d: jnp.exp(-d)", lambda d: jnp.exp(-d)),
    "exp_half": Code("lambda d: jnp.exp(-d / 2)", lambda d: jnp.exp(-d / 2)),
    "inverse": Code("lambda d: 1 / (1 + d)", lambda d: 1 / (1 + d)),
}
# tag -> (keyword arguments of GlobalSelfAttention(8, 8, 8, 2, ...), input kinds); pos_emb_decay_fn by name in
# ATTENTION_DECAYS. The same table is in tests/nt_nets.py (test_attention.py checks the descriptions against it).
ATTENTION_CASES: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "softmax": (dict(W_key_std=1.3, W_value_std=1.2, W_out_std=0.9, b_std=0.1), ("1d", "2d")),
    "identity": (dict(attention_mechanism="IDENTITY", W_key_std=0.5, W_query_std=0.8), ("1d", "2d")),
    "abs": (dict(attention_mechanism="ABS", W_key_std=0.6, b_std=0.2), ("2d",)),
    "relu": (dict(attention_mechanism="RELU", W_query_std=0.6, W_value_std=1.1), ("2d",)),
    "sqrt_identity": (
        dict(linear_scaling=False, attention_mechanism="IDENTITY", W_query_std=0.4, b_std=0.1),
        ("1d", "2d"),
    ),
    "sum_onehot": (dict(pos_emb_type="SUM", W_pos_emb_std=0.7), ("2d",)),
    "sum_p1_exp_val": (
        dict(pos_emb_type="SUM", pos_emb_p_norm=1, pos_emb_decay_fn="exp", val_pos_emb=True),
        ("1d", "2d"),
    ),
    "concat_p2_inverse": (
        dict(pos_emb_type="CONCAT", pos_emb_p_norm=2, pos_emb_decay_fn="inverse", n_chan_pos_emb=4, W_pos_emb_std=1.3),
        ("2d",),
    ),
    "concat_p1_exp_half_val": (
        dict(pos_emb_type="CONCAT", pos_emb_p_norm=1, pos_emb_decay_fn="exp_half", val_pos_emb=True),
        ("1d",),
    ),
    "relu_concat_p2_exp": (
        dict(attention_mechanism="RELU", pos_emb_type="CONCAT", pos_emb_decay_fn="exp", n_chan_pos_emb=16),
        ("2d",),
    ),
    "abs_sum_onehot_val": (
        dict(attention_mechanism="ABS", pos_emb_type="SUM", val_pos_emb=True, W_key_std=0.5),
        ("1d",),
    ),
    "identity_concat_p1_inverse_val": (
        dict(
            attention_mechanism="IDENTITY",
            pos_emb_type="CONCAT",
            pos_emb_p_norm=1,
            pos_emb_decay_fn="inverse",
            val_pos_emb=True,
            W_key_std=0.5,
        ),
        ("2d",),
    ),
    "sqrt_identity_sum_p2_exp_half": (
        dict(linear_scaling=False, attention_mechanism="IDENTITY", pos_emb_type="SUM", pos_emb_decay_fn="exp_half"),
        ("2d",),
    ),
    "sqrt_identity_concat_onehot_val": (
        dict(
            linear_scaling=False,
            attention_mechanism="IDENTITY",
            pos_emb_type="CONCAT",
            val_pos_emb=True,
            n_chan_pos_emb=4,
            W_query_std=0.5,
        ),
        ("1d",),
    ),
}


def attention_layer(kwargs: dict[str, Any]) -> Spec:
    kw = {k: ATTENTION_DECAYS[v] if k == "pos_emb_decay_fn" else v for k, v in kwargs.items()}
    return L.GlobalSelfAttention(8, 8, 8, 2, **kw)


def attention_result(net: Spec, kind: str) -> Result:
    data = attention_inputs()
    a, b = (data["im1"], data["im2"]) if kind == "2d" else (data["seq1"], data["seq2"])
    key = "nhwc" if kind == "2d" else "nwc"
    kernel_fn = net.kernel_fn()
    arrays = {
        f"x1_{key}": a,
        f"x2_{key}": b,
        **kernels(kernel_fn, a, b, "12"),
        **kernels(kernel_fn, a, None, "11"),
    }
    return Result(f"{net}; inputs {key.upper()}; *_12 = kernel_fn(x1, x2), *_11 = kernel_fn(x1, None)", arrays)


def attention_case(kwargs: dict[str, Any], kind: str) -> Result:
    """Conv-ReLU, then the attention layer twice (the second one reads its first's full self-covariances)."""
    att = attention_layer(kwargs)
    conv = L.Conv(8, (3, 3) if kind == "2d" else (3,), padding="SAME", b_std=0.1)
    return attention_result(L.serial(conv, L.Relu(), att, L.Relu(), att, L.GlobalAvgPool(), L.Dense(1)), kind)


for _tag, (_kwargs, _kinds) in ATTENTION_CASES.items():
    for _kind in _kinds:
        register("attention", f"attention_{_kind}_{_tag}", functools.partial(attention_case, _kwargs, _kind))


@case("attention")
def attention_2d_residual() -> Result:
    """Two residual attention blocks, x + Attn(x), with a Dense-ReLU-Dense block between them."""
    att = attention_layer(dict(pos_emb_type="SUM", pos_emb_decay_fn="exp", val_pos_emb=True, b_std=0.1))
    mlp = L.serial(L.Dense(16, W_std=1.2, b_std=0.1), L.Relu(), L.Dense(8))
    return attention_result(
        L.serial(
            L.Conv(8, (3, 3), padding="SAME"),
            L.FanOut(2),
            L.parallel(att, L.Identity()),
            L.FanInSum(),
            L.FanOut(2),
            L.parallel(mlp, L.Identity()),
            L.FanInSum(),
            L.FanOut(2),
            L.parallel(attention_layer(dict(attention_mechanism="RELU", W_key_std=0.5)), L.Identity()),
            L.FanInSum(),
            L.GlobalAvgPool(),
            L.Dense(1),
        ),
        "2d",
    )


# tag -> (keyword arguments of GlobalSelfAttention(5, 4, 3, 2, ...), input kind): apply_fn with init_fn's parameters
ATTENTION_APPLY_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "softmax_sum_exp_val": (
        dict(pos_emb_type="SUM", pos_emb_decay_fn="exp", val_pos_emb=True, b_std=0.3, W_key_std=1.3, W_out_std=0.8),
        "2d",
    ),
    "sqrt_relu_concat": (
        dict(linear_scaling=False, attention_mechanism="RELU", pos_emb_type="CONCAT", n_chan_pos_emb=3),
        "1d",
    ),
    "abs_concat_inverse_val": (
        dict(attention_mechanism="ABS", pos_emb_type="CONCAT", pos_emb_decay_fn="inverse", val_pos_emb=True),
        "2d",
    ),
}


def attention_apply_case(kwargs: dict[str, Any], kind: str) -> Result:
    kw = {k: ATTENTION_DECAYS[v] if k == "pos_emb_decay_fn" else v for k, v in kwargs.items()}
    layer = L.GlobalSelfAttention(5, 4, 3, 2, **kw)
    init_fn, apply_fn = layer.build()[:2]
    x = attention_inputs()["im1" if kind == "2d" else "seq1"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Linear scaling attention used")
        _, params = init_fn(jax.random.PRNGKey(1), x.shape)
    names = ("query", "key", "value", "out", "b", "pos_emb")
    arrays = {f"param_{n}": np.asarray(p) for n, p in zip(names, params) if p is not None}
    key = "nhwc" if kind == "2d" else "nwc"
    arrays.update({f"x_{key}": x, f"out_{key}": np.asarray(apply_fn(params, x))})
    return Result(
        f"init_fn, apply_fn of {layer}; _, params = init_fn(jax.random.PRNGKey(1), x.shape); params "
        f"(query_matrices, key_matrices, val_matrices, W_out, b, pos_emb) stored as param_query, param_key, "
        f"param_value, param_out, param_b, param_pos_emb (the ones that are not None); out = apply_fn(params, x)",
        arrays,
    )


for _tag, (_kwargs, _kind) in ATTENTION_APPLY_CASES.items():
    register("attention", f"attention_apply_{_kind}_{_tag}", functools.partial(attention_apply_case, _kwargs, _kind))


# =====================================================================================================================
# Family "predict": nt.predict on the small regression task, with one ReLU MLP's kernels
# =====================================================================================================================
PREDICT_NET = L.serial(L.Dense(128, b_std=0.2), L.Relu(), L.Dense(128, b_std=0.2), L.Relu(), L.Dense(1, b_std=0.2))


@case("predict")
def predict_ensemble() -> Result:
    data = regression_inputs()
    x_train, x_test, y_train = data["x_train"], data["x_test"], data["y_train"]
    predict_fn = nt.predict.gradient_descent_mse_ensemble(
        PREDICT_NET.kernel_fn(), x_train, y_train, learning_rate=1.0, diag_reg=1e-3
    )
    arrays = {"x_train": x_train, "x_test": x_test, "y_train": y_train}
    for t, tag in ((None, "inf"), (0.5, "0.5"), (5.0, "5.0")):
        out = predict_fn(x_test=x_test, get=BOTH, t=t, compute_cov=True)
        for get in BOTH:
            gaussian = getattr(out, get)
            arrays[f"{get}_mean_t{tag}"] = np.asarray(gaussian.mean)
            arrays[f"{get}_cov_t{tag}"] = np.asarray(gaussian.covariance)
    return Result(
        f"nt.predict.gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, learning_rate=1.0, "
        f"diag_reg=1e-3)(x_test=x_test, get=('nngp', 'ntk'), t=t, compute_cov=True) with kernel_fn of "
        f"{PREDICT_NET}; <get>_mean_t<tag> / <get>_cov_t<tag> for t = None (tag inf), 0.5, 5.0; "
        f"diag_reg relative to the mean train-kernel diagonal",
        arrays,
    )


@case("predict")
def predict_gd_mse() -> Result:
    data = regression_inputs()
    kernel_fn = PREDICT_NET.kernel_fn()
    k_train_train = np.asarray(kernel_fn(data["x_train"], None, "ntk"))
    k_test_train = np.asarray(kernel_fn(data["x_test"], data["x_train"], "ntk"))
    predict_fn = nt.predict.gradient_descent_mse(k_train_train, data["y_train"], learning_rate=0.5, diag_reg=0.0)
    arrays = {
        "k_train_train": k_train_train,
        "k_test_train": k_test_train,
        "y_train": data["y_train"],
        "fx_train_0": data["fx_train_0"],
        "fx_test_0": data["fx_test_0"],
    }
    for t in (0.0, 1.0, 10.0, 1e6):
        fx_train, fx_test = predict_fn(t, data["fx_train_0"], data["fx_test_0"], k_test_train)
        arrays[f"fx_train_t{t}"] = np.asarray(fx_train)
        arrays[f"fx_test_t{t}"] = np.asarray(fx_test)
    return Result(
        f"k_train_train = kernel_fn(x_train, None, 'ntk'), k_test_train = kernel_fn(x_test, x_train, 'ntk') "
        f"with kernel_fn of {PREDICT_NET}; nt.predict.gradient_descent_mse(k_train_train, y_train, "
        f"learning_rate=0.5, diag_reg=0.0)(t, fx_train_0, fx_test_0, k_test_train) -> fx_train_t<t>, "
        f"fx_test_t<t> for t = 0.0, 1.0, 10.0, 1000000.0",
        arrays,
    )


@case("predict")
def predict_gp_inference() -> Result:
    data = regression_inputs()
    kernel_fn = PREDICT_NET.kernel_fn()
    k_train_train = np.asarray(kernel_fn(data["x_train"], None, "nngp"))
    k_test_train = np.asarray(kernel_fn(data["x_test"], data["x_train"], "nngp"))
    k_test_test = np.asarray(kernel_fn(data["x_test"], None, "nngp"))
    out = nt.predict.gp_inference(k_train_train, data["y_train"], diag_reg=1e-2)(
        get="nngp", k_test_train=k_test_train, k_test_test=k_test_test
    )
    arrays = {
        "k_train_train": k_train_train,
        "k_test_train": k_test_train,
        "k_test_test": k_test_test,
        "y_train": data["y_train"],
        "mean": np.asarray(out.mean),
        "covariance": np.asarray(out.covariance),
    }
    return Result(
        f"NNGP kernels k_train_train, k_test_train, k_test_test of {PREDICT_NET}; "
        f"nt.predict.gp_inference(k_train_train, y_train, diag_reg=1e-2)(get='nngp', "
        f"k_test_train=k_test_train, k_test_test=k_test_test) -> mean, covariance",
        arrays,
    )


# =====================================================================================================================
# Family "empirical": finite-width NTK of an MLP with stored weights
# =====================================================================================================================
@case("empirical")
def empirical_mlp() -> Result:
    net = L.serial(L.Dense(32, b_std=0.1), L.Relu(), L.Dense(32, b_std=0.1), L.Relu(), L.Dense(4, b_std=0.1))
    init_fn, apply_fn = net.build()[:2]
    _, init_params = init_fn(jax.random.PRNGKey(0), (-1, 6))  # only the tree structure and shapes are used
    shapes, treedef = jax.tree_util.tree_flatten(init_params)
    # RandomState(5): every parameter (tree order: W1, b1, W2, b2, W3, b3), then x1 (8, 6), x2 (5, 6).
    rs = np.random.RandomState(5)
    leaves = [rs.randn(*leaf.shape) for leaf in shapes]
    x1, x2 = rs.randn(8, 6), rs.randn(5, 6)
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    contraction = nt.NtkImplementation.JACOBIAN_CONTRACTION
    ntk_traced = nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), implementation=contraction)(x1, x2, params)
    ntk_full = nt.empirical_ntk_fn(apply_fn, trace_axes=(), implementation=contraction)(x1, x2, params)
    arrays = {
        "x1": x1,
        "x2": x2,
        "ntk_traced": np.asarray(ntk_traced),
        "ntk_full": np.asarray(ntk_full),
        **{f"param_{i}": leaf for i, leaf in enumerate(leaves)},
    }
    return Result(
        f"apply_fn of {net} (input dim 6) with params param_0..param_5 in jax tree order "
        f"W1 (6, 32), b1 (1, 32), W2 (32, 32), b2 (1, 32), W3 (32, 4), b3 (1, 4), i.e. "
        f"f(x) = relu(relu(x W1 / sqrt(6) + 0.1 b1) W2 / sqrt(32) + 0.1 b2) W3 / sqrt(32) + 0.1 b3; "
        f"nt.empirical_ntk_fn(apply_fn, trace_axes=..., implementation=JACOBIAN_CONTRACTION)(x1, x2, "
        f"params): ntk_traced with trace_axes=(-1,) (mean over the 4 outputs), ntk_full with "
        f"trace_axes=() (8, 5, 4, 4)",
        arrays,
    )


# =====================================================================================================================
# Families "dropout", "index", "resize", "dot_general", "aggregate" (issue #14, NT's layer zoo): each layer inside a
# small CNN (or MLP) on NHWC images / NWC sequences; constants and graph patterns are stored with the inputs.
# ntkit's native layers are channels first: the tests translate the axes (tests/nt_nets.py, zoo builders).
# =====================================================================================================================
@functools.cache
def zoo_inputs(seed: int) -> dict[str, np.ndarray]:
    """RandomState(seed) (21 dropout, 22 index, 23 resize, 24 dot_general, 25 aggregate): vectors (8, 5), (6, 5),
    NHWC images (4, 5, 6, 2), (3, 5, 6, 2), NWC sequences (4, 7, 3), (3, 7, 3), in this order."""
    rs = np.random.RandomState(seed)
    names = ("vec1", "vec2", "im1", "im2", "seq1", "seq2")
    shapes = ((8, 5), (6, 5), (4, 5, 6, 2), (3, 5, 6, 2), (4, 7, 3), (3, 7, 3))
    arrays = _frozen(*(rs.randn(*s) for s in shapes))
    return dict(zip(names, arrays))


def zoo_result(net: Spec, seed: int, kind: str, extra: dict[str, np.ndarray] | None = None, **kw: Any) -> Result:
    """``kernel_fn(x1, x2, **kw)`` (*_12) and ``kernel_fn(x1, None, **kw11)`` (*_11) of ``net`` on the inputs of
    ``kind`` ("vec", "im" or "seq"); a ``pattern=(p1, p2)`` keyword is passed as ``(p1, p1)`` for *_11."""
    data = zoo_inputs(seed)
    x1, x2 = data[f"{kind}1"], data[f"{kind}2"]
    key = {"vec": "", "im": "_nhwc", "seq": "_nwc"}[kind]
    kernel_fn = net.kernel_fn()
    kw11 = {k: (v[0], v[0]) if k == "pattern" else v for k, v in kw.items()}
    k12 = kernel_fn(x1, x2, BOTH, **kw)
    k11 = kernel_fn(x1, None, BOTH, **kw11)
    arrays = {
        f"x1{key}": x1,
        f"x2{key}": x2,
        "nngp_12": np.asarray(k12.nngp),
        "ntk_12": np.asarray(k12.ntk),
        "nngp_11": np.asarray(k11.nngp),
        "ntk_11": np.asarray(k11.ntk),
        **(extra or {}),
    }
    if "pattern" in kw:
        calls = (
            "*_12 = kernel_fn(x1, x2, pattern=(pattern1, pattern2)), "
            "*_11 = kernel_fn(x1, None, pattern=(pattern1, pattern1))"
        )
    else:
        opts = "".join(f", {k}={v!r}" for k, v in kw.items())
        calls = f"*_12 = kernel_fn(x1, x2{opts}), *_11 = kernel_fn(x1, None{opts})"
    return Result(f"{net}; inputs {key[1:].upper() or 'vectors'}; {calls}", arrays)


def _conv_net(middle: list[Spec], head: list[Spec], kind: str = "im") -> Spec:
    """Conv-ReLU, the layer(s) under test, then ``head``."""
    shape = (3, 3) if kind == "im" else (3,)
    return L.serial(L.Conv(8, shape, padding="SAME", b_std=0.1), L.Relu(), *middle, *head)


GAP_HEAD = [L.GlobalAvgPool(), L.Dense(1)]


def _head_conv(kind: str = "im") -> list[Spec]:
    return [L.Conv(8, (2, 2) if kind == "im" else (2,), padding="SAME"), L.Relu(), *GAP_HEAD]


# -- dropout ----------------------------------------------------------------------------------------------------------
@case("dropout")
def dropout_fc_train() -> Result:
    net = L.serial(
        L.Dense(64, W_std=1.5, b_std=0.1),
        L.Relu(),
        L.Dropout(0.7),
        L.Dense(64, W_std=1.2, b_std=0.1),
        L.Relu(),
        L.Dropout(0.5, mode="train"),
        L.Dense(1),
    )
    return zoo_result(net, 21, "vec")


@case("dropout")
def dropout_fc_test() -> Result:
    net = L.serial(L.Dense(64, b_std=0.1), L.Relu(), L.Dropout(0.5, mode="test"), L.Dense(1))
    return zoo_result(net, 21, "vec")


@case("dropout")
def dropout_conv_pool() -> Result:
    """Full pixel covariances (pooling): the same-sample, same-pixel entries are scaled."""
    net = _conv_net(
        [L.Dropout(0.8), L.Conv(8, (3, 3), padding="SAME"), L.Relu(), L.AvgPool((2, 2))],
        [L.Dropout(0.6), L.Conv(8, (2, 2)), L.Relu(), *GAP_HEAD],
    )
    return zoo_result(net, 21, "im")


@case("dropout")
def dropout_conv_flatten() -> Result:
    """Diagonal pixel covariances (no pooling)."""
    return zoo_result(_conv_net([L.Dropout(0.75)], [L.Conv(8, (3, 3)), L.Relu(), L.Flatten(), L.Dense(1)]), 21, "im")


# -- index ------------------------------------------------------------------------------------------------------------
INDEX_CASES: dict[str, tuple[Code, str]] = {
    # tag -> (NT's index on NHWC activations, the head: "gap"/"gap1d" (full covariances), "flatten"/"flatten1d")
    "crop_flip": (Code("stax.Slice[:, 4:0:-1, 1:, :]", stax.Slice[:, 4:0:-1, 1:, :]), "gap"),
    "crop_flip_flatten": (Code("stax.Slice[:, 4:0:-1, 1:, :]", stax.Slice[:, 4:0:-1, 1:, :]), "flatten"),
    "row": (Code("stax.Slice[:, 2]", stax.Slice[:, 2]), "gap1d"),
    "row_flatten": (Code("stax.Slice[:, -1, ...]", stax.Slice[:, -1, ...]), "flatten1d"),
    "ellipsis_step": (Code("stax.Slice[..., ::-2, :]", stax.Slice[..., ::-2, :]), "gap"),
    "column_int": (Code("stax.Slice[:, :, 3, :]", stax.Slice[:, :, 3, :]), "flatten1d"),
}


def index_case(ix: Code, head: str) -> Result:
    heads = {
        "gap": _head_conv("im"),
        "flatten": [L.Conv(8, (2, 2)), L.Relu(), L.Flatten(), L.Dense(1)],
        "gap1d": _head_conv("seq"),
        "flatten1d": [L.Conv(8, (2,)), L.Relu(), L.Flatten(), L.Dense(1)],
    }
    return zoo_result(_conv_net([L.Index(ix)], heads[head]), 22, "im")


for _tag, (_idx, _head) in INDEX_CASES.items():
    register("index", f"index_{_tag}", functools.partial(index_case, _idx, _head))


# -- resize -----------------------------------------------------------------------------------------------------------
RESIZE_CASES: dict[str, tuple[tuple[int, ...], str, bool, str, str]] = {
    # tag -> (NT's shape (NHWC / NWC), method, antialias, input kind, head)
    "linear_down": ((-1, 3, 4, -1), "linear", True, "im", "gap"),
    "linear_down_noaa": ((-1, 3, 4, -1), "linear", False, "im", "gap"),
    "bilinear_up": ((-1, 8, 9, -1), "bilinear", True, "im", "gap"),
    "linear_mixed": ((-1, 3, 9, -1), "linear", True, "im", "flatten"),
    "linear_one_axis": ((-1, -1, 4, -1), "triangle", True, "im", "gap"),
    "nearest_up": ((-1, 7, 8, -1), "nearest", True, "im", "gap"),
    "nearest_down_flatten": ((-1, 3, 4, -1), "nearest", True, "im", "flatten"),
    "linear_1d": ((-1, 5, -1), "linear", True, "seq", "gap"),
    "nearest_1d": ((-1, 11, -1), "nearest", True, "seq", "flatten"),
}


def resize_case(shape: tuple[int, ...], method: str, antialias: bool, kind: str, head: str) -> Result:
    layer = L.ImageResize(shape, method) if antialias else L.ImageResize(shape, method, antialias=False)
    if head == "gap":
        tail = _head_conv(kind)
    else:
        tail = [L.Conv(8, (2, 2) if kind == "im" else (2,)), L.Relu(), L.Flatten(), L.Dense(1)]
    return zoo_result(_conv_net([layer], tail, kind), 23, kind)


for _tag, _args in RESIZE_CASES.items():
    register("resize", f"resize_{_tag}", functools.partial(resize_case, *_args))


# -- dot_general ------------------------------------------------------------------------------------------------------
@functools.cache
def dot_general_constants() -> dict[str, np.ndarray]:
    """RandomState(26): the constants of the dot_general cases, in this order."""
    rs = np.random.RandomState(26)
    shapes = {"c_h": (5,), "c_w": (6,), "c_mix_w": (4, 6), "c_batch_h": (5, 3), "c_outer": (2,), "c_mix_hw": (5, 6, 3)}
    return dict(zip(shapes, _frozen(*(rs.randn(*s) for s in shapes.values()))))


# tag -> (which side, the constant's name (None: the scalar 2.0), NT's dimension_numbers on NHWC, input kind, head).
# Where the output's channel axis is not last (a constant with free axes) NT's later layers refuse the kernel: those
# cases end with the DotGeneral ("none": the raw kernels, full pixel covariances; "none_diag": diagonal_spatial=True).
DOT_GENERAL_CASES: dict[str, tuple[str, str | None, Any, str, str]] = {
    "scalar_fc": ("rhs", None, (((), ()), ((), ())), "vec", "dense"),
    "scalar_im": ("rhs", None, (((), ()), ((), ())), "im", "gap"),
    "contract_h": ("rhs", "c_h", (((1,), (0,)), ((), ())), "im", "gap1d"),
    "lhs_contract_w": ("lhs", "c_w", (((0,), (2,)), ((), ())), "im", "gap1d"),
    "lhs_mix_w": ("lhs", "c_mix_w", (((1,), (2,)), ((), ())), "im", "none"),
    "batch_h": ("rhs", "c_batch_h", (((), ()), ((1,), (0,))), "im", "none"),
    "batch_h_diag": ("rhs", "c_batch_h", (((), ()), ((1,), (0,))), "im", "none_diag"),
    "outer_flatten": ("rhs", "c_outer", (((), ()), ((), ())), "im", "flatten"),
    "contract_hw": ("rhs", "c_mix_hw", (((1, 2), (0, 1)), ((), ())), "im", "none"),
}


def dot_general_case(side: str, const: str | None, dn: Any, kind: str, head: str) -> Result:
    value: Any = 2.0 if const is None else Code(const, dot_general_constants()[const])
    layer = L.DotGeneral(**{side: value}, dimension_numbers=dn)
    heads = {
        "dense": [L.Dense(1)],
        "gap": _head_conv("im"),
        "gap1d": _head_conv("seq"),
        "flatten": [L.Flatten(), L.Dense(1)],
        "none": [],
        "none_diag": [],
    }
    if kind == "vec":
        net = L.serial(L.Dense(16, b_std=0.1), L.Relu(), layer, *heads[head])
    else:
        net = _conv_net([layer], heads[head])
    extra = {} if const is None else {const: dot_general_constants()[const]}
    if head == "none_diag":
        return zoo_result(net, 24, kind, extra, diagonal_spatial=True)
    return zoo_result(net, 24, kind, extra)


for _tag, _args in DOT_GENERAL_CASES.items():
    register("dot_general", f"dot_general_{_tag}", functools.partial(dot_general_case, *_args))


# -- aggregate --------------------------------------------------------------------------------------------------------
@functools.cache
def aggregate_patterns() -> dict[str, np.ndarray]:
    """RandomState(27): per-sample graphs for the inputs of seed 25 (x1: 4 samples, x2: 3), in this order:
    weighted dense adjacencies (about half the edges) for sequences (7 x 7) and images (5·6 x 5·6), for the image
    width axis (6 x 6); integer edges (tail, head) for sequences (10 edges, 2 padding ones) and images (12 edges)."""
    rs = np.random.RandomState(27)
    out: dict[str, np.ndarray] = {}

    def dense(*shape: int) -> np.ndarray:
        return rs.rand(*shape) * (rs.rand(*shape) < 0.5)

    for tag, n in (("1", 4), ("2", 3)):
        out[f"seq_dense{tag}"] = dense(n, 7, 7)
    for tag, n in (("1", 4), ("2", 3)):
        out[f"im_dense{tag}"] = dense(n, 5, 6, 5, 6)
    for tag, n in (("1", 4), ("2", 3)):
        out[f"w_dense{tag}"] = dense(n, 6, 6)
    for tag, n in (("1", 4), ("2", 3)):
        e = rs.randint(0, 7, size=(n, 10, 2))
        e[:, -2:] = -1  # padding edges
        e[:, 0, 1] = -1  # an edge with a padding head is dropped too
        e[:, 1] = e[:, 2]  # a repeated edge (weight 2)
        out[f"seq_sparse{tag}"] = e
    for tag, n in (("1", 4), ("2", 3)):
        e = np.stack([rs.randint(0, 5, size=(n, 12, 2)), rs.randint(0, 6, size=(n, 12, 2))], axis=2)
        e[:, -1] = -1
        out[f"im_sparse{tag}"] = e
    return out


SHARED_GRID = "4-neighbour grid on 5 x 6 pixels with self-loops, weight 1/(number of neighbours)"


def shared_grid() -> np.ndarray:
    """The (5, 6, 5, 6) pattern of the shared-graph case: :data:`SHARED_GRID` (tests/nt_nets.py has the same)."""
    h, w = np.meshgrid(np.arange(5), np.arange(6), indexing="ij")
    d = np.abs(h.reshape(-1, 1) - h.reshape(1, -1)) + np.abs(w.reshape(-1, 1) - w.reshape(1, -1))
    a = (d <= 1).astype(np.float64)
    return (a / a.sum(0, keepdims=True)).reshape(5, 6, 5, 6)


# tag -> (NT's Aggregate keyword arguments, the patterns' name, input kind, head)
AGGREGATE_CASES: dict[str, tuple[dict[str, Any], str, str, str]] = {
    "1d_dense": (dict(aggregate_axis=1), "seq_dense", "seq", "gap"),
    "1d_default_axes": (dict(), "seq_dense", "seq", "gap"),
    "2d_dense": (dict(aggregate_axis=(1, 2)), "im_dense", "im", "gap"),
    "2d_axis_w": (dict(aggregate_axis=2), "w_dense", "im", "gap"),
    "1d_sparse": (dict(aggregate_axis=1, implementation="SPARSE"), "seq_sparse", "seq", "gap"),
    "2d_sparse": (dict(implementation="SPARSE"), "im_sparse", "im", "gap"),
    "1d_to_dense": (
        dict(
            aggregate_axis=1, to_dense=Code("lambda p: p + jnp.swapaxes(p, 1, 2)", lambda p: p + jnp.swapaxes(p, 1, 2))
        ),
        "seq_dense",
        "seq",
        "gap",
    ),
    # the graphs of 2d_sparse as dense adjacencies: NT 0.6.5's SPARSE path scrambles the vertices of a 2-D graph on
    # a kernel whose spatial axes are reversed (after a Conv), its DENSE path does not (tests/layers/test_aggregate.py)
    "2d_sparse_to_dense": (
        dict(to_dense=Code("edges_to_dense", lambda p: edges_to_dense(p))),
        "im_sparse",
        "im",
        "gap",
    ),
}


def edges_to_dense(p: Any) -> Any:
    """Integer edges ``(N, E, 2, 2)`` on 5 x 6 pixels (``p[n, e, axis, tail/head]``) -> the dense ``(N, 5, 6, 5, 6)``
    adjacency (repeated edges add up; an edge with a negative head coordinate is padding, weight 0)."""
    n = p.shape[0]
    ok = jnp.all(p[..., 1] >= 0, axis=-1).astype(jnp.float64)
    rows = jnp.arange(n)[:, None]
    return jnp.zeros((n, 5, 6, 5, 6)).at[rows, p[..., 0, 0], p[..., 1, 0], p[..., 0, 1], p[..., 1, 1]].add(ok)


def aggregate_case(kwargs: dict[str, Any], pattern: str, kind: str, head: str) -> Result:
    pats = aggregate_patterns()
    p1, p2 = pats[f"{pattern}1"], pats[f"{pattern}2"]
    conv = (3, 3) if kind == "im" else (3,)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Negative indices in `pattern`")
        agg = L.Aggregate(**kwargs)
        net = L.serial(
            L.Conv(8, conv, padding="SAME", b_std=0.1),
            agg,
            L.Relu(),
            L.Conv(8, conv, padding="SAME"),
            agg,
            L.Relu(),
            *GAP_HEAD,
        )
        return zoo_result(net, 25, kind, {"pattern1": p1, "pattern2": p2}, pattern=(p1, p2))


for _tag, _args in AGGREGATE_CASES.items():
    register("aggregate", f"aggregate_{_tag}", functools.partial(aggregate_case, *_args))


@case("aggregate")
def aggregate_shared_grid() -> Result:
    """One graph for every sample (ntkit's Aggregate(shared_pattern=...)): NT gets it tiled per sample."""
    grid = shared_grid()
    data = zoo_inputs(25)
    n1, n2 = data["im1"].shape[0], data["im2"].shape[0]
    p1, p2 = np.broadcast_to(grid, (n1, *grid.shape)).copy(), np.broadcast_to(grid, (n2, *grid.shape)).copy()
    net = L.serial(L.Conv(8, (3, 3), padding="SAME", b_std=0.1), L.Aggregate(), L.Relu(), *_head_conv("im"))
    res = zoo_result(net, 25, "im", {"grid": grid}, pattern=(p1, p2))
    res.description += f"; pattern1/2 = grid (the {SHARED_GRID}) for every sample"
    return res


# -- conv variants (ConvTranspose, ConvLocal) -------------------------------------------------------------------------
#: tag -> (layer, its positional args, its keyword args, kind, head): the layer between Conv-ReLU and the head;
#: "gap"/"gap1d" heads pool (full pixel covariances), "flatten"/"flatten1d" keep same-pixel covariances only
CONV_VARIANT_CASES: dict[str, tuple[str, tuple, dict[str, Any], str, str]] = {
    "transpose_2d_same_flatten": (
        "ConvTranspose",
        (8, (3, 3)),
        dict(padding="SAME", W_std=1.3, b_std=0.2),
        "im",
        "flatten",
    ),
    "transpose_2d_valid_s2_gap": (
        "ConvTranspose",
        (8, (3, 2)),
        dict(strides=(2, 2), padding="VALID", b_std=0.1, parameterization="standard"),
        "im",
        "gap",
    ),
    "transpose_2d_circular_s21_gap": (
        "ConvTranspose",
        (8, (3, 3)),
        dict(strides=(2, 1), padding="CIRCULAR"),
        "im",
        "gap",
    ),
    "transpose_2d_same_s2_k2_flatten": (
        "ConvTranspose",
        (8, (2, 2)),
        dict(strides=(2, 3), padding="SAME", b_std=0.1),
        "im",
        "flatten",
    ),
    "transpose_1d_same_s2_gap": (
        "ConvTranspose",
        (8, (4,)),
        dict(strides=(2,), padding="SAME", b_std=0.3),
        "seq",
        "gap1d",
    ),
    "transpose_1d_valid_standard_flatten": (
        "ConvTranspose",
        (8, (3,)),
        dict(strides=(3,), W_std=1.2, b_std=0.2, parameterization="standard"),
        "seq",
        "flatten1d",
    ),
    "transpose_1d_circular_gap": ("ConvTranspose", (8, (5,)), dict(strides=(2,), padding="CIRCULAR"), "seq", "gap1d"),
    "local_2d_same_flatten": ("ConvLocal", (8, (3, 3)), dict(padding="SAME", W_std=1.3, b_std=0.2), "im", "flatten"),
    "local_2d_valid_s2_standard_gap": (
        "ConvLocal",
        (8, (2, 2)),  # square: NT 0.6.5 swaps an unshared filter's axes on full pixel covariances after a Conv
        dict(strides=(2, 2), b_std=0.1, parameterization="standard"),
        "im",
        "gap",
    ),
    "local_1d_circular_gap": ("ConvLocal", (8, (3,)), dict(padding="CIRCULAR", b_std=0.2), "seq", "gap1d"),
}


def conv_variant_case(layer: str, args: tuple, kwargs: dict[str, Any], kind: str, head: str) -> Result:
    heads = {
        "gap": _head_conv("im"),
        "gap1d": _head_conv("seq"),
        "flatten": [L.Conv(8, (2, 2)), L.Relu(), L.Flatten(), L.Dense(1)],
        "flatten1d": [L.Conv(8, (2,)), L.Relu(), L.Flatten(), L.Dense(1)],
    }
    middle = [getattr(L, layer)(*args, **kwargs), L.Relu()]
    return zoo_result(_conv_net(middle, heads[head], kind), 26, kind)


for _tag, _args in CONV_VARIANT_CASES.items():
    register("conv_variants", f"conv_{_tag}", functools.partial(conv_variant_case, *_args))


# -- repeat (issue #14): stax.repeat(layer, n) = serial(*[layer] * n); seed 26 -----------------------------------------
@case("repeat")
def repeat_fc() -> Result:
    block = L.serial(L.Relu(), L.Dense(64, W_std=1.3, b_std=0.1))
    net = L.serial(L.Dense(64, W_std=1.5, b_std=0.1), L.repeat(block, 3), L.Erf(), L.Dense(1))
    return zoo_result(net, 26, "vec")


@case("repeat")
def repeat_conv() -> Result:
    # two convolutions per block: NT's repeat needs a block that keeps the record's is_reversed flag
    block = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1), L.Relu(), L.Conv(8, (2, 2), padding="SAME"), L.Relu()
    )
    return zoo_result(_conv_net([L.repeat(block, 2)], GAP_HEAD), 26, "im")


# -- the standard parameterisation's width scales s = (s_in, s_out) (issue #14); seed 27 -----------------------------
@case("dense_s")
def dense_s_standard() -> Result:
    net = L.serial(
        L.Dense(64, W_std=1.4, b_std=0.1, parameterization="standard", s=(1, 4)),
        L.Relu(),
        L.Dense(64, W_std=1.2, b_std=0.2, parameterization="standard", s=(4, 2)),
        L.Erf(),
        L.Dense(1, W_std=1.0, b_std=0.1, parameterization="standard", s=(2, 1)),
    )
    return zoo_result(net, 27, "vec")


@case("dense_s")
def conv_s_standard() -> Result:
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", W_std=1.3, b_std=0.1, parameterization="standard", s=(1, 2)),
        L.Relu(),
        L.Conv(8, (2, 2), padding="SAME", W_std=1.1, parameterization="standard", s=(2, 3)),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1, W_std=1.0, b_std=0.1, parameterization="standard", s=(3, 1)),
    )
    return zoo_result(net, 27, "im")


# =====================================================================================================================
# Family "masking" (issue #14): kernel_fn(x1, x2, mask_constant=MASK) — variable-length sequences and images with
# masked pixels through attention (every mechanism and positional embedding, 1-D and 2-D), Conv, pooling, LayerNorm,
# Flatten and branches; family "concat": FanInConcat along a spatial axis (with and without masks). Seed 31.
# =====================================================================================================================
MASK = 10.0


@functools.cache
def mask_inputs() -> dict[str, np.ndarray]:
    """RandomState(31), in this order: NWC sequences (4, 7, 3), (3, 7, 3) and their lengths (2..7; the tail is
    MASK in every channel); NHWC images (4, 4, 5, 2), (3, 4, 5, 2) and masked pixels (each with probability 0.25,
    every channel MASK; pixel (0, 0) never); vectors (6, 5), (4, 5). Then fixed edits: one sequence entry and one
    image entry equal MASK in a single channel (not a masked position: the first Dense/Conv keeps it, as NT), and
    the last vector of each batch all MASK (a masked sample)."""
    rs = np.random.RandomState(31)
    seq1, seq2 = rs.randn(4, 7, 3), rs.randn(3, 7, 3)
    len1, len2 = rs.randint(2, 8, 4), rs.randint(2, 8, 3)
    for x, lengths in ((seq1, len1), (seq2, len2)):
        for i, n in enumerate(lengths):
            x[i, n:] = MASK
    im1, im2 = rs.randn(4, 4, 5, 2), rs.randn(3, 4, 5, 2)
    pm1, pm2 = rs.rand(4, 4, 5) < 0.25, rs.rand(3, 4, 5) < 0.25
    pm1[:, 0, 0] = pm2[:, 0, 0] = False
    im1[pm1], im2[pm2] = MASK, MASK
    vec1, vec2 = rs.randn(6, 5), rs.randn(4, 5)
    seq1[0, 0, 1] = MASK
    im1[1, 0, 0, 0] = MASK
    vec1[-1], vec2[-1] = MASK, MASK
    arrays = _frozen(seq1, seq2, im1, im2, vec1, vec2)
    return dict(zip(("seq1", "seq2", "im1", "im2", "vec1", "vec2"), arrays))


def mask_result(net: Spec, kind: str, mask_constant: float = MASK) -> Result:
    """``kernel_fn(x1, x2, mask_constant=...)`` (*_12) and ``kernel_fn(x1, None, mask_constant=...)`` (*_11)."""
    data = mask_inputs()
    x1, x2 = data[f"{kind}1"], data[f"{kind}2"]
    if np.isnan(mask_constant):
        x1, x2 = np.where(x1 == MASK, np.nan, x1), np.where(x2 == MASK, np.nan, x2)
    key = {"vec": "", "im": "_nhwc", "seq": "_nwc"}[kind]
    kernel_fn = net.kernel_fn()
    k12 = kernel_fn(x1, x2, BOTH, mask_constant=mask_constant)
    k11 = kernel_fn(x1, None, BOTH, mask_constant=mask_constant)
    arrays = {
        f"x1{key}": x1,
        f"x2{key}": x2,
        "mask_constant": np.array(mask_constant),
        "nngp_12": np.asarray(k12.nngp),
        "ntk_12": np.asarray(k12.ntk),
        "nngp_11": np.asarray(k11.nngp),
        "ntk_11": np.asarray(k11.ntk),
    }
    c = "np.nan" if np.isnan(mask_constant) else repr(mask_constant)
    calls = f"*_12 = kernel_fn(x1, x2, mask_constant={c}), *_11 = kernel_fn(x1, None, mask_constant={c})"
    return Result(f"{net}; inputs {key[1:].upper() or 'vectors'}; {calls}", arrays)


def masked_attention_case(kwargs: dict[str, Any], kind: str) -> Result:
    """The attention family's net (Conv-ReLU, attention twice, GlobalAvgPool, Dense) on masked inputs."""
    att = attention_layer(kwargs)
    conv = L.Conv(8, (3, 3) if kind == "2d" else (3,), padding="SAME", b_std=0.1)
    net = L.serial(conv, L.Relu(), att, L.Relu(), att, L.GlobalAvgPool(), L.Dense(1))
    return mask_result(net, "im" if kind == "2d" else "seq")


for _tag, (_kwargs, _kinds) in ATTENTION_CASES.items():
    for _kind in ("1d", "2d"):
        register("masking", f"mask_attention_{_kind}_{_tag}", functools.partial(masked_attention_case, _kwargs, _kind))


@case("masking")
def mask_attention_2d_residual() -> Result:
    """Residual attention blocks with LayerNorm over channels (a transformer encoder), masked pixels."""
    att = attention_layer(dict(pos_emb_type="SUM", pos_emb_decay_fn="exp", val_pos_emb=True, b_std=0.1))
    mlp = L.serial(L.Dense(16, W_std=1.2, b_std=0.1), L.Relu(), L.Dense(8))
    return mask_result(
        L.serial(
            L.Conv(8, (3, 3), padding="SAME"),
            L.FanOut(2),
            L.parallel(att, L.Identity()),
            L.FanInSum(),
            L.LayerNorm(),
            L.FanOut(2),
            L.parallel(mlp, L.Identity()),
            L.FanInSum(),
            L.LayerNorm(),
            L.GlobalAvgPool(),
            L.Dense(1),
        ),
        "im",
    )


@case("masking")
def mask_attention_1d_nan() -> Result:
    """mask_constant=np.nan: NaN entries are the padding."""
    att = attention_layer(dict(pos_emb_type="CONCAT", pos_emb_decay_fn="exp", n_chan_pos_emb=4))
    net = L.serial(L.Dense(8, b_std=0.1), L.Relu(), att, L.Relu(), L.GlobalAvgPool(), L.Dense(1))
    return mask_result(net, "seq", float("nan"))


@case("masking")
def mask_conv_avgpool_layernorm() -> Result:
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1),
        L.Relu(),
        L.AvgPool((2, 2), padding="SAME"),
        L.Conv(8, (3, 3), strides=(1, 2), padding="SAME"),
        L.LayerNorm(axis=(1, 2, 3)),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return mask_result(net, "im")


@case("masking")
def mask_conv_sumpool_strided() -> Result:
    net = L.serial(
        L.Conv(8, (2, 2), padding="VALID", b_std=0.1),
        L.Erf(),
        L.SumPool((2, 2), strides=(1, 2), padding="VALID"),
        L.Conv(8, (2, 2), padding="SAME"),
        L.Gelu(),
        L.GlobalSumPool(),
        L.Dense(1),
    )
    return mask_result(net, "im")


@case("masking")
def mask_conv_flatten() -> Result:
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1),
        L.Relu(),
        L.Conv(8, (2, 2), padding="SAME"),
        L.Relu(),
        L.Flatten(),
        L.Dense(16, b_std=0.1),
        L.Relu(),
        L.Dense(1),
    )
    return mask_result(net, "im")


@case("masking")
def mask_seq_layernorm_time() -> Result:
    """LayerNorm over channels and time of a masked sequence (the mean over the unmasked positions)."""
    net = L.serial(
        L.Dense(8, b_std=0.1),
        L.Erf(),
        L.Conv(8, (3,), padding="SAME"),
        L.LayerNorm(axis=(1, 2)),
        L.Relu(),
        L.Conv(8, (2,), padding="CIRCULAR"),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return mask_result(net, "seq")


@case("masking")
def mask_fc() -> Result:
    """Vectors, one of them all MASK: a masked sample (its kernel entries are zero after the first Dense)."""
    net = L.serial(L.Dense(16, W_std=1.5, b_std=0.1), L.Gaussian(), L.Dense(16, b_std=0.2), L.Relu(), L.Dense(1))
    return mask_result(net, "vec")


@case("masking")
def mask_branches_sum_concat() -> Result:
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME"),
        L.Relu(),
        L.FanOut(2),
        L.parallel(L.Conv(8, (3, 3), padding="SAME", b_std=0.1), L.Conv(8, (2, 2), padding="SAME")),
        L.FanInSum(),
        L.Relu(),
        L.FanOut(2),
        L.parallel(L.Conv(8, (3, 3), padding="SAME"), L.Conv(4, (1, 1))),
        L.FanInConcat(),
        L.Conv(8, (2, 2), padding="SAME"),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return mask_result(net, "im")


@case("masking")
def mask_concat_spatial() -> Result:
    """Two masked sequences' branches concatenated along time (their masks too)."""
    att = attention_layer(dict(pos_emb_type="SUM", pos_emb_decay_fn="exp"))
    net = L.serial(
        L.Conv(8, (3,), padding="SAME", b_std=0.1),
        L.Relu(),
        L.FanOut(2),
        L.parallel(L.Conv(8, (3,), padding="SAME"), L.Conv(8, (2,), padding="SAME")),
        L.FanInConcat(axis=1),
        L.Relu(),
        att,
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return mask_result(net, "seq")


@case("masking")
def mask_index_crop_flip() -> Result:
    """Index (a crop and a flip of the masked image, NT's mask[idx]) before attention."""
    att = attention_layer(dict(attention_mechanism="RELU", pos_emb_type="SUM", pos_emb_decay_fn="exp"))
    crop = Code("stax.Slice[:, 3:0:-1, 1:, :]", stax.Slice[:, 3:0:-1, 1:, :])
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1),
        L.Relu(),
        L.Index(crop),
        L.Conv(8, (2, 2), padding="SAME"),
        att,
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return mask_result(net, "im")


def concat_result(net: Spec, kind: str, **kw: Any) -> Result:
    """Unmasked inputs of the masking family's RandomState(31) stream (zoo seed 31)."""
    return zoo_result(net, 31, kind, **kw)


@case("concat")
def concat_spatial_h_gap() -> Result:
    """Branches of different heights (a strided Conv) concatenated along H (NHWC axis 1), full covariances."""
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1),
        L.Relu(),
        L.FanOut(3),
        L.parallel(
            L.Conv(8, (3, 3), padding="SAME"),
            L.Conv(8, (3, 3), strides=(2, 1), padding="SAME", b_std=0.2),
            L.Dense(8, W_std=1.3),
        ),
        L.FanInConcat(axis=1),
        L.Relu(),
        L.Conv(8, (2, 2), padding="VALID"),
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return concat_result(net, "im")


@case("concat")
def concat_spatial_w_flatten() -> Result:
    """Concatenation along W (NHWC axis -2), then Flatten: diagonal covariances."""
    net = L.serial(
        L.Conv(8, (3, 3), padding="SAME", b_std=0.1),
        L.Erf(),
        L.FanOut(2),
        L.parallel(L.Conv(8, (2, 2), padding="SAME"), L.Conv(8, (3, 3), strides=(1, 2), padding="SAME")),
        L.FanInConcat(axis=-2),
        L.Relu(),
        L.Conv(8, (3, 3), padding="SAME"),
        L.Relu(),
        L.Flatten(),
        L.Dense(1),
    )
    return concat_result(net, "im")


@case("concat")
def concat_spatial_seq_attention() -> Result:
    att = attention_layer(dict(attention_mechanism="RELU", pos_emb_type="CONCAT", pos_emb_decay_fn="inverse"))
    net = L.serial(
        L.Dense(8, b_std=0.1),
        L.FanOut(2),
        L.parallel(L.Conv(8, (3,), padding="SAME"), L.Conv(8, (3,), strides=(2,), padding="VALID")),
        L.FanInConcat(axis=1),
        L.Relu(),
        att,
        L.Relu(),
        L.GlobalAvgPool(),
        L.Dense(1),
    )
    return concat_result(net, "seq")


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------
def select(patterns: Iterable[str] | None) -> list[Case]:
    if not patterns:
        return list(CASES.values())
    families = {c.family for c in CASES.values()}
    chosen = [
        c
        for c in CASES.values()
        if any(c.family == p if p in families else fnmatch.fnmatchcase(c.name, p) for p in patterns)
    ]
    if not chosen:
        raise SystemExit(f"no case matches {list(patterns)}; see --list")
    return chosen


def write_case(c: Case, out: Path) -> dict[str, Any]:
    result = c.make()
    arrays = {k: np.asarray(v) for k, v in result.arrays.items()}
    np.savez_compressed(out / f"{c.name}.npz", **arrays)
    return {"description": result.description, "arrays": {k: list(v.shape) for k, v in arrays.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument(
        "--only",
        action="append",
        metavar="PATTERN",
        help="case-name glob or family name; repeatable (default: every case)",
    )
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="REF_DIR",
        help="afterwards, compare the written cases with those in REF_DIR (compare_reference.py)",
    )
    args = parser.parse_args(argv)

    chosen = select(args.only)
    if args.list:
        for c in chosen:
            print(f"{c.family:10s} {c.name}")
        return 0
    if nt.__version__ != NT_VERSION:
        print(f"warning: neural-tangents {nt.__version__} (the references are from {NT_VERSION})", file=sys.stderr)

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / INDEX_NAME
    old_index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else {}
    index = dict(old_index) if args.only else {}
    for i, c in enumerate(chosen, 1):
        index[c.name] = write_case(c, out)
        print(f"[{i:3d}/{len(chosen)}] {c.family:9s} {c.name}", flush=True)
    if not args.only:
        for stale in sorted(set(old_index) - set(index)):
            (out / f"{stale}.npz").unlink(missing_ok=True)
            print(f"removed stale case {stale}")
    index_path.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(chosen)} case(s) to {out} ({len(index)} in {INDEX_NAME})")

    if args.compare is not None:
        sys.path.insert(0, str(HERE))
        from compare_reference import compare

        return compare(out, args.compare, names=[c.name for c in chosen])
    return 0


if __name__ == "__main__":
    sys.exit(main())
