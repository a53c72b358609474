"""Chains (issue #17 item 2): ``nn.Sequential`` models of per-sample modules are analysed from their structure
(:func:`~ntkit.empirical.structured.plan_chain`: no probe pass, no hooks) and their cotangents pulled back
module by module for the whole batch. Each model here is compared against ``implementation="jacobian"`` in
float64 (1e-12 relative), traced and untraced, with and without ``x2``, and checked to take the chain path
(not a silent fallback); models outside the chain's scope are checked to fall back to the general path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkit
from ntkit.empirical import empirical_ntk, ntk_implementation
from ntkit.empirical._model import fixed_params, resolve_params
from ntkit.empirical.structured import plan_chain
from ntkit.layers.dense import DenseModule

TOL = 1e-12


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _is_chain(model, x) -> bool:
    p = resolve_params(model, None)
    return plan_chain(model, p, fixed_params(model, p), x) is not None


def _twin_mlp():
    net = ntkit.serial(ntkit.Dense(12, b_std=0.3), ntkit.Relu(), ntkit.Dense(9), ntkit.Erf(), ntkit.Dense(3))
    return net.module(5, seed=0).double().eval()


def _torch_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 11), nn.ReLU(), nn.Sequential(nn.Linear(11, 7), nn.Tanh()), nn.Linear(7, 4)
    ).double()


def _norm_mlp():
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Flatten(), nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Dropout(0.3), nn.Identity(), nn.Linear(8, 3)
        )
        .double()
        .eval()
    )


def _scaled_twin_mlp():
    """Dense twins with the scales the chain's closed-form row pullback folds in: NTK parameterisation with
    ``W_std ≠ 1``, standard parameterisation with ``s_in ≠ 1``."""
    g = torch.Generator().manual_seed(3)
    return nn.Sequential(
        DenseModule(5, 10, 1.7, 0.2, "ntk", g),
        nn.ReLU(),
        DenseModule(10, 8, 1.3, 0.1, "standard", g, s_in=3),
        nn.Tanh(),
        DenseModule(8, 3, 0.8, None, "ntk", g),
    ).double()


CASES = {
    "twin": (_twin_mlp, (7, 5)),
    "torch": (_torch_mlp, (7, 5)),
    "norm": (_norm_mlp, (7, 2, 3)),
    "scaled": (_scaled_twin_mlp, (7, 5)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("trace", [(-1,), ()])
def test_chain_matches_jacobian(case, trace):
    make, shape = CASES[case]
    model = make()
    x1, x2 = _x(*shape), _x(5, *shape[1:], seed=2)
    assert _is_chain(model, x1)
    for b in (None, x2):
        ref = empirical_ntk(model, x1, b, implementation="jacobian", trace_axes=trace)
        got = empirical_ntk(model, x1, b, implementation="structured", trace_axes=trace)
        assert got.shape == ref.shape
        assert _rel(got, ref) < TOL
    # per-sample kernels (the batch axis diagonal) and a parameter subset
    ref = empirical_ntk(model, x1, implementation="jacobian", trace_axes=trace, diagonal_axes=0)
    assert _rel(empirical_ntk(model, x1, implementation="structured", trace_axes=trace, diagonal_axes=0), ref) < TOL
    last = list(model.parameters())[-1:]
    ref = empirical_ntk(model, x1, params=last, implementation="jacobian", trace_axes=trace)
    assert _rel(empirical_ntk(model, x1, params=last, implementation="structured", trace_axes=trace), ref) < TOL


def test_factored_cotangents_are_used_and_exact():
    """After the readout and one elementwise module the cotangent is ``U ⊙ D`` (shared ``U``, per-sample ``D``);
    the traced dense block is then ``Σ_d w[d] D1[i,d] D2[j,d]`` with ``w = Σ_a U[a,d]²``."""
    model = _torch_mlp()
    x = _x(6, 5)
    impl, _ = ntk_implementation(model, x, implementation="structured")
    _, pw = impl.features(x)
    assert any(f[3] is not None for f in pw)  # the factors reached the pairwise contraction
    ref = empirical_ntk(model, x, implementation="jacobian")
    assert _rel(empirical_ntk(model, x, implementation="structured"), ref) < TOL


def test_outside_the_chain_falls_back_and_stays_exact():
    x = _x(4, 5)
    hooked = _torch_mlp()
    hooked[0].register_forward_hook(lambda m, i, o: 2 * o)
    custom = nn.Sequential(nn.Linear(5, 6), nn.Softmax(0), nn.Linear(6, 2)).double()  # mixes the batch
    for model in (hooked, custom):
        assert not _is_chain(model, x)
    ref = empirical_ntk(hooked, x, implementation="jacobian")
    assert _rel(empirical_ntk(hooked, x, implementation="structured"), ref) < TOL
    with pytest.raises(Exception):  # the general path's batch-independence check still refuses it
        empirical_ntk(custom, x, implementation="structured")
