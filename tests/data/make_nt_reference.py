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
``conv*``) or family names (``fc``, ``hermite``, ``branch``, ``conv``, ``predict``, ``empirical``), may be repeated,
and then only those cases are rewritten: the other entries of an existing ``cases.json`` are kept. A full run also
deletes ``.npz`` files that the old ``cases.json`` listed but that no case makes any more. ``--list`` prints the
cases, and ``--compare REF_DIR`` checks the written files against another copy afterwards (``compare_reference.py``
in this folder, which only needs NumPy).

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
