"""Convolutions, pooling, Flatten and the CNN architectures: NT parity, closed forms, layouts, errors.

Tolerances (float64): NT parity 1e-10 (measured ≤ 2e-15), except on the diagonal of ``kernel_fn(x, None)``
for nets ending in Flatten, where NT's own NTK carries round-off amplified by ``arccos`` at ``ρ = 1 − O(eps)``
(measured 4e-10 and 1.8e-9): 1e-5 there, the project's parity bar. Brute-force loops and layout
equivalences: 1e-12.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import load_reference, rel_err
from nt_nets import CONV_CASES, conv_net, nchw

import ntkit as nk
from ntkit.architectures import cntk, myrtle, wide_resnet
from ntkit.kernel import Kernel, kernel_from_inputs
from ntkit.layers import LayerError
from ntkit.layers.conv import plan_windows

F64 = torch.float64


def _img(n, c=2, size=(6, 6), seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, c) + tuple(size), generator=g, dtype=dtype)


@pytest.mark.parametrize("name", CONV_CASES)
def test_nt_parity(name):
    ref = load_reference(name)
    key = "x1_nwc" if "x1_nwc" in ref else "x1_nhwc"
    x1 = nchw(ref[key])
    net = conv_net(name)
    k = net.kernel_fn(x1, None)
    tol_diag = 1e-5 if name == "conv_same_flatten" else 1e-10
    assert rel_err(k.nngp, ref["nngp_11"]) < 1e-10
    assert rel_err(k.ntk, ref["ntk_11"]) < tol_diag
    if key.replace("x1", "x2") in ref:
        k = net.kernel_fn(x1, nchw(ref[key.replace("x1", "x2")]))
        assert rel_err(k.nngp, ref["nngp_12"]) < 1e-10
        assert rel_err(k.ntk, ref["ntk_12"]) < 1e-10


def test_nt_parity_float32():
    """float32 in, float32 out, within float32 round-off of NT's float64 values."""
    ref = load_reference("conv_circular_avgpool")
    x1, x2 = nchw(ref["x1_nhwc"]).float(), nchw(ref["x2_nhwc"]).float()
    k = conv_net("conv_circular_avgpool").kernel_fn(x1, x2)
    assert k.nngp.dtype == torch.float32
    assert rel_err(k.nngp, ref["nngp_12"]) < 1e-5
    assert rel_err(k.ntk, ref["ntk_12"]) < 1e-5


# NT 0.6.5 (float64) on RandomState(1).randn(3, 8, 8, 3) (NHWC), the same architectures written in NT's stax:
# Myrtle-5 ([:3]), CNTK-V depth 3 ([:, :6, :6]), WRN with 2 blocks per group ([:2]). Entries are (nngp, ntk).
NT_ARCH = {
    "myrtle5": [
        [
            [0.1078510023071461, 0.12183816459800872, 0.12777672268110576],
            [0.12183816459800877, 0.14320400749370293, 0.14686347784270448],
            [0.12777672268110576, 0.1468634778427045, 0.15693639754715835],
        ],
        [
            [0.2538199757006655, 0.2593821542654594, 0.27469379741413036],
            [0.2593821542654594, 0.33613871406504414, 0.31314055911093974],
            [0.2746937974141303, 0.3131405591109398, 0.3708241677403535],
        ],
    ],
    "cntk_v3": [
        [
            [0.388105898615157, 0.2935247055981072, 0.3035102424027661],
            [0.2935247055981072, 0.6286522641874561, 0.3853296194054653],
            [0.3035102424027661, 0.3853296194054653, 0.6245675038026485],
        ],
        [
            [1.5524235934997113, 0.5140528238289823, 0.5589923284426485],
            [0.5140528238289823, 2.514609052267452, 0.6992357896575605],
            [0.5589923284426485, 0.6992357896575605, 2.4982700148952874],
        ],
    ],
    "wrn2": [
        [[0.3010631961845383, 0.1797536729737272], [0.17975367297372724, 0.4054639147202076]],
        [[1.6342021696843052, 0.6686099121289444], [0.6686099121289444, 2.2021838332651904]],
    ],
}


@pytest.mark.parametrize("name", sorted(NT_ARCH))
def test_architectures_match_nt(name):
    x = nchw(np.random.RandomState(1).randn(3, 8, 8, 3))
    net, xx = {
        "myrtle5": (myrtle(5), x),
        "cntk_v3": (cntk(3, "flatten"), x[:, :, :6, :6]),
        "wrn2": (wide_resnet(2), x[:2]),
    }[name]
    k = net.kernel_fn(xx)
    nngp, ntk = (np.array(a) for a in NT_ARCH[name])
    assert rel_err(k.nngp, nngp) < 1e-10
    assert rel_err(k.ntk, ntk) < (1e-5 if name == "cntk_v3" else 1e-10)  # NT's arccos round-off on the diagonal


# ---------------------------------------------------------------------------------------------------
# the window rules against brute-force loops
# ---------------------------------------------------------------------------------------------------
def _brute(K, f, s, pads, circular, n_out, joint):
    """Brute-force window sum of a (n, n, n, n) covariance over 2 spatial axes (a, a', b, b'): joint shifts
    (convolution, divided by |F|) or independent shifts on each side (sum pooling)."""
    n = K.shape[0]

    def idx(y, d, axis):
        i = s[axis] * y + d - pads[axis]
        if circular:
            return i % n
        return i if 0 <= i < n else None

    out = np.zeros((n_out[0],) * 2 + (n_out[1],) * 2)
    for ya, yp, yb, yq in itertools.product(range(n_out[0]), range(n_out[0]), range(n_out[1]), range(n_out[1])):
        acc = 0.0
        for da, db in itertools.product(range(f[0]), range(f[1])):
            shifts = [(da, da, db, db)] if joint else [(da, ea, db, eb) for ea in range(f[0]) for eb in range(f[1])]
            for d1, d2, d3, d4 in shifts:
                i, ip, j, jq = idx(ya, d1, 0), idx(yp, d2, 0), idx(yb, d3, 1), idx(yq, d4, 1)
                if None not in (i, ip, j, jq):
                    acc += K[i, ip, j, jq]
        out[ya, yp, yb, yq] = acc / (f[0] * f[1]) if joint else acc
    return out


CONV_CONFIGS = [  # (size, kernel, strides, padding, padding_mode)
    (5, (3, 3), (1, 1), "SAME", "zeros"),
    (6, (3, 2), (1, 2), "SAME", "zeros"),
    (6, (2, 2), (1, 1), "SAME", "zeros"),
    (5, (3, 3), (2, 2), "VALID", "zeros"),
    (6, (4, 3), (1, 1), "VALID", "zeros"),
    (5, (3, 3), (1, 1), "CIRCULAR", "zeros"),
    (6, (2, 3), (2, 1), "CIRCULAR", "zeros"),
    (5, (3, 3), (2, 1), (1, 2), "zeros"),
    (4, (3, 2), (1, 1), (2, 1), "circular"),
]


@pytest.mark.parametrize("size,ks,st,pad,mode", CONV_CONFIGS)
def test_conv_rule_brute_force(size, ks, st, pad, mode):
    """Full and diagonal conv rules = explicit loops over joint shifts of the input covariance."""
    x1, x2 = _img(2, size=(size, size)), _img(3, size=(size, size), seed=1)
    k0 = kernel_from_inputs(x1, x2, diagonal_spatial=False)
    layer = nk.Conv(4, ks, strides=st, padding=pad, W_std=1.3, b_std=0.2, padding_mode=mode)
    k = layer.kernel(k0)
    wins = plan_windows((size, size), ks, st, pad, mode, "t")
    circular = pad == "CIRCULAR" or mode == "circular"
    pads = [w.lo for w in wins]
    n_out = [w.n_out for w in wins]
    for i, j in [(0, 0), (1, 2)]:
        want = 1.3**2 * _brute(k0.nngp[i, j].numpy(), ks, st, pads, circular, n_out, True) + 0.2**2
        assert np.abs(k.nngp[i, j].numpy() - want).max() < 1e-12
    # NTK (inputs carry Θ = 0): Θ' = K'
    assert torch.equal(k.ntk, k.nngp)
    # the diagonal-spatial rule gives the same same-pixel covariances
    kd = layer.kernel(kernel_from_inputs(x1, x2, diagonal_spatial=True))
    diag = torch.diagonal(torch.diagonal(k.nngp, dim1=2, dim2=3), dim1=2, dim2=3)  # (N1, N2, a, b)
    assert rel_err(kd.nngp, diag) < 1e-13


@pytest.mark.parametrize(
    "size,ks,diag", [(24, (3, 3), False), (23, (5, 2), False), (9, (3, 3, 2), True), (5, (2, 3, 3), False)]
)
def test_masked_offset_path_equals_strided_views(size, ks, diag, monkeypatch):
    """The stride-1 SAME fast path (flat offsets + masks; long-row and grouped-row variants) equals the plain
    strided-view implementation (itself checked against loops above)."""
    import ntkit.layers.conv as conv_mod

    shape = (size,) * len(ks)
    x1, x2 = _img(1, size=shape), _img(2, size=shape, seed=1)
    k0 = kernel_from_inputs(x1, x2, diagonal_spatial=diag)
    layer = nk.Conv(4, ks, padding="SAME", W_std=1.1, b_std=0.1)
    fast = layer.kernel(nk.Relu().kernel(layer.kernel(k0)))
    monkeypatch.setattr(conv_mod, "FAST_SAME", False)
    slow = layer.kernel(nk.Relu().kernel(layer.kernel(k0)))
    for name in ("nngp", "ntk", "cov1", "cov2"):
        assert rel_err(getattr(fast, name), getattr(slow, name)) < 1e-14


@pytest.mark.parametrize(
    "pool,ws,st,pad",
    [
        ("avg", (2, 2), (2, 2), "VALID"),
        ("avg", (3, 2), (1, 2), "SAME"),
        ("sum", (2, 2), (1, 1), "SAME"),
        ("sum", (3, 3), (2, 2), "CIRCULAR"),
        ("avg", (3, 3), (2, 2), 1),
    ],
)
def test_pool_rule_brute_force(pool, ws, st, pad):
    x1 = _img(2, size=(5, 5))
    k0 = kernel_from_inputs(x1, None, diagonal_spatial=False)
    layer = (nk.AvgPool if pool == "avg" else nk.SumPool)(ws, st, pad)
    k = layer.kernel(k0)
    wins = plan_windows((5, 5), ws, st, pad, "zeros", "t")
    want = _brute(
        k0.nngp[0, 1].numpy(), ws, st, [w.lo for w in wins], pad == "CIRCULAR", [w.n_out for w in wins], False
    )
    if pool == "avg":
        want = want / (ws[0] * ws[1]) ** 2
    assert np.abs(k.nngp[0, 1].numpy() - want).max() < 1e-12
    # cov1 follows the same rule
    assert rel_err(k.cov1[1], k.nngp[1, 1]) < 1e-14


def test_avgpool_normalize_edges():
    """normalize_edges=True divides each window by its number of real pixels (torch count_include_pad=False)."""
    x = _img(2, c=3, size=(5, 5))
    net = nk.serial(nk.AvgPool((3, 3), (2, 2), "SAME", normalize_edges=True), nk.Flatten())
    k = net.kernel_fn(x, None, "nngp")
    y = torch.nn.functional.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)  # SAME = 1+1 here
    assert rel_err(k, (y.flatten(1) @ y.flatten(1).T) / y[0].numel()) < 1e-13


# ---------------------------------------------------------------------------------------------------
# closed forms and equivalences
# ---------------------------------------------------------------------------------------------------
def test_linear_conv_net_closed_form():
    """No nonlinearity: Flatten of a conv net = linear maps of the input, written out with torch convs."""
    x = _img(3, c=2, size=(5, 5))
    W1, b1 = 1.2, 0.3
    k = nk.serial(nk.Conv(8, (3, 3), padding="SAME", W_std=W1, b_std=b1), nk.Flatten()).kernel_fn(x)
    # K[y,y'] of Conv = W²/(C|F|) Σ_{c,d} x[c,y+d] x'[c,y'+d] + b² ; Flatten averages y = y'
    patches = torch.nn.functional.unfold(x, 3, padding=1)  # (N, C·9, P)
    want = W1**2 * torch.einsum("ikp,jkp->ij", patches, patches) / (2 * 9 * 25) + b1**2
    assert rel_err(k.nngp, want) < 1e-13
    assert rel_err(k.ntk, want) < 1e-13


def test_conv_1x1_is_dense():
    x1, x2 = _img(3), _img(2, seed=3)
    a = nk.serial(
        nk.Conv(8, (1, 1), W_std=1.5, b_std=0.1), nk.Relu(), nk.Conv(8, (1, 1), W_std=1.2), nk.AvgPool((2, 2), (2, 2))
    )
    b = nk.serial(nk.Dense(8, 1.5, 0.1), nk.Relu(), nk.Dense(8, 1.2), nk.AvgPool((2, 2), (2, 2)))
    ka, kb = a.kernel_fn(x1, x2), b.kernel_fn(x1, x2)
    assert rel_err(ka.nngp, kb.nngp) < 1e-14 and rel_err(ka.ntk, kb.ntk) < 1e-14


def test_standard_parameterisation_fan_in():
    """Standard parameterisation: Θ' = C|F|·T(K) + W²·T(Θ) + 1 (fan-in includes the filter)."""
    x = _img(2, c=3, size=(4, 4))
    k0 = kernel_from_inputs(x, None, diagonal_spatial=True)
    ntk_layer = nk.Conv(5, (3, 3), padding="SAME", W_std=1.4, b_std=0.5)
    std_layer = nk.Conv(5, (3, 3), padding="SAME", W_std=1.4, b_std=0.5, parameterization="standard")
    kn, ks = ntk_layer.kernel(k0), std_layer.kernel(k0)
    assert rel_err(kn.nngp, ks.nngp) < 1e-15
    mean = (kn.nngp - 0.25) / 1.4**2  # T(K)
    assert rel_err(ks.ntk, 3 * 9 * mean + 1.0) < 1e-14
    r = nk.Relu().kernel(ks)
    k2 = std_layer.kernel(r)  # second layer: C = 5
    unit = nk.Conv(5, (3, 3), padding="SAME").kernel(r)  # nngp: T(K), ntk: T(Θ) + T(K)
    assert rel_err(k2.ntk, 5 * 9 * unit.nngp + 1.4**2 * (unit.ntk - unit.nngp) + 1) < 1e-13


def test_full_and_diagonal_paths_agree():
    """A net without pooling computed on diagonal covariances equals the same net tracking the full
    covariance (an AvgPool of window 1 forces it), for strides, every padding and a bias."""
    x1, x2 = _img(3, size=(7, 7)), _img(2, size=(7, 7), seed=5)
    body = [
        nk.Conv(8, (3, 3), padding="CIRCULAR", b_std=0.2),
        nk.Erf(),
        nk.Conv(8, (2, 3), strides=(2, 1), padding="SAME"),
        nk.Relu(),
        nk.Conv(8, (3, 3), padding="VALID", W_std=1.3),
    ]
    diag = nk.serial(*body, nk.Flatten(), nk.Dense(1))
    full = nk.serial(*body, nk.AvgPool((1, 1)), nk.Flatten(), nk.Dense(1))
    assert not diag.requires_full_spatial() and full.requires_full_spatial()
    for a, b in [(diag.kernel_fn(x1, x2), full.kernel_fn(x1, x2)), (diag.kernel_fn(x1), full.kernel_fn(x1))]:
        assert rel_err(a.nngp, b.nngp) < 1e-13 and rel_err(a.ntk, b.ntk) < 1e-13


def test_global_pools_and_flatten():
    x = _img(3, size=(4, 4))
    conv = [nk.Conv(8, (3, 3), padding="SAME"), nk.Relu()]
    gap = nk.serial(*conv, nk.GlobalAvgPool()).kernel_fn(x)
    same = nk.serial(*conv, nk.AvgPool((4, 4)), nk.Flatten()).kernel_fn(x)
    gsp = nk.serial(*conv, nk.GlobalSumPool()).kernel_fn(x)
    assert rel_err(gap.nngp, same.nngp) < 1e-14 and rel_err(gap.ntk, same.ntk) < 1e-14
    assert rel_err(gsp.nngp, 16**2 * gap.nngp) < 1e-14
    # SumPool = AvgPool · w² per spatial axis pair
    s = nk.serial(*conv, nk.SumPool((2, 2), (2, 2)), nk.Flatten()).kernel_fn(x)
    a = nk.serial(*conv, nk.AvgPool((2, 2), (2, 2)), nk.Flatten()).kernel_fn(x)
    assert rel_err(s.nngp, 16 * a.nngp) < 1e-14
    # Flatten of a diagonal kernel = mean over pixels of the same-pixel covariance
    k = nk.serial(*conv).kernel_fn(x)
    f = nk.serial(*conv, nk.Flatten()).kernel_fn(x)
    assert k.nngp.shape == (3, 3, 4, 4)  # NT: spatial axes kept when no readout
    assert rel_err(f.nngp, k.nngp.mean((2, 3))) < 1e-15
    assert f.shape1 == (3, 8 * 16)


def test_flatten_on_fc_is_identity():
    x = torch.randn(4, 5, dtype=F64)
    a = nk.serial(nk.Dense(8), nk.Relu(), nk.Dense(3)).kernel_fn(x)
    b = nk.serial(nk.Flatten(), nk.Dense(8), nk.Relu(), nk.Flatten(), nk.Dense(3)).kernel_fn(x)
    assert torch.equal(a.nngp, b.nngp) and torch.equal(a.ntk, b.ntk)
    assert isinstance(nk.serial(nk.Flatten(), nk.Dense(2)).module(5)[0], torch.nn.Flatten)


def test_conv_1d_and_3d():
    """1-D and 3-D convolutions against 2-D ones on inputs with a singleton axis."""
    x = _img(3, c=2, size=(6,))
    k1 = nk.serial(nk.Conv(4, (3,), padding="SAME"), nk.Relu(), nk.AvgPool((2,), (2,)), nk.Flatten()).kernel_fn(x)
    k2 = nk.serial(nk.Conv(4, (3, 1), padding="SAME"), nk.Relu(), nk.AvgPool((2, 1), (2, 1)), nk.Flatten()).kernel_fn(
        x[..., None]
    )
    k3 = nk.serial(
        nk.Conv(4, (3, 1, 1), padding="SAME"), nk.Relu(), nk.AvgPool((2, 1, 1), (2, 1, 1)), nk.Flatten()
    ).kernel_fn(x[..., None, None])
    assert rel_err(k1.nngp, k2.nngp) < 1e-14 and rel_err(k1.ntk, k3.ntk) < 1e-14
    v = _img(2, c=1, size=(3, 4, 3))
    k = nk.serial(nk.Conv(4, (2, 3, 2), strides=(1, 2, 1), padding="SAME"), nk.Relu(), nk.GlobalAvgPool()).kernel_fn(v)
    assert k.nngp.shape == (2, 2) and bool(torch.isfinite(k.ntk).all())


def test_dtype_float32_and_symmetry():
    x = _img(5, size=(5, 5), dtype=torch.float32)
    net = myrtle(5)
    k = net.kernel_fn(x)
    assert k.ntk.dtype == torch.float32 and rel_err(k.ntk, k.ntk.T) < 1e-6
    k64 = net.kernel_fn(x.double())
    assert rel_err(k.ntk, k64.ntk) < 1e-5
    # tiles give the same numbers as one block, also when pixel-pair axes are left in the output
    kt = net.kernel_fn(x.double(), tile_size=2)
    assert rel_err(kt.ntk, k64.ntk) < 1e-14
    spatial = nk.serial(nk.Conv(4, (3, 3), padding="SAME"), nk.Relu(), nk.AvgPool((2, 2), (1, 1)))
    a, b = spatial.kernel_fn(x.double()), spatial.kernel_fn(x.double(), tile_size=2)
    assert a.ntk.shape == (5, 5, 4, 4, 4, 4) and rel_err(a.ntk, b.ntk) < 1e-14 and rel_err(a.cov1, b.cov1) < 1e-14


# ---------------------------------------------------------------------------------------------------
# every elementwise layer on spatial kernels
# ---------------------------------------------------------------------------------------------------
SPATIAL_ACTS = [
    nk.Relu(),
    nk.LeakyRelu(0.1),
    nk.Abs(),
    nk.Erf(),
    nk.Gelu(),
    nk.Sin(),
    nk.Cos(),
    nk.Rbf(0.5),
    nk.Gaussian(),
    nk.Exp(a=1.0, b=0.5),
    nk.Sign(),
    nk.Sigmoid_like(),
    nk.Monomial(2),
    nk.RectifiedMonomial(2),
    nk.Polynomial([0.5, -1.0, 0.25]),
    nk.Elementwise(torch.tanh, deg=12),
]


@pytest.mark.parametrize("act", SPATIAL_ACTS, ids=lambda a: type(a).__name__)
def test_elementwise_on_full_spatial_kernels(act):
    """On a full pixel-pixel covariance, entry (i, j, a, a') of an elementwise rule is the FC rule on
    (K[i,j,a,a'], K[i,i,a,a], K[j,j,a',a']): compare with the same kernel re-read as an FC kernel between
    the N1·P and N2·P (sample, pixel) points."""
    x1, x2 = _img(2, size=(3, 3)), _img(3, size=(3, 3), seed=7)
    k = nk.Conv(4, (2, 2), padding="SAME", b_std=0.1).kernel(kernel_from_inputs(x1, x2, diagonal_spatial=False))
    out = act.kernel(k)

    def to_fc(t):  # (N1, N2, a, a', b, b') -> (N1·a·b, N2·a'·b')
        return t.permute(0, 2, 4, 1, 3, 5).reshape(2 * 9, 3 * 9)

    def diag(c):  # (N, a, a', b, b') -> (N·a·b,)
        return torch.diagonal(torch.diagonal(c, dim1=1, dim2=2), dim1=1, dim2=2).reshape(-1)

    fc = Kernel(
        nngp=to_fc(k.nngp),
        ntk=to_fc(k.ntk),
        cov1=diag(k.cov1),
        cov2=diag(k.cov2),
        shape1=(18, 4),
        shape2=(27, 4),
        diagonal_spatial=True,
        is_gaussian=True,
        is_input=False,
    )
    ref = act.kernel(fc)

    def close(a, b):
        return float((a - b).abs().max()) <= 1e-12 * max(1.0, float(b.abs().max()))

    assert close(to_fc(out.nngp), ref.nngp) and close(to_fc(out.ntk), ref.ntk)
    assert close(diag(out.cov1), ref.cov1) and close(diag(out.cov2), ref.cov2)
    # the diagonal-spatial path gives the same same-pixel entries
    kd = act.kernel(nk.Conv(4, (2, 2), padding="SAME", b_std=0.1).kernel(kernel_from_inputs(x1, x2)))
    same = torch.diagonal(torch.diagonal(out.nngp, dim1=2, dim2=3), dim1=2, dim2=3)
    assert close(kd.nngp, same)


# ---------------------------------------------------------------------------------------------------
# finite twins
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding,mode", [(1, "zeros"), ((2, 1), "zeros"), (1, "circular")])
def test_conv_twin_matches_torch_conv(padding, mode):
    x = _img(2, c=3, size=(6, 5), dtype=torch.float32)
    layer = nk.Conv(
        4, (3, 3), strides=(2, 1), padding=padding, parameterization="standard", b_std=0.5, padding_mode=mode
    )
    mod, shape = layer.build((3, 6, 5), None, torch.Generator().manual_seed(0), True)
    mod = mod.float()  # twins are drawn in float64 (layers.base.gaussian); Net.module casts them
    ref = torch.nn.Conv2d(3, 4, 3, stride=(2, 1), padding=padding, padding_mode=mode)
    with torch.no_grad():
        ref.weight.copy_(mod.weight)
        ref.bias.copy_(mod.bias)
        assert torch.allclose(mod(x), ref(x), atol=1e-6)
    assert mod(x).shape[1:] == shape


def test_same_padding_is_lax_convention():
    """SAME puts the extra pixel of odd total padding at the end (NT / lax), unlike torch's symmetric padding."""
    w = plan_windows((6,), (2,), (1,), "SAME", "zeros", "t")[0]
    assert (w.lo, w.hi, w.n_out) == (0, 1, 6)
    w = plan_windows((5,), (3,), (2,), "SAME", "zeros", "t")[0]
    assert (w.lo, w.hi, w.n_out) == (1, 1, 3)
    w = plan_windows((6,), (3,), (2,), "SAME", "zeros", "t")[0]
    assert (w.lo, w.hi, w.n_out) == (0, 1, 3)


@pytest.mark.parametrize(
    "net",
    [myrtle(7), cntk(2, "gap"), cntk(2, "flatten"), wide_resnet(1, 1)],
    ids=["myrtle7", "cntk_gap", "cntk_v", "wrn"],
)
def test_architecture_twins_run(net):
    x = _img(2, c=3, size=(8, 8), dtype=torch.float32)
    m = net.module((3, 8, 8), width=8, seed=0)
    out = m(x)
    assert out.shape[0] == 2 and out.dim() == 2 and bool(torch.isfinite(out).all())


def test_architecture_arguments():
    with pytest.raises(ValueError, match="depth"):
        myrtle(6)
    with pytest.raises(ValueError, match="pooling"):
        cntk(3, "max")
    with pytest.raises(ValueError, match="depth"):
        cntk(0)
    assert len([l for l in myrtle(10).layers if isinstance(l, nk.Conv)]) == 9


# ---------------------------------------------------------------------------------------------------
# bad input: one clear error each
# ---------------------------------------------------------------------------------------------------
def test_errors_wrong_spatial_rank():
    net = nk.serial(nk.Conv(4, (3, 3)), nk.Relu(), nk.Flatten(), nk.Dense(1))
    with pytest.raises(LayerError, match="4-D inputs"):
        net.kernel_fn(_img(2, size=(6,)))
    with pytest.raises(LayerError, match=r"2-D and needs activations \(N, C, H, W\)"):
        nk.Conv(4, (3, 3)).kernel(kernel_from_inputs(_img(2, size=(6,))))
    with pytest.raises(LayerError, match="4-D inputs"):
        nk.serial(nk.Dense(3), nk.AvgPool((2, 2))).kernel_fn(torch.randn(3, 4, dtype=F64))
    with pytest.raises(LayerError, match="input has none"):
        nk.GlobalAvgPool().kernel(kernel_from_inputs(torch.randn(3, 4, dtype=F64)))
    with pytest.raises(LayerError, match="1-D"):
        nk.serial(nk.Dense(3), nk.Conv(4, 3)).kernel_fn(torch.randn(3, 4, dtype=F64))


def test_errors_window_too_large_and_empty_pool():
    with pytest.raises(LayerError, match=r"larger than the input's spatial shape \(4, 4\) with padding='VALID'"):
        nk.serial(nk.Conv(4, (5, 5))).kernel_fn(_img(2, size=(4, 4)))
    with pytest.raises(LayerError, match="empty"):
        nk.serial(nk.Conv(4, (3, 3)), nk.AvgPool((5, 5), padding=1)).kernel_fn(_img(2, size=(4, 4)))
    with pytest.raises(LayerError, match="larger than"):
        nk.serial(nk.Conv(4, (3, 3)), nk.AvgPool((3, 3), (2, 2))).kernel_fn(_img(2, size=(4, 4)))
    with pytest.raises(LayerError, match="larger than"):
        myrtle(5).module((3, 2, 2))


def test_errors_channels_and_arguments():
    net = nk.serial(nk.Conv(4, (3, 3), in_channels=3), nk.Relu())
    with pytest.raises(LayerError, match="in_channels=3.*2 channels"):
        net.kernel_fn(_img(2, c=2))
    with pytest.raises(LayerError, match="in_channels=3"):
        net.module((2, 6, 6))
    net.module((2, 6, 6), width=5)  # hidden widths overridden: no check
    with pytest.raises(ValueError, match="padding='FULL'"):
        nk.Conv(4, (3, 3), padding="FULL")
    with pytest.raises(ValueError, match="kernel_size"):
        nk.Conv(4, (0, 3))
    with pytest.raises(ValueError, match="different lengths"):
        nk.Conv(4, (3, 3), strides=(1, 1, 1))
    with pytest.raises(ValueError, match="padding_mode"):
        nk.Conv(4, (3, 3), padding=1, padding_mode="reflect")


def test_errors_pool_on_diagonal_kernel_and_nonlinearity_after_flatten():
    k = kernel_from_inputs(_img(2), None, diagonal_spatial=True)
    with pytest.raises(LayerError, match="full pixel-pixel covariance"):
        nk.AvgPool((2, 2)).kernel(k)
    with pytest.raises(LayerError, match="full pixel-pixel covariance"):
        nk.GlobalAvgPool().kernel(k)
    with pytest.raises(LayerError, match="Gaussian"):
        nk.serial(nk.Conv(4, (3, 3)), nk.Flatten(), nk.Relu()).kernel_fn(_img(2))


# ---------------------------------------------------------------------------------------------------
# tiles with full pixel covariances: self-covariances propagated once per block (the tape)
# ---------------------------------------------------------------------------------------------------
def _tape_counts(monkeypatch):
    import ntkit.nets.tiler as nets

    calls = {"record": 0, "replay": 0}
    orig = nets.Tape.step

    def step(self, out):
        calls["replay" if self.replay is not None else "record"] += 1
        return orig(self, out)

    monkeypatch.setattr(nets.Tape, "step", step)
    return calls


TAPE_NETS = {
    "myrtle5": lambda: myrtle(5),
    "residual+norm+prod": lambda: nk.serial(
        nk.Conv(8, (3, 3), padding="SAME"),
        nk.FanOut(2),
        nk.parallel(nk.serial(nk.Relu(), nk.Conv(8, (3, 3), padding="SAME")), nk.Identity()),
        nk.FanInSum(),
        nk.LayerNorm(axis=(1, 2, 3)),
        nk.Erf(),
        nk.AvgPool((2, 2), (2, 2)),
        nk.Conv(4, (3, 3), padding="CIRCULAR", b_std=0.3),
        nk.FanOut(2),
        # independent branches (the product rule's premise; relu(h)·gelu(h) of one h is refused)
        nk.parallel(nk.Relu(), nk.serial(nk.Conv(4, (3, 3), padding="SAME"), nk.Gelu())),
        nk.FanInProd(),
        nk.Conv(4, (2, 2)),
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(3),
    ),
    "concat+stride+flatten-after-pool": lambda: nk.serial(
        nk.Conv(8, (3, 3), padding="SAME"),
        nk.FanOut(2),
        nk.parallel(nk.Relu(), nk.Erf()),
        nk.FanInConcat(),
        nk.Conv(8, (3, 3), strides=2),
        nk.Relu(),
        nk.AvgPool((2, 2), (1, 1)),
        nk.Flatten(),
        nk.Dense(2),
    ),
}


@pytest.mark.parametrize("name", sorted(TAPE_NETS))
@pytest.mark.parametrize("tile", [1, 2])
def test_tiles_with_tape_equal_one_block(name, tile, monkeypatch):
    """Pair-only off-diagonal tiles that replay recorded variances give the one-block kernels (x2 None and
    given), cov1/cov2 included; and the tape really is used (every off-diagonal tile replays)."""
    net = TAPE_NETS[name]()
    x, x2 = _img(5, c=3, size=(6, 6)), _img(9, c=3, size=(6, 6), seed=1)
    calls = _tape_counts(monkeypatch)
    for b in (None, x2):
        ref = net.kernel_fn(x, b, tile_size=100)
        assert calls == {"record": 0, "replay": 0}  # one block: no tiles, no tape
        got = net.kernel_fn(x, b, tile_size=tile)
        for g in ("nngp", "ntk", "cov1") + (("cov2",) if b is not None else ()):
            assert rel_err(getattr(got, g), getattr(ref, g)) < 1e-14, (g, b is None)
        assert calls["record"] > 0 and calls["replay"] > 0
        calls.update(record=0, replay=0)


def test_tape_1d_and_float32(monkeypatch):
    net = nk.serial(
        nk.Conv(4, (3,), padding="SAME"),
        nk.Relu(),
        nk.AvgPool((2,), (2,)),
        nk.Conv(4, (3,)),
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(1),
    )
    x = torch.randn(6, 2, 10, generator=torch.Generator().manual_seed(3), dtype=F64)
    calls = _tape_counts(monkeypatch)
    assert rel_err(net.kernel_fn(x, x[:3] + 0.1, tile_size=1).ntk, net.kernel_fn(x, x[:3] + 0.1).ntk) < 1e-14
    k32 = net.kernel_fn(x.float(), tile_size=2)
    assert k32.ntk.dtype == torch.float32 and rel_err(k32.ntk, net.kernel_fn(x).ntk) < 1e-5
    assert calls["replay"] > 0


def test_tape_only_where_it_pays(monkeypatch):
    """Diagonal-pixel nets (CNTK-V, FC) never tape; x2 given with few samples per side does not either."""
    from ntkit.nets.tiler import tape_pays as _tape_pays

    assert _tape_pays(10, None, 1) and not _tape_pays(4, None, 4)
    assert _tape_pays(200, 200, 8) and not _tape_pays(50, 50, 8) and not _tape_pays(3, 3, 2)
    calls = _tape_counts(monkeypatch)
    x = _img(4, c=3, size=(5, 5))
    cntk(2, pooling="flatten").kernel_fn(x, tile_size=1)
    nk.serial(nk.Dense(4), nk.Relu()).kernel_fn(x.reshape(4, -1), tile_size=1)
    assert calls == {"record": 0, "replay": 0}


def test_pair_only_record():
    x, x2 = _img(2, c=3, size=(4, 4)), _img(3, c=3, size=(4, 4), seed=2)
    k = kernel_from_inputs(x, x2, diagonal_spatial=False, pair_only=True)
    full = kernel_from_inputs(x, x2, diagonal_spatial=False)
    assert k.pair_only and k.cov1 is None and k.cov2 is None and k.dtype == F64
    for a, b in zip(k.variances(), full.variances()):
        assert rel_err(a, b) < 1e-15
    with pytest.raises(ValueError, match="needs x2"):
        kernel_from_inputs(x, None, pair_only=True)
