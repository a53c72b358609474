"""ntkit.predict against reality: wide finite twins trained by full-batch gradient descent.

Convention (NT's): the loss is ``||f - y||² / (2·N)`` with ``N = y.numel()``; ``k`` steps of GD with step
``η`` on the parameters correspond to time ``t = k`` of ``gradient_descent_mse(ntk, y, learning_rate=η)``.
Steps are kept small (``a = η·λ_max/N <= 0.02``) so that the discrete/continuous gap (``<~ a/(2e)`` of a
residual) is far below the width effects / Monte-Carlo errors being measured.
"""

import math

import torch
from torch.func import functional_call, stack_module_state

import ntkit
from ntkit import predict

F64 = torch.float64
D, N_TRAIN, N_TEST = 6, 24, 8


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, D, dtype=F64, generator=g)
    xt = torch.randn(N_TEST, D, dtype=F64, generator=g)
    w = torch.randn(D, 1, dtype=F64, generator=g)
    return x, xt, torch.sin(x @ w / math.sqrt(D)) + 0.5 * torch.cos(x[:, :1])


NET = ntkit.serial(ntkit.Dense(1, b_std=0.2), ntkit.Relu(), ntkit.Dense(1, b_std=0.2))  # widths via module()


def _step_size(k, y, a_max):
    return a_max * y.numel() / float(torch.linalg.eigvalsh(k)[-1])


def _train_stack(models, x, xt, y, eta, checkpoints):
    """Full-batch GD of independent nets at once (``torch.func.vmap`` over stacked parameters), each on its
    own loss ``0.5·mean((f - y)²)``; returns the test outputs ``(checkpoint, net, n_test, 1)`` and the train
    outputs likewise (index 0 of each list is the initialisation)."""
    params, buffers = stack_module_state(models)
    base, xx, n = models[0], torch.cat([x, xt]), x.shape[0]
    batched = torch.vmap(lambda p, b: functional_call(base, (p, b), (xx,)))
    names = list(params)
    leaves = [params[nm].detach().requires_grad_(True) for nm in names]
    outs, step = [], 0
    for stop in [0] + list(checkpoints):
        while step < stop:
            out = batched(dict(zip(names, leaves)), buffers)[:, :n]
            loss = 0.5 * ((out - y) ** 2).mean(dim=(1, 2)).sum()  # sum of independent losses
            grads = torch.autograd.grad(loss, leaves)
            with torch.no_grad():
                for p, g in zip(leaves, grads):
                    p -= eta * g
            step += 1
        with torch.no_grad():
            outs.append(batched(dict(zip(names, leaves)), buffers))
    return [o[:, :n] for o in outs], [o[:, n:] for o in outs]


def test_wide_net_follows_gradient_descent_mse_and_error_shrinks_with_width():
    x, xt, y = _data()
    k = NET.kernel_fn(x, None, "ntk")
    kt = NET.kernel_fn(xt, x, "ntk")
    eta = _step_size(k, y, a_max=0.01)
    steps = [50, 150, 400]
    errors = {}
    for width in (256, 4096):
        models = [NET.module(D, width=width, seed=seed).double() for seed in range(3)]
        trs, tes = _train_stack(models, x, xt, y, eta, steps)
        errs = []
        for s in range(len(models)):
            pred_tr, pred_te = predict.gradient_descent_mse(k, y, learning_rate=eta)(
                torch.tensor(steps, dtype=F64), trs[0][s], tes[0][s], kt
            )
            for i in range(len(steps)):
                errs.append(
                    max(
                        float((trs[i + 1][s] - pred_tr[i]).abs().max()), float((tes[i + 1][s] - pred_te[i]).abs().max())
                    )
                )
        errors[width] = sum(errs) / len(errs)
    scale = float(y.abs().max())
    # the infinite-width prediction is approached at the NTK rate 1/sqrt(width): 16x width -> ~4x smaller
    assert errors[4096] < 0.5 * errors[256], errors
    assert errors[4096] < 0.05 * scale, errors
    # and the networks really moved (the prediction is not trivially f0)
    assert float((pred_te[-1] - tes[0][-1]).abs().max()) > 0.3 * scale


def test_ensemble_of_wide_nets_matches_gradient_descent_mse_ensemble():
    x, xt, y = _data()
    n_nets, width = 128, 512
    k = NET.kernel_fn(x, None, "ntk")
    eta = _step_size(k, y, a_max=0.02)
    n_steps = 75
    models = [NET.module(D, width=width, seed=100 + s) for s in range(n_nets)]  # float32 is ample for MC
    _, tes = _train_stack(models, x.float(), xt.float(), y.float(), eta, [n_steps])
    ft = tes[-1][:, :, 0].double()  # (nets, n_test)

    pred = predict.gradient_descent_mse_ensemble(NET.kernel_fn, x, y, learning_rate=eta)(
        float(n_steps), xt, "ntk", compute_cov=True
    )
    mean, var = pred.mean[:, 0], torch.diagonal(pred.covariance)
    prior_var = torch.diagonal(NET.kernel_fn(xt, None, "nngp"))
    emp_mean, emp_var = ft.mean(0), ft.var(0)
    z_mean = (emp_mean - mean) / torch.sqrt(var / n_nets)
    z_var = (emp_var - var) / (var * math.sqrt(2.0 / (n_nets - 1)))
    assert float(z_mean.abs().max()) < 4.5, z_mean
    assert float(z_var.abs().max()) < 4.5, z_var
    # the ensemble moved away from the prior (mean 0, variance = NNGP) by many standard errors
    assert float((emp_mean / torch.sqrt(prior_var / n_nets)).abs().max()) > 5
    assert float((emp_var / prior_var).max()) < 0.85
