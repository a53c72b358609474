"""lift: nn.Sequential -> ntkit net; its kernels are those of the very torch model (standard parameterisation)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from torch import nn
from torch.func import functional_call, jacrev

import ntkit as nt
from ntkit.lift import LiftError, lift


def _x(n, d, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lift_equals_hand_built_net():
    model = nn.Sequential(nn.Linear(5, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.GELU()), nn.Linear(32, 3))
    net = lift(model)
    s3 = math.sqrt(1 / 3)
    # the infinite-width limit of PyTorch's init (issue #15): hidden biases (variance 1/(3·fan_in) -> 0) vanish,
    # the first layer's (fixed fan-in) stays
    hand = nt.serial(
        nt.Dense(64, s3, math.sqrt(1 / 15), "standard"),
        nt.Relu(),
        nt.Dense(32, s3, 0.0, "standard"),
        nt.Gelu(),
        nt.Dense(3, s3, 0.0, "standard"),
    )
    x1, x2 = _x(6, 5), _x(4, 5, 1)
    a, b = net.kernel_fn(x1, x2), hand.kernel_fn(x1, x2)
    assert rel_err(a.nngp, b.nngp) < 1e-14 and rel_err(a.ntk, b.ntk) < 1e-14


def test_lift_options_and_activations():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 8, bias=False),
        nn.Tanh(),
        nn.Linear(8, 8),
        nn.SiLU(),
        nn.Linear(8, 8),
        nn.Sigmoid(),
        nn.Linear(8, 8),
        nn.LeakyReLU(0.2),
        nn.Identity(),
        nn.Linear(8, 1),
    )
    net = lift(model, W_std=1.5, b_std=0.1, parameterization="ntk")
    dense = [l for l in net.layers if isinstance(l, nt.Dense)]
    assert dense[0].b_std is None and dense[1].b_std == 0.1 and all(d.W_std == 1.5 for d in dense)
    assert all(d.parameterization == "ntk" for d in dense)
    k = net.kernel_fn(_x(5, 4))
    assert torch.isfinite(k.ntk).all()
    emp = lift(nn.Sequential(nn.Linear(200, 300)), W_std="empirical", b_std="empirical").layers[0]
    assert abs(emp.W_std - math.sqrt(1 / 3)) < 0.02 and abs(emp.b_std - math.sqrt(1 / 600)) < 0.01


def test_lift_errors_list_supported_modules():
    with pytest.raises(LiftError, match="supported module .*Linear"):
        lift(nn.Sequential(nn.Linear(3, 3), nn.Upsample(scale_factor=2)))
    with pytest.raises(LiftError, match="empirical_ntk"):
        lift(nn.TransformerEncoderLayer(8, 2))
    with pytest.raises(TypeError):
        lift("not a module")


def test_lifted_kernels_match_the_torch_model_monte_carlo():
    """Average over freshly initialised torch models (PyTorch's own init) of f(x)f(x') and of the empirical NTK
    (summed over parameters, as torch's gradients define it) converges to the lifted NNGP and NTK.

    Standard errors: the NNGP average has 200 models x 32 outputs (about 2.5% relative); the NTK concentrates
    with width (about 1/sqrt(256) per model, averaged over 6 models)."""
    # inputs of scale 5: the finite hidden biases (variance 1/(3·width), absent from the limit, #15) are small
    # next to the kernel
    x = 5 * _x(3, 6, 2)
    width, outs = 256, 32
    make = lambda: nn.Sequential(
        nn.Linear(6, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outs)
    ).double()
    k = lift(make()).kernel_fn(x)
    torch.manual_seed(0)
    with torch.no_grad():
        f = torch.stack([make()(x) for _ in range(200)])  # (S, N, O)
    nngp = torch.einsum("sio,sjo->ij", f, f) / (f.shape[0] * outs)
    ntk = torch.zeros(3, 3, dtype=torch.float64)
    for _ in range(6):
        m = make()
        params = {n: p.detach() for n, p in m.named_parameters()}
        jac = jacrev(lambda p: functional_call(m, p, (x,)))(params)
        j = torch.cat([v.reshape(3, outs, -1) for v in jac.values()], dim=-1)  # (N, O, P)
        ntk += torch.einsum("iop,jop->ij", j, j) / outs  # mean over outputs
    ntk /= 6
    print("lift MC errors", rel_err(nngp, k.nngp), rel_err(ntk, k.ntk))
    assert rel_err(nngp, k.nngp) < 0.08
    assert rel_err(ntk, k.ntk) < 0.08


# --- convolutions and pooling ----------------------------------------------------------------------------
def _img(n, c, h, w, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_lift_cnn_equals_hand_built_net():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 8, (3, 2), stride=(1, 2), padding="valid", bias=False),  # hidden biases vanish (#15)
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    s3 = math.sqrt(1 / 3)
    hand = nt.serial(
        nt.Conv(16, (3, 3), (1, 1), (1, 1), s3, math.sqrt(1 / 81), "standard"),
        nt.Relu(),
        nt.AvgPool((2, 2), (2, 2)),
        nt.Conv(8, (3, 2), (1, 2), "VALID", s3, None, "standard"),
        nt.Relu(),
        nt.GlobalAvgPool(),
        nt.Flatten(),
        nt.Dense(4, s3, 0.0, "standard"),
    )
    x1, x2 = _img(3, 3, 8, 8), _img(2, 3, 8, 8, 1)
    a, b = lift(model).kernel_fn(x1, x2), hand.kernel_fn(x1, x2)
    assert rel_err(a.nngp, b.nngp) < 1e-14 and rel_err(a.ntk, b.ntk) < 1e-14
    # conv1d / 3d, 'same' padding, circular mode and a padded average pool map too
    m1 = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding="same", padding_mode="circular"),
        nn.ReLU(),
        nn.AvgPool1d(3, stride=1, padding=1, count_include_pad=False),
        nn.Flatten(),
        nn.Linear(28, 1),
    )
    k1 = lift(m1).kernel_fn(torch.randn(3, 2, 7, dtype=torch.float64))
    assert torch.isfinite(k1.ntk).all() and k1.ntk.shape == (3, 3)
    m3 = nn.Sequential(nn.Conv3d(1, 4, 2), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 1))
    k3 = lift(m3).kernel_fn(torch.randn(2, 1, 3, 3, 3, dtype=torch.float64))
    assert torch.isfinite(k3.nngp).all() and k3.nngp.shape == (2, 2)


def test_lift_cnn_errors_name_the_fix():
    for bad, msg in (
        (nn.Conv2d(2, 4, 3, groups=2), "groups=1"),
        (nn.Conv2d(2, 4, 3, dilation=2), "dilation=1"),
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"), "'zeros' or 'circular'"),
        (nn.AdaptiveAvgPool2d(2), "output_size=1"),
        (nn.AvgPool2d(2, ceil_mode=True), "ceil_mode"),
        (nn.Flatten(0), "start_dim=1"),
    ):
        with pytest.raises(LiftError, match=msg):
            lift(nn.Sequential(bad))


def test_lifted_cnn_nngp_matches_the_torch_model_monte_carlo():
    """E[f(x) f(x')] over PyTorch-initialised CNNs (conv, ReLU, avg-pool, global pool) is the lifted NNGP.
    200 models x 16 outputs: standard error about 2.5%; width 128 adds O(1/128)."""
    x = 10 * _img(3, 2, 6, 6, 3)  # scale 10: see the MLP test (finite hidden biases, absent from the limit)
    width, outs = 128, 16
    make = lambda: nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(width, width, 3, padding="same"),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, outs),
    ).double()
    k = lift(make()).kernel_fn(x, get="nngp")
    torch.manual_seed(0)
    with torch.no_grad():
        f = torch.stack([make()(x) for _ in range(200)])
    nngp = torch.einsum("sio,sjo->ij", f, f) / (f.shape[0] * outs)
    err = rel_err(nngp, k)
    print("lifted CNN MC error", err)
    assert err < 0.08
