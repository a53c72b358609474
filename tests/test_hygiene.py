"""No hidden global state from library calls, and the old import paths of 0.1 (deprecated, kept one release)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import ntkit as nt
from ntkit.empirical import empirical_ntk


def _state(m: nn.Module) -> list:
    """Everything of a module tree that a library call could leave behind."""
    return [
        (
            name,
            sorted(vars(mod)),
            dict(mod._forward_hooks),
            dict(mod._forward_pre_hooks),
            mod.forward.__func__ if hasattr(mod.forward, "__func__") else mod.forward,
        )
        for name, mod in m.named_modules()
    ]


def test_structured_derivatives_leave_the_model_untouched():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    before = _state(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    k = empirical_ntk(model, x, implementation="structured")
    assert k.shape == (5, 5)
    assert _state(model) == before


def test_structured_derivatives_clean_up_after_an_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.lin(x)
            if self.lin._forward_hooks:  # fails whenever ntkit has hooks attached
                raise RuntimeError("boom")
            return y

    model = Bad().double()
    before = _state(model)
    with pytest.raises(Exception, match="boom"):
        empirical_ntk(model, torch.randn(4, 4, dtype=torch.float64), implementation="structured", block_size=4)
    assert _state(model) == before


def test_net_module_does_not_touch_the_default_dtype():
    net = nt.serial(nt.Dense(8), nt.Relu(), nt.Dense(1))
    old = torch.get_default_dtype()
    m = net.module(3, seed=0)
    assert torch.get_default_dtype() == old and next(m.parameters()).dtype == old
    m64 = net.module(3, seed=0, dtype=torch.float64)
    # a seed gives the same network in every dtype (drawn in float64, then cast)
    assert torch.equal(next(m64.parameters()).float(), next(m.parameters()).float())


def test_with_hyperparameters_copies_instead_of_mutating():
    net = nt.serial(nt.Dense(8, W_std=1.5, b_std=0.1), nt.Relu(), nt.Dense(1))
    assert net.hyperparameters() == {"0.W_std": 1.5, "0.b_std": 0.1, "2.W_std": 1.0}
    w = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    other = net.with_hyperparameters({"0.W_std": w})
    x = torch.randn(4, 3, dtype=torch.float64)
    k = other.kernel_fn(x, None, "nngp")
    (g,) = torch.autograd.grad(k.sum(), w)
    assert torch.isfinite(g) and float(g) != 0.0
    assert net.layers[0].W_std == 1.5  # the original net is unchanged
    with pytest.raises(ValueError, match="unknown hyper-parameters"):
        net.with_hyperparameters({"1.W_std": 1.0})


def test_no_allocator_tuning_and_no_matplotlib_backend_change_from_library_calls():
    code = (
        "import matplotlib; b = matplotlib.get_backend(); import numpy as np, torch, ntkit as nt, "
        "ntkit._memory as m, ntkit.plots as P; "
        "nt.serial(nt.Dense(4), nt.Relu(), nt.Dense(1)).kernel_fn(torch.randn(3, 2).double()); "
        "P.plot_spectrum({'ntk': np.arange(1, 9.0)}, '/tmp/ntkit_hygiene.png'); "
        "print(m._Tuning.malloc, m._Tuning.huge_pages, matplotlib.get_backend() == b)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False True"


OLD_PATHS = {
    "ntkit.solvers": ("cg", "PSDMatrix", "random_features"),
    "ntkit.solvers.linalg": ("PSDMatrix", "as_kernel_matrix"),
    "ntkit.solvers.cg": ("cg", "LowRankPreconditioner", "make_preconditioner"),
    "ntkit.solvers.nystrom": ("nystrom", "falkon"),
    "ntkit.solvers.random_features": ("RandomFeatures",),
    "ntkit.tiling.operator": ("as_operator", "KernelFnOperator", "tmm"),
    "ntkit.tiling.distributed": ("context",),
    "ntkit.sklearn": ("NTKRegressor", "fc_net"),
    "ntkit.gpytorch": ("NNGPKernel",),
}


@pytest.mark.parametrize("path", sorted(OLD_PATHS))
def test_old_module_paths_work_with_a_deprecation_warning(path):
    if path in ("ntkit.sklearn",):
        pytest.importorskip("sklearn")
    if path in ("ntkit.gpytorch",):
        pytest.importorskip("gpytorch")
    sys.modules.pop(path, None)
    with pytest.warns(DeprecationWarning, match="moved to"):
        mod = importlib.import_module(path)
    for name in OLD_PATHS[path]:
        assert getattr(mod, name) is not None


def test_old_attribute_paths_work_with_a_deprecation_warning():
    import ntkit.nets
    import ntkit.tiling
    from ntkit.architectures import myrtle

    with pytest.warns(DeprecationWarning, match="ntkit.architectures.myrtle"):
        assert ntkit.nets.myrtle is myrtle
    with pytest.warns(DeprecationWarning, match="ntkit.linalg.as_operator"):
        assert ntkit.tiling.as_operator is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from ntkit.linalg import as_operator  # the new path is silent

        assert as_operator is not None
