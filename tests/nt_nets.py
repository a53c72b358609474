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
    "gabor": lambda: nk.Gabor(),
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


# the "attention" family: the same table as tests/data/make_nt_reference.py (test_attention.py checks the stored
# descriptions against it); pos_emb_decay_fn by name: (NT's code, the torch function)
ATTENTION_DECAYS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "exp": ("lambda d: jnp.exp(-d)", lambda d: torch.exp(-d)),
    "exp_half": ("lambda d: jnp.exp(-d / 2)", lambda d: torch.exp(-d / 2)),
    "inverse": ("lambda d: 1 / (1 + d)", lambda d: 1 / (1 + d)),
}
ATTENTION_TABLE: dict[str, tuple[dict, tuple[str, ...]]] = {
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
#: reference name -> (GlobalSelfAttention keyword arguments, input kind)
ATTENTION_CASES: dict[str, tuple[dict, str]] = {
    f"attention_{kind}_{tag}": (kwargs, kind) for tag, (kwargs, kinds) in ATTENTION_TABLE.items() for kind in kinds
}
ATTENTION_RESIDUAL = "attention_2d_residual"
#: apply_fn cases: reference name -> (keyword arguments of GlobalSelfAttention(5, 4, 3, 2, ...), input kind)
ATTENTION_APPLY_CASES: dict[str, tuple[dict, str]] = {
    "attention_apply_2d_softmax_sum_exp_val": (
        dict(pos_emb_type="SUM", pos_emb_decay_fn="exp", val_pos_emb=True, b_std=0.3, W_key_std=1.3, W_out_std=0.8),
        "2d",
    ),
    "attention_apply_1d_sqrt_relu_concat": (
        dict(linear_scaling=False, attention_mechanism="RELU", pos_emb_type="CONCAT", n_chan_pos_emb=3),
        "1d",
    ),
    "attention_apply_2d_abs_concat_inverse_val": (
        dict(attention_mechanism="ABS", pos_emb_type="CONCAT", pos_emb_decay_fn="inverse", val_pos_emb=True),
        "2d",
    ),
}


def attention_layer(kwargs: dict, widths: tuple[int, int, int, int] = (8, 8, 8, 2)) -> nk.GlobalSelfAttention:
    """``GlobalSelfAttention(*widths, **kwargs)`` with ``pos_emb_decay_fn`` given by its name in ATTENTION_DECAYS."""
    kw = {k: ATTENTION_DECAYS[v][1] if k == "pos_emb_decay_fn" else v for k, v in kwargs.items()}
    return nk.GlobalSelfAttention(*widths, **kw)


def attention_net(name: str) -> Net:
    """Conv-ReLU-Attn-ReLU-Attn-GAP-Dense (the same attention layer twice), or the residual net."""
    if name == ATTENTION_RESIDUAL:
        att = attention_layer(dict(pos_emb_type="SUM", pos_emb_decay_fn="exp", val_pos_emb=True, b_std=0.1))
        mlp = nk.serial(nk.Dense(16, W_std=1.2, b_std=0.1), nk.Relu(), nk.Dense(8))
        att2 = attention_layer(dict(attention_mechanism="RELU", W_key_std=0.5))
        return nk.serial(
            nk.Conv(8, (3, 3), padding="SAME"),
            *(
                layer
                for branch in (att, mlp, att2)
                for layer in (nk.FanOut(2), nk.parallel(branch, nk.Identity()), nk.FanInSum())
            ),
            nk.GlobalAvgPool(),
            nk.Dense(1),
        )
    kwargs, kind = ATTENTION_CASES[name]
    conv = nk.Conv(8, (3, 3) if kind == "2d" else (3,), padding="SAME", b_std=0.1)
    att = attention_layer(kwargs)
    return nk.serial(conv, nk.Relu(), att, nk.Relu(), att, nk.GlobalAvgPool(), nk.Dense(1))


def nchw(x: np.ndarray) -> torch.Tensor:
    """NT's channels-last images as PyTorch's channels-first."""
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


#: ConvTranspose / ConvLocal cases (issue #14): name -> (layer, args, kwargs, kind, head), the generator's table
CONV_VARIANTS: dict[str, tuple[str, tuple, dict, str, str]] = {
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
        dict(strides=(2, 2), b_std=0.1, parameterization="standard"),
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
        (8, (2, 2)),
        dict(strides=(2, 2), b_std=0.1, parameterization="standard"),
        "im",
        "gap",
    ),
    "local_1d_circular_gap": ("ConvLocal", (8, (3,)), dict(padding="CIRCULAR", b_std=0.2), "seq", "gap1d"),
}
CONV_VARIANT_CASES = [f"conv_{t}" for t in CONV_VARIANTS]


def conv_variant_net(name: str) -> Net:
    """Conv-ReLU, the ConvTranspose/ConvLocal layer, ReLU, then the head (the generator's conv_variant_case)."""
    layer, args, kwargs, kind, head = CONV_VARIANTS[name[len("conv_") :]]
    conv = (3, 3) if kind == "im" else (3,)
    heads: dict[str, Callable[[], list[nk.Layer]]] = {
        "gap": lambda: [nk.Conv(8, (2, 2), padding="SAME"), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1)],
        "gap1d": lambda: [nk.Conv(8, (2,), padding="SAME"), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1)],
        "flatten": lambda: [nk.Conv(8, (2, 2)), nk.Relu(), nk.Flatten(), nk.Dense(1)],
        "flatten1d": lambda: [nk.Conv(8, (2,)), nk.Relu(), nk.Flatten(), nk.Dense(1)],
    }
    mid = getattr(nk, layer)(*args, **kwargs)
    return nk.serial(nk.Conv(8, conv, padding="SAME", b_std=0.1), nk.Relu(), mid, nk.Relu(), *heads[head]())


def reference_net(name: str) -> Net:
    """The ntkit network of any layer reference case (fc_*, fc_hermite_*, branch_*, conv*, attention_*)."""
    if name in REPEAT_CONCAT_NETS:  # repeat and spatial FanInConcat (issue #14)
        return REPEAT_CONCAT_NETS[name]()
    if name in CONV_VARIANT_CASES:  # ConvTranspose / ConvLocal (issue #14)
        return conv_variant_net(name)
    if name in ZOO_CASES:  # the layer zoo (issue #14): constants and graphs are stored with the case
        from helpers import load_reference

        return zoo_net(name, load_reference(name))
    if name in HERMITE_CASES:
        return hermite_net(int(name[-1]))
    if name in FC_CASES:
        act, param, b_std = parse_case(name)
        return fc_net(ACTIVATIONS[act](), b_std, param)
    if name in BRANCH_CASES:
        return branch_net(name)
    if name in ATTENTION_CASES or name == ATTENTION_RESIDUAL:
        return attention_net(name)
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


# ---------------------------------------------------------------------------------------------------------------------
# the layer-zoo families of issue #14 ("dropout", "index", "resize", "dot_general", "aggregate"): the same tables as
# tests/data/make_nt_reference.py, with NT's channels-last arguments (checked against the stored descriptions) beside
# the native channels-first ones; constants and graphs come from the reference files
# ---------------------------------------------------------------------------------------------------------------------
#: index cases: tag -> (NT's index on NHWC, the native index on NCHW, head)
ZOO_INDEX: dict[str, tuple[str, tuple, str]] = {
    "crop_flip": ("stax.Slice[:, 4:0:-1, 1:, :]", nk.Slice[:, :, 4:0:-1, 1:], "gap"),
    "crop_flip_flatten": ("stax.Slice[:, 4:0:-1, 1:, :]", nk.Slice[:, :, 4:0:-1, 1:], "flatten"),
    "row": ("stax.Slice[:, 2]", nk.Slice[:, :, 2], "gap1d"),
    "row_flatten": ("stax.Slice[:, -1, ...]", nk.Slice[:, :, -1, ...], "flatten1d"),
    "ellipsis_step": ("stax.Slice[..., ::-2, :]", nk.Slice[..., ::-2], "gap"),
    "column_int": ("stax.Slice[:, :, 3, :]", nk.Slice[:, :, :, 3], "flatten1d"),
}
#: resize cases: tag -> (NT's shape, the native shape, method, antialias, input kind, head)
ZOO_RESIZE: dict[str, tuple[tuple[int, ...], tuple[int, ...], str, bool, str, str]] = {
    "linear_down": ((-1, 3, 4, -1), (-1, -1, 3, 4), "linear", True, "im", "gap"),
    "linear_down_noaa": ((-1, 3, 4, -1), (-1, -1, 3, 4), "linear", False, "im", "gap"),
    "bilinear_up": ((-1, 8, 9, -1), (-1, -1, 8, 9), "bilinear", True, "im", "gap"),
    "linear_mixed": ((-1, 3, 9, -1), (-1, -1, 3, 9), "linear", True, "im", "flatten"),
    "linear_one_axis": ((-1, -1, 4, -1), (-1, -1, -1, 4), "triangle", True, "im", "gap"),
    "nearest_up": ((-1, 7, 8, -1), (-1, -1, 7, 8), "nearest", True, "im", "gap"),
    "nearest_down_flatten": ((-1, 3, 4, -1), (-1, -1, 3, 4), "nearest", True, "im", "flatten"),
    "linear_1d": ((-1, 5, -1), (-1, -1, 5), "linear", True, "seq", "gap1d"),
    "nearest_1d": ((-1, 11, -1), (-1, -1, 11), "nearest", True, "seq", "flatten1d"),
}
#: dot_general cases: tag -> (side, constant's name (None: 2.0), NT's dimension_numbers, native ones, kind, head)
ZOO_DOT_GENERAL: dict[str, tuple[str, Optional[str], tuple, tuple, str, str]] = {
    "scalar_fc": ("rhs", None, (((), ()), ((), ())), (((), ()), ((), ())), "vec", "dense"),
    "scalar_im": ("rhs", None, (((), ()), ((), ())), (((), ()), ((), ())), "im", "gap"),
    "contract_h": ("rhs", "c_h", (((1,), (0,)), ((), ())), (((2,), (0,)), ((), ())), "im", "gap1d"),
    "lhs_contract_w": ("lhs", "c_w", (((0,), (2,)), ((), ())), (((0,), (3,)), ((), ())), "im", "gap1d"),
    "lhs_mix_w": ("lhs", "c_mix_w", (((1,), (2,)), ((), ())), (((1,), (3,)), ((), ())), "im", "none"),
    "batch_h": ("rhs", "c_batch_h", (((), ()), ((1,), (0,))), (((), ()), ((2,), (0,))), "im", "none"),
    "batch_h_diag": ("rhs", "c_batch_h", (((), ()), ((1,), (0,))), (((), ()), ((2,), (0,))), "im", "none_diag"),
    "outer_flatten": ("rhs", "c_outer", (((), ()), ((), ())), (((), ()), ((), ())), "im", "flat"),
    "contract_hw": ("rhs", "c_mix_hw", (((1, 2), (0, 1)), ((), ())), (((2, 3), (0, 1)), ((), ())), "im", "none"),
}
#: aggregate cases: tag -> (NT's keyword arguments as written, native keyword arguments, kind)
ZOO_AGGREGATE: dict[str, tuple[str, dict, str]] = {
    "1d_dense": ("aggregate_axis=1", dict(aggregate_axis=2), "seq"),
    "1d_default_axes": ("", dict(), "seq"),
    "2d_dense": ("aggregate_axis=(1, 2)", dict(aggregate_axis=(2, 3)), "im"),
    "2d_axis_w": ("aggregate_axis=2", dict(aggregate_axis=3), "im"),
    "1d_sparse": ("aggregate_axis=1, implementation='SPARSE'", dict(aggregate_axis=2, implementation="SPARSE"), "seq"),
    "2d_sparse": ("implementation='SPARSE'", dict(implementation="SPARSE"), "im"),
    "1d_to_dense": (
        "aggregate_axis=1, to_dense=lambda p: p + jnp.swapaxes(p, 1, 2)",
        dict(aggregate_axis=2, to_dense=lambda p: p + p.transpose(1, 2)),
        "seq",
    ),
    # NT's DENSE Aggregate on the edges of 2d_sparse (its to_dense = the edges' adjacency) against ntkit's SPARSE one
    "2d_sparse_to_dense": ("to_dense=edges_to_dense", dict(implementation="SPARSE"), "im"),
}
ZOO_DROPOUT = ["dropout_fc_train", "dropout_fc_test", "dropout_conv_pool", "dropout_conv_flatten"]
ZOO_CASES: list[str] = [
    *ZOO_DROPOUT,
    *(f"index_{t}" for t in ZOO_INDEX),
    *(f"resize_{t}" for t in ZOO_RESIZE),
    *(f"dot_general_{t}" for t in ZOO_DOT_GENERAL),
    *(f"aggregate_{t}" for t in ZOO_AGGREGATE),
    "aggregate_shared_grid",
]


def shared_grid() -> torch.Tensor:
    """The (5, 6, 5, 6) graph of aggregate_shared_grid: the 4-neighbour grid on 5 x 6 pixels with self-loops, each
    edge i -> j of weight 1/(number of neighbours of j) (the generator's ``shared_grid``)."""
    h, w = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    d = (h.reshape(-1, 1) - h.reshape(1, -1)).abs() + (w.reshape(-1, 1) - w.reshape(1, -1)).abs()
    a = (d <= 1).double()
    return (a / a.sum(0, keepdim=True)).reshape(5, 6, 5, 6)


def _zoo_head(head: str) -> list[nk.Layer]:
    C = nk.Conv
    heads: dict[str, Callable[[], list[nk.Layer]]] = {
        "gap": lambda: [C(8, (2, 2), padding="SAME"), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1)],
        "gap1d": lambda: [C(8, (2,), padding="SAME"), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1)],
        "flatten": lambda: [C(8, (2, 2)), nk.Relu(), nk.Flatten(), nk.Dense(1)],
        "flatten1d": lambda: [C(8, (2,)), nk.Relu(), nk.Flatten(), nk.Dense(1)],
        "flat": lambda: [nk.Flatten(), nk.Dense(1)],
        "dense": lambda: [nk.Dense(1)],
        "none": lambda: [],
        "none_diag": lambda: [],
    }
    return heads[head]()


def _zoo_conv(middle: list[nk.Layer], head: list[nk.Layer], kind: str = "im") -> Net:
    return nk.serial(nk.Conv(8, (3, 3) if kind == "im" else (3,), padding="SAME", b_std=0.1), nk.Relu(), *middle, *head)


def zoo_net(name: str, ref: Optional[dict] = None) -> Net:
    """The ntkit network of a layer-zoo reference case (``ref``: its arrays, for the stored constants)."""
    if name in ZOO_DROPOUT:
        C = nk.Conv
        nets: dict[str, Callable[[], Net]] = {
            "dropout_fc_train": lambda: nk.serial(
                nk.Dense(64, 1.5, 0.1),
                nk.Relu(),
                nk.Dropout(0.7),
                nk.Dense(64, 1.2, 0.1),
                nk.Relu(),
                nk.Dropout(0.5, mode="train"),
                nk.Dense(1),
            ),
            "dropout_fc_test": lambda: nk.serial(
                nk.Dense(64, b_std=0.1), nk.Relu(), nk.Dropout(0.5, mode="test"), nk.Dense(1)
            ),
            "dropout_conv_pool": lambda: _zoo_conv(
                [nk.Dropout(0.8), C(8, (3, 3), padding="SAME"), nk.Relu(), nk.AvgPool((2, 2))],
                [nk.Dropout(0.6), C(8, (2, 2)), nk.Relu(), nk.GlobalAvgPool(), nk.Dense(1)],
            ),
            "dropout_conv_flatten": lambda: _zoo_conv(
                [nk.Dropout(0.75)], [C(8, (3, 3)), nk.Relu(), nk.Flatten(), nk.Dense(1)]
            ),
        }
        return nets[name]()
    if name.startswith("index_"):
        _, idx, head = ZOO_INDEX[name[len("index_") :]]
        return _zoo_conv([nk.Index(idx)], _zoo_head(head))
    if name.startswith("resize_"):
        _, shape, method, antialias, kind, head = ZOO_RESIZE[name[len("resize_") :]]
        return _zoo_conv([nk.ImageResize(shape, method, antialias=antialias)], _zoo_head(head), kind)
    if name.startswith("dot_general_"):
        side, const, _, dn, kind, head = ZOO_DOT_GENERAL[name[len("dot_general_") :]]
        if const is not None and ref is None:
            raise ValueError(f"{name}: pass the reference arrays (its constant {const} is stored there)")
        value = 2.0 if const is None else torch.from_numpy(ref[const])  # type: ignore[index]
        layer = nk.DotGeneral(**{side: value}, dimension_numbers=dn)
        tail = _zoo_head(head)
        if head == "none":  # NT's raw kernels are full pixel covariances: make ntkit track them (an identity pool)
            out_rank = len(layer.build((8, 5, 6), None, torch.Generator(), True)[1])
            tail = [nk.AvgPool((1,) * (out_rank - 1))]
        if kind == "vec":
            return nk.serial(nk.Dense(16, b_std=0.1), nk.Relu(), layer, *tail)
        return _zoo_conv([layer], tail)
    if name == "aggregate_shared_grid":
        return nk.serial(
            nk.Conv(8, (3, 3), padding="SAME", b_std=0.1),
            nk.Aggregate(shared_pattern=shared_grid()),
            nk.Relu(),
            *_zoo_head("gap"),
        )
    _, kwargs, kind = ZOO_AGGREGATE[name[len("aggregate_") :]]
    conv = (3, 3) if kind == "im" else (3,)
    agg = nk.Aggregate(**kwargs)
    return nk.serial(
        nk.Conv(8, conv, padding="SAME", b_std=0.1),
        agg,
        nk.Relu(),
        nk.Conv(8, conv, padding="SAME"),
        agg,
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(1),
    )


def zoo_kwargs(name: str, ref: dict, x2_none: bool) -> dict:
    """``kernel_fn``'s keyword arguments of a layer-zoo case: the graphs of the aggregate cases (``(p1, None)`` for
    ``x2=None``)."""
    if "pattern1" not in ref or name == "aggregate_shared_grid":
        return {}
    p1 = torch.from_numpy(ref["pattern1"])
    return {"pattern": (p1, None if x2_none else torch.from_numpy(ref["pattern2"]))}


def zoo_errors(name: str, ref: dict, **overrides) -> dict[str, float]:
    """ntkit against NT on a layer-zoo case (``rel_err``): ``"12"`` (x2 given), ``"11_off"`` (x1 against itself, off
    the diagonal) and ``"11_diag"`` (its diagonal, where NT's arc-cosines carry ~1e-9 of round-off), the worst of the
    NNGP and the NTK. ``overrides``: ``net`` (a network in place of the case's) or ``kwargs12``/``kwargs11``."""
    from helpers import rel_err

    net = overrides.get("net") or zoo_net(name, ref)
    x1, x2 = reference_inputs(ref)
    k12 = net.kernel_fn(x1, x2, **overrides.get("kwargs12", zoo_kwargs(name, ref, False)))
    k11 = net.kernel_fn(x1, None, **overrides.get("kwargs11", zoo_kwargs(name, ref, True)))
    off = ~torch.eye(len(x1), dtype=torch.bool)
    out = {"12": 0.0, "11_off": 0.0, "11_diag": 0.0}
    for g in ("nngp", "ntk"):
        ours, theirs = getattr(k11, g), torch.from_numpy(ref[f"{g}_11"])
        out["12"] = max(out["12"], rel_err(getattr(k12, g), ref[f"{g}_12"]))
        out["11_off"] = max(out["11_off"], rel_err(ours[off], theirs[off]))
        out["11_diag"] = max(out["11_diag"], rel_err(ours[~off], theirs[~off]))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# repeat and spatial FanInConcat (issue #14): the same networks as the generator's "repeat" / "concat" families
# ---------------------------------------------------------------------------------------------------------------------
def _repeat_fc() -> Net:
    block = nk.serial(nk.Relu(), nk.Dense(64, 1.3, 0.1))
    return nk.serial(nk.Dense(64, 1.5, 0.1), nk.repeat(block, 3), nk.Erf(), nk.Dense(1))


def _repeat_conv() -> Net:
    C = nk.Conv
    block = nk.serial(C(8, (3, 3), padding="SAME", b_std=0.1), nk.Relu(), C(8, (2, 2), padding="SAME"), nk.Relu())
    return _zoo_conv([nk.repeat(block, 2)], _zoo_head("gap")[2:])


REPEAT_CONCAT_NETS: dict[str, Callable[[], Net]] = {"repeat_fc": _repeat_fc, "repeat_conv": _repeat_conv}
