"""Function-space gradient descent for any differentiable loss, integrated with ``scipy.integrate.solve_ivp``.

At infinite width (or for a linearised network) parameters move by ``dθ/dt = -η ∇_θ L(f(X))``, so outputs move
by the kernel (Lee et al. 2019)::

    d f_train / dt = -η Θ ∇_f L(f_train, y),        d f_test / dt = -η Θ_test,train ∇_f L(f_train, y)

With momentum ``μ`` (heavy ball, ``v ← μ v - η ∇L; θ ← θ + v``) the continuum limit, in time units of
``sqrt(η)``, is the second-order ODE (NT's convention)::

    f'' = -Θ ∇_f L(f) - (1 - μ)/sqrt(η) · f'

written as a first-order system in ``(f, q = f')``. The loss is a torch function, differentiated by
``torch.autograd``; it must normalise itself (NT: e.g. ``0.5 * mean((f - y)**2)`` reproduces
:func:`ntkit.predict.gradient_descent_mse`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from scipy.integrate import solve_ivp
from torch import Tensor

from ntkit._inputs import to_tensor
from ntkit.linalg.dense import as_kernel_matrix, check_memory
from ntkit.predict._layout import F64, Layout, as_times, ntk_of
from ntkit.predict.types import ODEState

__all__ = ["gradient_descent", "ODEPredictor"]


class ODEPredictor:
    """Predictor returned by :func:`gradient_descent`;
    ``predict_fn(t, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)``."""

    def __init__(self, loss, k_train_train, y_train, learning_rate, momentum, trace_axes, method, rtol, atol):
        if not callable(loss):
            raise TypeError("loss must be a callable loss(fx_train, y_train) -> scalar tensor.")
        k = to_tensor(ntk_of(k_train_train), "k_train_train")
        if not k.is_floating_point():
            raise TypeError(f"k_train_train has dtype {k.dtype}; pass a floating kernel.")
        self.dtype, self.device = k.dtype, k.device
        y = to_tensor(y_train, "y_train", device=k.device)
        if y.dim() == 0 or y.shape[0] == 0:
            raise ValueError(f"y_train must have shape (n,) or (n, *outputs), got {tuple(y.shape)}.")
        self.layout = Layout(y.shape, trace_axes)
        self.n = y.shape[0]
        k2 = self.layout.kernel_2d(k, "k_train_train", n2=self.n, n1=self.n)
        self.k = as_kernel_matrix(k2, "k_train_train").to(F64)
        self.y = y.to(F64) if y.is_floating_point() else y
        self.loss = loss
        as_times(0.0, learning_rate, F64, "cpu")  # validates learning_rate
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum={momentum!r} must be None or a number in [0, 1).")
        self.momentum = momentum
        if momentum is None:
            self.time_scale, self.damping = float(learning_rate), 0.0
        else:
            self.time_scale = math.sqrt(learning_rate)
            self.damping = (1.0 - momentum) / self.time_scale
        self.method, self.rtol, self.atol = method, rtol, atol

    def grad_flat(self, f_flat: Tensor) -> Tensor:
        """``∇_f L`` at flat train outputs ``(M, T)`` (by reverse-mode autograd), returned flat."""
        f = self.layout.unflatten(f_flat, self.n).detach().requires_grad_(True)
        with torch.enable_grad():
            v = self.loss(f, self.y)
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise ValueError("loss(fx_train, y_train) must return a scalar tensor (e.g. a mean over samples).")
            if not v.requires_grad:
                raise ValueError("loss(fx_train, y_train) does not depend differentiably on fx_train.")
            (g,) = torch.autograd.grad(v.reshape(()), f)
        return self.layout.flatten(g)

    def _broadcast(self, x: Any, n: int, name: str) -> Tensor:
        f = to_tensor(x, name, dtype=F64, device=self.device)
        shape = self.layout.sample_shape(n)
        try:
            return self.layout.flatten(torch.broadcast_to(f, shape))
        except RuntimeError as e:
            raise ValueError(f"{name} has shape {tuple(f.shape)}, which does not broadcast to {shape}.") from e

    def __call__(self, t: Any = None, fx_train_or_state_0: Any = 0.0, fx_test_0: Any = None, k_test_train: Any = None):
        """Outputs (or the full :class:`ODEState`) at times ``t`` (any shape ``S``, ``>= 0``, any order).

        ``fx_train_or_state_0``: train outputs at ``t = 0``, ``None`` for test outputs only, or an
        :class:`ODEState` (then an ODEState is returned, velocities included). Returns ``fx_train_t``,
        ``fx_test_t`` or both as NT, with leading axes ``S``.
        """
        if t is None:
            raise ValueError(
                "gradient_descent integrates to finite times: pass t (a number or an array). "
                "Infinite time may not exist for a general loss (cross-entropy diverges); for MSE "
                "use gradient_descent_mse(...)(t=None)."
            )
        is_state = isinstance(fx_train_or_state_0, ODEState)
        if is_state:
            if fx_test_0 is not None:
                raise ValueError("fx_test_0 is part of the ODEState; pass it as state.fx_test, not separately.")
            st = fx_train_or_state_0
            fx_train_0, fx_test_0, q_tr0, q_te0 = st.fx_train, st.fx_test, st.qx_train, st.qx_test
            if self.momentum is None and (q_tr0 is not None or q_te0 is not None):
                raise ValueError("the ODEState carries velocities (qx_*) but momentum is None.")
        else:
            fx_train_0, q_tr0, q_te0 = fx_train_or_state_0, None, None
        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError("fx_train_0 and fx_test_0 are both None: nothing to predict.")
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError("fx_test_0 is given but k_test_train is not; pass the test-train kernel.")

        f_tr = self._broadcast(0.0 if fx_train_0 is None else fx_train_0, self.n, "fx_train_0")
        parts = [f_tr]
        k_td: Optional[Tensor] = None
        m = 0
        if fx_test_0 is not None:
            kt = to_tensor(ntk_of(k_test_train), "k_test_train", dtype=F64, device=self.device)
            if kt.dim() < 2:
                raise ValueError(f"k_test_train must be (n_test, n_train), got shape {tuple(kt.shape)}.")
            m = kt.shape[0]
            k_td = self.layout.kernel_2d(kt, "k_test_train", n2=self.n, n1=m)
            parts.append(self._broadcast(fx_test_0, m, "fx_test_0"))
        if self.momentum is not None:
            parts.append(self._broadcast(0.0 if q_tr0 is None else q_tr0, self.n, "qx_train"))
            if fx_test_0 is not None:
                parts.append(self._broadcast(0.0 if q_te0 is None else q_te0, m, "qx_test"))
        shapes = [p.shape for p in parts]
        sizes = [p.numel() for p in parts]
        y0 = torch.cat([p.reshape(-1) for p in parts]).cpu().numpy()

        ts, t_shape = as_times(t, 1.0, F64, "cpu")
        ts = ts * self.time_scale
        if bool(torch.isinf(ts).any()):
            raise ValueError("t contains inf; gradient_descent integrates to finite times only.")
        check_memory(8 * ts.numel() * y0.size, "cpu", "the ODE solution at the requested times")
        uniq, inverse = torch.unique(ts, return_inverse=True)

        # what the right-hand side reads, emptied after the solve: scipy's solver is a reference cycle (its
        # closures hold it) that would otherwise keep this predictor and the kernels until a full collection
        reads: list = [self, k_td]

        def rhs(_s, state):
            me, ktd = reads
            st = torch.split(torch.from_numpy(state).to(me.device), sizes)
            g = me.grad_flat(st[0].reshape(shapes[0]))
            d = [-(me.k @ g)] + ([-(ktd @ g)] if ktd is not None else [])  # -Θ ∇L on train (and test)
            if me.momentum is not None:
                q = st[len(d) :]  # velocities, same order as the outputs
                d = list(q) + [di - me.damping * qi.reshape(di.shape) for di, qi in zip(d, q)]
            return torch.cat([x.reshape(-1) for x in d]).cpu().numpy()

        t_end = float(uniq[-1])
        if t_end > 0:
            try:
                sol = solve_ivp(
                    rhs, (0.0, t_end), y0, method=self.method, t_eval=uniq.numpy(), rtol=self.rtol, atol=self.atol
                )
            finally:
                reads.clear()
            if not sol.success:
                raise RuntimeError(
                    f"the ODE solver ({self.method}) failed: {sol.message} Try method='LSODA' "
                    f"or 'BDF' for stiff problems, or a smaller t."
                )
            traj = torch.from_numpy(sol.y.T.copy())  # (len(uniq), state); t_eval includes 0 if asked
        else:
            traj = torch.from_numpy(y0)[None].repeat(uniq.numel(), 1)
        traj = traj[inverse].to(self.device)  # (T, state)
        chunks = torch.split(traj, sizes, dim=1)
        out_dtype = self.dtype

        def unflat(x: Tensor, shape, n: int) -> Tensor:
            x = x.reshape((x.shape[0],) + tuple(shape))
            x = self.layout.unflatten(x, n)
            return x.reshape(t_shape + tuple(x.shape[1:])).to(out_dtype)

        res_tr = unflat(chunks[0], shapes[0], self.n)
        res_te = unflat(chunks[1], shapes[1], m) if k_td is not None else None
        if is_state:
            q_tr = q_te = None
            if self.momentum is not None:
                q_tr = unflat(chunks[2 if k_td is not None else 1], shapes[0], self.n)
                q_te = unflat(chunks[3], shapes[1], m) if k_td is not None else None
            return ODEState(res_tr, res_te, q_tr, q_te)
        if fx_train_0 is not None and res_te is None:
            return res_tr
        if fx_train_0 is None:
            return res_te
        return res_tr, res_te


def gradient_descent(
    loss: Callable[[Tensor, Tensor], Tensor],
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    momentum: Optional[float] = None,
    trace_axes: Union[int, Sequence[int]] = (-1,),
    *,
    method: str = "DOP853",
    rtol: float = 1e-9,
    atol: float = 1e-11,
) -> ODEPredictor:
    """Function-space (momentum) gradient descent on any differentiable ``loss`` (NT's ``gradient_descent``).

    Args:
      loss: ``loss(fx_train, y_train) -> scalar`` in torch (e.g. cross-entropy
        ``-(y * log_softmax(f, -1)).mean()``); it is differentiated by ``torch.autograd``.
      k_train_train: NTK on the training set (``(n, n)``, or zipped for non-traced output axes).
      y_train: targets shaped like the outputs ``(n, *outputs)``.
      learning_rate: ``η``; time is in units of ``η`` (of ``sqrt(η)`` with momentum).
      momentum: ``None`` for plain GD, else ``μ ∈ [0, 1)`` (second-order ODE, see the module docstring).
      trace_axes: as in :func:`ntkit.predict.gradient_descent_mse`.
      method, rtol, atol: passed to ``scipy.integrate.solve_ivp`` (use ``"LSODA"``/``"BDF"`` if stiff).

    Returns: an :class:`ODEPredictor`; times may be given in any order and shape; all are integrated in one
    solver run. Infinite time is refused (a general loss need not have a finite minimiser).
    """
    return ODEPredictor(loss, k_train_train, y_train, learning_rate, momentum, trace_axes, method, rtol, atol)
