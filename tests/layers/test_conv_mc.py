"""Monte-Carlo: the conv/pool kernels against wide finite twins (``net.module``).

NNGP: ``E[f(x) f(x')ᵀ] / O`` over seeds and the ``O`` readout units. NTK: the empirical tangent kernel
``Σ_θ ∂f/∂θ(x) ∂f/∂θ(x')`` (one backward pass per output), averaged over outputs and seeds; it concentrates at width
``w`` with relative fluctuations ``O(1/√w)``.

Tolerance: ``max |MC − exact| / max |exact| < 0.1``. Measured Monte-Carlo errors: 2.3–3.6% (NNGP: 48 seeds ×
128 readout units at width 256; mostly variance from the per-seed fluctuation of the hidden kernels) and
2–3% (NTK: 6 seeds at width 128–192). A 10% error in one layer's ``W_std`` moves the kernel by 19% here and is
rejected (tested).
"""

from __future__ import annotations

import pytest
import torch

import ntkit as nk

F64 = torch.float64


def _img(n, c, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, c) + tuple(size), generator=g)


def _mc_nngp(net, x, seeds):
    acc = 0.0
    for s in range(seeds):
        m = net.module(tuple(x.shape[1:]), seed=s)
        with torch.no_grad():
            f = m(x).double()
        acc = acc + f @ f.T / f.shape[1]
    return acc / seeds


def _mc_ntk(net, x, seeds):
    acc = 0.0
    for s in range(seeds):
        m = net.module(tuple(x.shape[1:]), seed=s)
        params = list(m.parameters())
        f = m(x)  # (N, O)
        n, o = f.shape
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[i, j], params, retain_graph=True)])
            for i in range(n)
            for j in range(o)
        ]
        jac = torch.stack(rows).reshape(n, o, -1).double()  # ∂f_j(x_i)/∂θ
        acc = acc + torch.einsum("iop,jop->ij", jac, jac) / o
    return acc / seeds


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


NETS = {  # name -> (readout units o, hidden channels w) -> net
    # no pooling: diagonal covariances; strides, VALID and SAME, a bias
    "flatten_stride_valid": lambda o, w: nk.serial(
        nk.Conv(w, (3, 3), padding="SAME", b_std=0.3),
        nk.Relu(),
        nk.Conv(w, (3, 3), strides=(2, 2), padding="VALID", W_std=1.3),
        nk.Erf(),
        nk.Flatten(),
        nk.Dense(o),
    ),
    # pooling: full covariances; CIRCULAR, SumPool with SAME and stride 1, global pooling
    "circular_sumpool_gap": lambda o, w: nk.serial(
        nk.Conv(w, (3, 3), padding="CIRCULAR"),
        nk.Relu(),
        nk.SumPool((2, 2), strides=(1, 1), padding="SAME"),
        nk.Conv(w, (2, 2), strides=(2, 2), padding="VALID", b_std=0.2),
        nk.Relu(),
        nk.GlobalAvgPool(),
        nk.Dense(o),
    ),
    # explicit padding, AvgPool with stride, standard parameterisation (the NTK depends on w), 1-D
    "standard_1d_avgpool": lambda o, w: nk.serial(
        nk.Conv(w, (3,), padding=1, parameterization="standard", b_std=0.1),
        nk.Relu(),
        nk.AvgPool((2,), (2,)),
        nk.Conv(w, (2,), padding="SAME", parameterization="standard"),
        nk.Relu(),
        nk.Flatten(),
        nk.Dense(o, parameterization="standard"),
    ),
    # 3-D
    "conv3d_gsp": lambda o, w: nk.serial(
        nk.Conv(w, (2, 2, 2), padding="SAME"), nk.Relu(), nk.GlobalSumPool(), nk.Dense(o)
    ),
}
SHAPES = {
    "flatten_stride_valid": (3, 6, 6),
    "circular_sumpool_gap": (2, 5, 5),
    "standard_1d_avgpool": (3, 8),
    "conv3d_gsp": (2, 3, 3, 3),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_nngp_monte_carlo(name):
    x = _img(3, SHAPES[name][0], SHAPES[name][1:], seed=1)
    net = NETS[name]
    mc = _mc_nngp(net(128, 256), x, seeds=48)
    assert _rel(mc, net(1, 256).kernel_fn(x.double(), get="nngp")) < 0.1
    if name == "circular_sumpool_gap":
        # the check has power: the same net with a first-layer W_std off by 10% is rejected (measured 0.19)
        wrong = nk.serial(nk.Conv(8, (3, 3), padding="CIRCULAR", W_std=1.1), *net(1, 8).layers[1:])
        assert _rel(mc, wrong.kernel_fn(x.double(), get="nngp")) > 0.15


@pytest.mark.parametrize("name,width", [("circular_sumpool_gap", 128), ("standard_1d_avgpool", 192)])
def test_ntk_monte_carlo(name, width):
    x = _img(3, SHAPES[name][0], SHAPES[name][1:], seed=2)
    exact = NETS[name](1, width).kernel_fn(x.double(), get="ntk")
    mc = _mc_ntk(NETS[name](2, width), x, seeds=6)
    assert _rel(mc, exact) < 0.1
