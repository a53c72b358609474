"""NT code run unchanged with ``stax`` bound to ``ntkit.stax``: every committed NT 0.6.5 reference case whose
description is a stax expression is evaluated as written, on the case's NT-layout inputs, and compared with
NT's own outputs (float64; 1e-6 relative is the bar, most cases agree to 1e-10)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import REFERENCE_DIR, load_reference, rel_err

import ntkit.nt as nt
from ntkit import stax

INDEX = json.loads((REFERENCE_DIR / "cases.json").read_text())

#: cases whose NT outputs are NaN (an NT bug that ntkit does not reproduce: RectifiedMonomial at ρ = ±1)
NT_NAN = {n for n in INDEX if n.startswith("fc_rectified_monomial")}
#: tolerances above the default: both libraries carry the 25-node quadrature's error for tanh
TOL = {n: 1e-2 for n in INDEX if "elementwise_numerical_tanh" in n}


def _code(name: str) -> str:
    return INDEX[name]["description"].split(";")[0].strip()


#: NT 0.6.5 bugs (its kernel_fn ignores that a Conv reverses the record's spatial axes): 2-D ImageResize swaps
#: the H and W targets, a 2-D SPARSE Aggregate scrambles the graph. tests/layers/test_resize.py and
#: test_aggregate.py show ntkit's kernels are NT's with the targets swapped / NT's DENSE path on the same edges.
NT_BUG = {n for n in INDEX if n.startswith("resize_") and not n.endswith("_1d")} | {"aggregate_2d_sparse"}
#: cases whose NT code uses a helper of the generator script (tested natively in tests/layers/test_aggregate.py)
GENERATOR_HELPERS = {"aggregate_2d_sparse_to_dense"}
SKIP = NT_NAN | NT_BUG | GENERATOR_HELPERS
STAX_CASES = sorted(n for n in INDEX if _code(n).startswith("stax.") and n not in SKIP)


def _inputs(ref: dict):
    for key in ("x1", "x1_nhwc", "x1_nwc"):
        if key in ref:
            x2 = key.replace("x1", "x2")
            return ref[key], ref.get(x2)
    raise KeyError("no inputs")


def test_most_layer_cases_are_stax_expressions():
    layer_cases = [n for n in INDEX if not n.startswith(("predict_", "empirical_", "attention_apply_"))]
    assert len(STAX_CASES) >= len(layer_cases) - len(NT_NAN | NT_BUG | GENERATOR_HELPERS)


@pytest.mark.parametrize("name", STAX_CASES)
def test_nt_code_runs_unchanged(name):
    ref = load_reference(name)
    # the NT code, as written; `jnp` is torch (NT's functions are applied to torch tensors), the case's
    # constants (DotGeneral's) are in scope as in NT's script
    scope = {"stax": stax, "np": np, "jnp": torch, **{k: v for k, v in ref.items() if k.startswith("c_")}}
    init_fn, apply_fn, kernel_fn = eval(_code(name), scope)
    x1, x2 = _inputs(ref)
    tol = TOL.get(name, 1e-6)
    if "grid" in ref:  # one graph for every sample, given to NT per sample
        ref["pattern1"] = np.broadcast_to(ref["grid"], (len(x1), *ref["grid"].shape))
        ref["pattern2"] = np.broadcast_to(ref["grid"], (len(x2), *ref["grid"].shape))
    kw12 = {"pattern": (ref["pattern1"], ref["pattern2"])} if "pattern1" in ref else {}
    kw11 = {"pattern": (ref["pattern1"], ref["pattern1"])} if "pattern1" in ref else {}
    if "diagonal_spatial=True" in INDEX[name]["description"]:
        kw12["diagonal_spatial"] = kw11["diagonal_spatial"] = True
    if "mask_constant" in ref:  # NT's masking: kernel_fn(x1, x2, mask_constant=c), as the description says
        kw12["mask_constant"] = kw11["mask_constant"] = float(ref["mask_constant"])
    if x2 is not None and "nngp_12" in ref:
        k = kernel_fn(x1, x2, **kw12)
        assert rel_err(k.nngp, ref["nngp_12"]) < tol
        assert rel_err(k.ntk, ref["ntk_12"]) < tol
        nngp, ntk = kernel_fn(x1, x2, ("nngp", "ntk"), **kw12)  # NT's tuple `get`: a namedtuple in that order
        assert torch.equal(nngp, k.nngp) and torch.equal(ntk, k.ntk)
    if "nngp_11" in ref:
        k = kernel_fn(x1, None, "nngp", **kw11)
        off = ~np.eye(len(x1), dtype=bool)
        ours = k.detach().numpy()
        if ours.ndim > 2:  # spatial axes: compare the off-diagonal sample pairs
            off = off.reshape(off.shape + (1,) * (ours.ndim - 2)) & np.ones(ours.shape, dtype=bool)
        assert np.abs(ours - ref["nngp_11"])[off].max() / np.abs(ref["nngp_11"]).max() < tol


def test_init_and_apply_follow_nt_layouts():
    init_fn, apply_fn, kernel_fn = stax.serial(
        stax.Conv(8, (3, 3), padding="SAME"), stax.Relu(), stax.Flatten(), stax.Dense(3)
    )
    x = np.random.RandomState(0).randn(4, 6, 6, 2)  # NHWC, as NT takes it
    out_shape, params = init_fn(0, x.shape)
    y = apply_fn(params, x)
    assert out_shape == (4, 3) and tuple(y.shape) == (4, 3)
    _, conv_params = stax.Conv(8, (3, 3), padding="SAME")[0](0, x.shape)
    assert stax.Conv(8, (3, 3), padding="SAME")[0](0, x.shape)[0] == (4, 6, 6, 8)  # channels last out


def test_nt_top_level_names():
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(256, W_std=1.5, b_std=0.1), stax.Erf(), stax.Dense(1))
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, params = init_fn(0, x.shape)
    f = lambda p, xx: apply_fn(p, xx)  # NT's f(params, x)
    # the empirical NTK of the finite twin is close to the limit at width 256 (NTK parameterisation)
    emp = nt.empirical_ntk_fn(f, implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION)
    params_tree = dict(params.named_parameters())
    g = lambda p, xx: torch.func.functional_call(params, p, (xx,))
    k_emp = nt.empirical_ntk_fn(g)(x, None, params_tree)
    k_inf = kernel_fn(x, None, "ntk")
    assert rel_err(k_emp, k_inf) < 0.2
    assert callable(emp)
    # NTK-vector products equal the untraced empirical NTK times the vector
    v = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    vp = nt.empirical_ntk_vp_fn(g, x, None, params_tree)(v)
    full = nt.empirical_ntk_fn(g, trace_axes=())(x, None, params_tree)  # (5, 5, 1, 1)
    assert rel_err(vp, torch.einsum("ijab,jb->ia", full, v)) < 1e-10
    # batching changes nothing
    batched = nt.batch(kernel_fn, batch_size=2)
    assert rel_err(batched(x, None, "ntk"), k_inf) < 1e-12
    # linearize: f_lin(params) = f(params); moves by J dθ
    f_lin = nt.linearize(g, params_tree)
    assert rel_err(f_lin(params_tree, x), g(params_tree, x).detach()) < 1e-12


def test_width_scales_s_widen_the_twin_not_the_kernel():
    """NT's ``s = (s_in, s_out)``: the twin's widths are ``s_out·out_dim`` and its output variance is the NNGP
    (Monte Carlo over 400 twins, within 1 % + 3 standard errors); the kernel is that of ``s = (1, 1)``."""

    def net(a: int, b: int):
        return stax.serial(
            stax.Dense(16, 1.4, 0.1, parameterization="standard", s=(1, a)),
            stax.Relu(),
            stax.Dense(1, 1.1, 0.2, parameterization="standard", s=(a, b)),
        )

    x = np.random.RandomState(1).randn(3, 5)
    init_fn, apply_fn, kernel_fn = net(8, 1)
    assert rel_err(kernel_fn(x, None, "ntk"), net(1, 1)[2](x, None, "ntk")) == 0.0
    _, params = init_fn(0, x.shape)
    assert [tuple(p.shape) for p in params.parameters()] == [(128, 5), (128,), (1, 128), (1,)]
    with pytest.raises(ValueError, match="pair of positive ints"):
        stax.Dense(4, parameterization="standard", s=(0, 2))
    outs = torch.stack([apply_fn(init_fn(seed, x.shape)[1], x)[:, 0] for seed in range(400)])
    emp = outs.T @ outs / len(outs)
    exact = kernel_fn(x, None, "nngp")
    se = (torch.einsum("si,sj->sij", outs, outs).std(0) / 20).norm() / exact.norm()
    assert rel_err(emp, exact) < 0.01 + 3 * float(se)


def test_diagonal_batch_false_is_a_layout_of_cov1():
    """NT's ``diagonal_batch=False``: ``cov1``/``cov2`` are the full ``(N, N, ...)`` covariances of each batch (its
    NNGP with itself); ``nngp``/``ntk`` are the same numbers."""
    _, _, kernel_fn = stax.serial(stax.Conv(4, (3,), padding="SAME"), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
    rs = np.random.RandomState(3)
    x1, x2 = rs.randn(3, 5, 2), rs.randn(2, 5, 2)
    full, diag = kernel_fn(x1, x2, diagonal_batch=False), kernel_fn(x1, x2)
    assert torch.equal(full.nngp, diag.nngp) and torch.equal(full.ntk, diag.ntk)
    assert full.cov1.shape == (3, 3) and full.cov2.shape == (2, 2)
    assert rel_err(full.cov1, kernel_fn(x1, None, "nngp")) < 1e-15
    assert rel_err(torch.diagonal(full.cov2), diag.cov2) < 1e-14


def test_masking_keywords():
    """``kernel_fn(..., mask_constant=)`` reaches the native API; ``apply_fn(..., mask_constant=)`` (a masked
    finite network) is refused rather than ignored; ``FanInConcat``'s NT axis is translated."""
    init_fn, apply_fn, kernel_fn = stax.serial(stax.Dense(8), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1))
    x = np.random.RandomState(4).randn(3, 6, 2)
    padded = np.concatenate([x, np.full((3, 2, 2), -5.0)], 1)  # NWC: two masked time steps
    assert rel_err(kernel_fn(padded, None, "ntk", mask_constant=-5.0), kernel_fn(x, None, "ntk")) < 1e-13
    _, params = init_fn(0, x.shape)
    with pytest.raises(NotImplementedError, match="mask_constant"):
        apply_fn(params, padded, mask_constant=-5.0)
    cat = stax.serial(stax.Dense(4), stax.FanOut(2), stax.parallel(stax.Dense(4), stax.Dense(4)), stax.FanInConcat(1))
    assert cat[2](x, None, "nngp", diagonal_spatial=True).shape == (3, 3, 12)  # NWC axis 1: time
    assert cat[0](0, x.shape)[0] == (3, 12, 4)
