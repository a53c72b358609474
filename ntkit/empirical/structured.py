"""Structured derivatives: NTK contributions of parameters that enter a module linearly in a known way.

For a use ``y[t] = W x[t]`` of a weight ``W`` (positions ``t``: tokens, pixels, patches) and output cotangents
``G[a, t] = ∂f_a/∂y[t]``, the Jacobian is ``∂f_a/∂W = Σ_t G[a, t] ⊗ x[t]``, so (Novak et al. 2022)::

    Θ_W(x1, x2)[a, b] = Σ_{t, s} (x1[t] · x2[s]) (G1[a, t] · G2[b, s])

which needs neither Jacobian when positions are few (``"pairwise"``), and otherwise is contracted from the
cheaply built ``Σ_t G ⊗ x`` (``"materialised"``); each parameter takes the cheaper by a FLOP estimate.
Convolutions are this rule on input patches; ``nn.Embedding`` on one-hot inputs (``x1[t]·x2[s]`` is
``[id1[t] = id2[s]]``); biases and norm-layer affine parameters (``y = x̂ γ + β``) have per-sample
Jacobians ``Σ_t G ⊙ x̂`` that are built directly.

The cotangents of every structured use come from one ``jacrev`` of ``f`` with respect to zero
perturbations ``δ`` added to the uses' outputs (``∂f/∂δ = ∂f/∂y``); the structured parameters are constants
in it. While a kernel is computed, a forward hook on each structured module records what its rule needs from
the module's input (passed positionally or by keyword) and adds the perturbation to the output of the module's
own forward (the hook runs before the user's hooks, the pre-hook after theirs); the hooks are removed when the
computation ends (also on errors), so the user's modules are never modified. A parameter is only treated this
way when a probe pass shows that no torch function reads it outside its own module's forward; any other use
(a weight read by a parent module or a user's hook, ``nn.MultiheadAttention``'s projections) makes it an
ordinary parameter, differentiated by Jacobian contraction, and so does a call the rule cannot describe (an
input modified in place after the call, a rule that does not give the parameter's size). The rules read the
layer's sizes from its parameters and its settings from what its forward reads (never ``in_features``-style
bookkeeping). So results are exact for any model.

Rules: torch's own modules (``nn.Linear``, ``nn.Conv*``, ``nn.Embedding``, norm layers) are listed here; an
ntkit finite twin brings its own (``structured_uses`` beside its ``forward``, in its layer's file).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, Optional, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ntkit.empirical._model import Probe, compute_mode, single_fn
from ntkit.empirical._spec import OutSpec
from ntkit.empirical.protocol import EmpiricalError, Implementation
from ntkit.layers.base import Lambda, LinearUse
from ntkit.layers.conv import conv_cotangents, patches
from ntkit.layers.dense import DenseModule
from ntkit.layers.elementwise import ABRelu, ElementwiseLayer, Erf, Sign
from ntkit.layers.elementwise_poly import Hermite, Monomial, Polynomial, RectifiedMonomial
from ntkit.layers.elementwise_smooth import Cos, Exp, ExpNormalized, Gaussian, Gelu, Rbf, Sin

__all__ = ["Structured", "plan_chain"]


# ---------------------------------------------------------------------------------------------------
# per-module rules: record(module, input) -> what uses() needs; uses(module, rec, G, n, M, names)
# ---------------------------------------------------------------------------------------------------
class _Outer:
    """A use ``y[t, g·fout + d] = Σ_c W[g, d, c] X[t, g, c]`` of a weight (groups ``g``), or of an embedding
    table on token ids (``ids``: ``x1[t]·x2[s]`` is ``[id1[t] = id2[s]]``)."""

    def __init__(self, X: Optional[Tensor], G: Tensor, ids: Optional[Tensor] = None, vocab: int = 0):
        self.X, self.G, self.ids, self.vocab = X, G, ids, vocab  # X (n,T,g,fin), G (n,M,T,g,fout), ids (n,T)
        # for one position and group: G[i, a, 0, 0, d] = U[a, d]·D[i, d] (U (M, fout), D (n, fout)), if known
        self.factors: Optional[tuple[Tensor, Tensor]] = None

    def key(self):
        if self.ids is not None:
            return ("ids", self.vocab, self.G.shape[-1])
        assert self.X is not None
        return ("x", self.X.shape[2], self.X.shape[3], self.G.shape[-1])

    def materialise(self) -> Tensor:
        """``Σ_t G ⊗ x`` flattened as the parameter: ``(n, M, numel)``."""
        n, M = self.G.shape[:2]
        if self.ids is not None:  # weight (V, D): J[v, d] = Σ_t [id_t = v] G[t, d]
            onehot = F.one_hot(self.ids, self.vocab).to(self.G.dtype)
            return torch.einsum("itv,iatgd->iavd", onehot, self.G).reshape(n, M, -1)
        return torch.einsum("itgc,iatgd->iagdc", self.X, self.G).reshape(n, M, -1)


def _outer(u: Any) -> Any:
    """A twin's :class:`~ntkit.layers.base.LinearUse` as an :class:`_Outer`; other uses pass through."""
    return _Outer(u.X, u.G) if isinstance(u, LinearUse) else u


def _describes(u: Any, numel: int) -> bool:
    """A use (probe pass, one sample) has the size of its parameter: else the rule does not describe how the
    module uses it, and the parameter is differentiated as an ordinary one."""
    if isinstance(u, _Outer):
        if u.ids is not None:
            return u.vocab * u.G.shape[-1] == numel
        assert u.X is not None, "a weight use without token ids has inputs X"
        X, G = u.X, u.G
        return X.shape[1:3] == G.shape[2:4] and X.shape[2] * X.shape[3] * G.shape[4] == numel
    return isinstance(u, Tensor) and u.dim() == 3 and u.shape[-1] == numel


def _input(m, x):
    return x


def _same_layout(m: nn.Module, u: _Outer, G: Tensor, fac: tuple[Tensor, Tensor]) -> bool:
    """``u.G`` is ``G`` (n, M, 1, fout) reshaped to ``(n, M, 1, 1, fout)`` and nothing else, so that the factors
    ``(U (M, fout), D (n, fout))`` of ``G`` are those of ``u.G``: true of the rules of ``nn.Linear`` and of ntkit's
    ``DenseModule`` (whose NTK scale sits on the inputs ``X``) on inputs without spatial axes. Decided from the
    module's rule and the shapes alone (no storage is read: this also runs on ``vmap``'s batched tensors)."""
    U, D = fac
    g = u.G
    rule = _rule(m)
    known = rule is not None and (rule[1] is _linear_uses or (rule[1] is _twin_uses and _twin_class(m) is DenseModule))
    return (
        known
        and u.X is not None
        and g.dim() == 5
        and tuple(g.shape[2:4]) == (1, 1)
        and G.dim() == 4
        and G.shape[2] == 1
        and U.dim() == 2
        and D.dim() == 2
        and tuple(g.shape) == (G.shape[0], G.shape[1], 1, 1, G.shape[3])
        and tuple(U.shape) == (g.shape[1], g.shape[4])
        and tuple(D.shape) == (g.shape[0], g.shape[4])
    )


# The rules read only what the module's own forward reads: the parameters (their shapes give the layer's
# sizes) and the call-time settings (stride, padding, groups, ...), never the constructor's bookkeeping
# (``in_features``, ``kernel_size``, ``num_embeddings``): a subclass that builds its weight itself, or a weight
# replaced by one of another shape, is described by what its forward computes.
def _linear_uses(m, rec, G, n, M, names):
    fin, fout = rec.shape[-1], G.shape[-1]
    Gt = G.reshape(n, M, -1, 1, fout)
    out = {"weight": _Outer(rec.reshape(n, -1, 1, fin), Gt)} if "weight" in names else {}
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, fout)
    return out


def _per_axis(v: Any, d: int) -> tuple:
    """A convolution setting (one int, or one per spatial axis) per axis."""
    return (v,) * d if isinstance(v, int) else tuple(v)


def _conv_padding(m: Any, d: int, ks: tuple[int, ...]) -> list[int]:
    """``F.pad`` widths (last axis first) of the padding ``m``'s forward applies: ``padding_mode`` other than
    zeros pads by ``_reversed_padding_repeated_twice``, zeros by ``padding`` ('valid', 'same' with torch's
    split of ``dilation·(k-1)``, left ``⌊·/2⌋``, or per-axis / one int)."""
    if m.padding_mode != "zeros":
        return list(m._reversed_padding_repeated_twice)
    pad, dil = m.padding, _per_axis(m.dilation, d)
    if pad == "valid":
        return [0] * (2 * d)
    if pad == "same":
        tot = [dil[i] * (ks[i] - 1) for i in range(d)]
        return [w for i in reversed(range(d)) for w in (tot[i] // 2, tot[i] - tot[i] // 2)]
    pad = _per_axis(pad, d)
    return [w for i in reversed(range(d)) for w in (pad[i], pad[i])]


def _conv_uses(m, rec, G, n, M, names):
    wshape = m.weight.shape  # (Cout, Cin/groups, *kernel)
    d, cout, ks = len(wshape) - 2, wshape[0], tuple(wshape[2:])
    Gt = conv_cotangents(G, n, M, d, m.groups, cout)
    out: dict[str, Union[_Outer, Tensor]] = {}
    if "weight" in names:
        x = rec.reshape((n,) + tuple(rec.shape[-(d + 1) :]))  # (n, Cin, *S)
        pad = _conv_padding(m, d, ks)
        if any(pad):
            x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        out["weight"] = _Outer(patches(x, ks, _per_axis(m.stride, d), _per_axis(m.dilation, d), m.groups), Gt)
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, cout)
    return out


def _emb_uses(m, rec, G, n, M, names):
    ids = rec.reshape(n, -1)
    Gt = G.reshape(n, M, -1, 1, G.shape[-1])
    vocab, pad = m.weight.shape[0], m.padding_idx
    if pad is not None:  # autograd gives no gradient to the padding row; neither do we
        pad = pad + vocab if pad < 0 else pad  # as F.embedding reads a negative index
        Gt = Gt * (ids != pad).to(Gt.dtype)[:, None, :, None, None]
    return {"weight": _Outer(None, Gt, ids=ids, vocab=vocab)}


def _layernorm_rec(m, x):  # x̂: what the affine parameters multiply
    return F.layer_norm(x, m.normalized_shape, None, None, m.eps)


def _rmsnorm_rec(m, x):
    return F.rms_norm(x, m.normalized_shape, None, m.eps)


def _trailing_uses(m, rec, G, n, M, names):
    k = math.prod(m.normalized_shape)
    out = {}
    if "weight" in names:
        out["weight"] = (G * rec.unsqueeze(1)).reshape(n, M, -1, k).sum(2)
    if "bias" in names:
        out["bias"] = G.reshape(n, M, -1, k).sum(2)
    return out


def _groupnorm_rec(m, x):
    return F.group_norm(x, m.num_groups, None, None, m.eps)


def _batchnorm_rec(m, x):
    return F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)


def _channel_uses(m, rec, G, n, M, names):
    c = rec.shape[2]  # rec (n, 1, C, *S)
    out = {}
    if "weight" in names:
        out["weight"] = (G * rec.unsqueeze(1)).movedim(3, -1).reshape(n, M, -1, c).sum(2)
    if "bias" in names:
        out["bias"] = G.movedim(3, -1).reshape(n, M, -1, c).sum(2)
    return out


def _twin_uses(m, rec, G, n, M, names):
    return {k: _outer(u) for k, u in m.structured_uses(rec, G, names).items()}


Rule = tuple[Callable[[nn.Module, Tensor], Tensor], Callable[..., dict]]


def _own_forward(m: nn.Module, base: type[nn.Module]) -> bool:
    """``m`` runs ``base``'s own forward (a subclass that overrides it, or a ``forward`` assigned to the
    instance, may compute anything)."""
    return isinstance(m, base) and type(m).forward is base.forward and "forward" not in m.__dict__


def _twin_class(m: nn.Module) -> Optional[type]:
    """The class that defines ``structured_uses`` for ``m`` (an ntkit finite twin), if any."""
    for cls in type(m).__mro__:
        if "structured_uses" in cls.__dict__:
            return cls
    return None


def _rule(m: nn.Module) -> Optional[Rule]:
    """(record, uses) for modules whose ``forward`` is the stock one, else None."""
    twin = _twin_class(m)
    if twin is not None:
        return (_input, _twin_uses) if _own_forward(m, twin) else None
    if _own_forward(m, nn.Linear):
        return _input, _linear_uses
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if _own_forward(m, base) and isinstance(m.padding, (tuple, list, str, int)):
            return _input, _conv_uses
    if _own_forward(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq and not m.sparse:
        return _input, _emb_uses
    if _own_forward(m, nn.LayerNorm):
        return _layernorm_rec, _trailing_uses
    if hasattr(nn, "RMSNorm") and _own_forward(m, nn.RMSNorm):
        return _rmsnorm_rec, _trailing_uses
    if _own_forward(m, nn.GroupNorm):
        return _groupnorm_rec, _channel_uses
    if (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and type(m).forward is nn.modules.batchnorm._BatchNorm.forward
        and not m.training
        and m.running_mean is not None
    ):
        return _batchnorm_rec, _channel_uses
    return None


# ---------------------------------------------------------------------------------------------------
# hooks
# ---------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self):
        self.mode = "off"
        self.deltas: list = []
        self.records: list = []
        self.calls: list = []  # (module, y shape, y dtype, record, its version) per call (probe mode)
        self.stack: list = []  # modules whose forward is running (probe mode)
        self.outside: set = set()  # ids of structured leaves read outside their own module (probe mode)
        self.unrecorded: set = set()  # ids of modules a call of which the rule cannot describe (probe mode)


def _sole_input(args: tuple, kwargs: dict) -> Optional[Tensor]:
    """The one tensor a module was called with, positionally or by keyword (``lin(input=x)``), else None."""
    vals = (*args, *kwargs.values())
    return vals[0] if len(vals) == 1 and isinstance(vals[0], Tensor) else None


def _hooks(m: nn.Module, record, structured: set, ctx: _Ctx):
    """Forward pre-hook and hook of one structured module: in probe mode they record the call, in run mode
    they record what its rule needs and add the perturbation to its output.

    The pre-hook runs after the module's other pre-hooks and the hook before its other hooks (``prepend``),
    so the perturbation is added to the output of the module's own forward, and a weight read by a user's
    hook (before or after the forward) is read outside the module, which makes it an ordinary parameter."""

    def pre(mod, args):
        if ctx.mode == "probe":
            ctx.stack.append(mod)

    def post(mod, args, kwargs, y):
        if ctx.mode == "probe":
            ctx.stack.pop()
            if structured:
                x = _sole_input(args, kwargs)
                try:
                    rec = None if x is None or not isinstance(y, Tensor) else record(mod, x).detach()
                except Exception:  # a module the rule cannot describe: its parameters become ordinary ones
                    rec = None
                if rec is None:
                    ctx.unrecorded.add(id(mod))
                else:  # with its version: an input modified in place later (x += lin(x)) is not the input
                    ctx.calls.append((mod, tuple(y.shape), y.dtype, rec, rec._version))
            return None
        if ctx.mode == "off" or not structured:
            return None
        x = _sole_input(args, kwargs)
        if x is None or not isinstance(y, Tensor):
            raise EmpiricalError(
                f"{type(mod).__name__} was called with {len(args) + len(kwargs)} inputs where the probe pass saw "
                f"one; use implementation='jacobian' for data-dependent control flow."
            )
        k = len(ctx.records)
        if k >= len(ctx.deltas) or ctx.deltas[k].shape != y.shape or ctx.deltas[k].dtype != y.dtype:
            raise EmpiricalError(
                "the model's forward calls its layers differently from sample to sample; "
                "use implementation='jacobian' for data-dependent control flow."
            )
        ctx.records.append(record(mod, x))
        return y + ctx.deltas[k]

    return pre, post


class _Owners:
    """The structured modules that own one parameter (tied weights have several)."""

    def __init__(self, mods: set):
        self.ids = {id(m) for m in mods}

    def own(self, m: Optional[nn.Module]) -> bool:
        return m is not None and id(m) in self.ids


class _ReadsOutside(torch.overrides.TorchFunctionMode):
    """Probe mode: every torch function that reads a structured parameter while none of its own modules is the
    innermost running structured module marks the parameter as used elsewhere (then it is differentiated as an
    ordinary parameter)."""

    def __init__(self, ctx: _Ctx, owners: dict[int, _Owners]):
        super().__init__()
        self.ctx, self.owners = ctx, owners

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        top = self.ctx.stack[-1] if self.ctx.stack else None
        for a in tree_flatten((args, kwargs))[0]:
            o = self.owners.get(id(a)) if isinstance(a, Tensor) else None
            if o is not None and not o.own(top):
                self.ctx.outside.add(id(a))
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------
# chains: sequential models of per-sample modules, analysed from their structure alone
# ---------------------------------------------------------------------------------------------------
#: stock torch activations: elementwise (a diagonal Jacobian), parameter-free
_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.LogSigmoid,
    nn.Threshold,
)
#: the ``fn`` of ntkit's elementwise nonlinearities (their twins are ``Lambda(layer.fn)``); ``ExpNormalized``'s
#: twin normalises each sample (per-sample, not elementwise) and ``Elementwise`` runs the user's function
_ELEMENTWISE_FNS = frozenset(
    c.fn
    for c in (ABRelu, Sign, Erf, Polynomial, Monomial, Hermite, RectifiedMonomial, Gelu, Sin, Cos, Rbf, Gaussian, Exp)
)
_PER_SAMPLE_FNS = frozenset({ExpNormalized.fn})
_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def _hook_free(m: nn.Module) -> bool:
    """No forward or backward hooks on ``m`` (they may read parameters or change outputs)."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _twin_fn(m: nn.Module) -> Optional[Callable]:
    """The class-level ``fn`` of an ntkit nonlinearity whose finite twin ``m`` is (a ``Lambda`` of its bound
    ``fn``), else None."""
    if not _own_forward(m, Lambda):
        return None
    owner = getattr(m.fn, "__self__", None)
    if not isinstance(owner, ElementwiseLayer) or getattr(m.fn, "__func__", None) is not type(owner).fn:
        return None
    return type(owner).fn


def _kind(m: nn.Module) -> Optional[str]:
    """How a chain treats module ``m``:

    * ``"affine"``: ``nn.Linear``, ntkit's ``DenseModule`` (``y = x Aᵀ + b`` per sample; a rule);
    * ``"norm"``: ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` (per sample; a rule);
    * ``"diag"``: an elementwise activation (stock, or an ntkit nonlinearity's twin);
    * ``"vjp"``: another per-sample map (ntkit's ``ExpNormalized`` twin);
    * ``"same"``: ``nn.Identity``, dropout in eval mode; ``"flatten"``: ``nn.Flatten``;
    * None: anything else (the model is then not a chain).
    """
    if _own_forward(m, nn.Linear) or _own_forward(m, DenseModule):
        return "affine"
    if any(_own_forward(m, c) for c in _NORMS):
        return "norm"
    if any(_own_forward(m, c) for c in _ELEMENTWISE):
        return "diag"
    if _own_forward(m, nn.Identity):
        return "same"
    if any(_own_forward(m, c) for c in _DROPOUT):
        return None if m.training else "same"
    if _own_forward(m, nn.Flatten):
        return "flatten"
    fn = _twin_fn(m)
    if fn in _ELEMENTWISE_FNS:
        return "diag"
    if fn in _PER_SAMPLE_FNS:
        return "vjp"
    return None


def _chain_modules(model: nn.Module) -> Optional[list[nn.Module]]:
    """The modules an ``nn.Sequential`` (nested ones flattened) calls in order, when none has hooks; else None."""
    if not (_own_forward(model, nn.Sequential) and _hook_free(model)):
        return None
    out: list[nn.Module] = []
    for m in cast(nn.Sequential, model):  # what Sequential.forward iterates (repeated modules included)
        if not _hook_free(m):
            return None
        if isinstance(m, nn.Sequential):
            inner = _chain_modules(m)
            if inner is None:
                return None
            out += inner
        else:
            out.append(m)
    return out


class _Link:
    """One module of a chain: its kind (:func:`_kind`), how to call it with given parameter values, its rule."""

    def __init__(self, module: nn.Module, kind: str, state: dict[str, str], rule: Optional[Rule], local: dict):
        self.module, self.kind = module, kind
        self.state = state  # local parameter name -> canonical name, every parameter of the module
        self.record = rule[0] if rule is not None else None
        self.uses = rule[1] if rule is not None else None
        self.local: dict[str, str] = local  # local name -> canonical name of the selected parameters
        self.inplace = bool(getattr(module, "inplace", False))

    def __call__(self, h: Tensor, values: dict[str, Tensor]) -> Tensor:
        if self.inplace:  # its input is a primal of a vjp or a record: keep it intact
            h = h.clone()
        if not self.state:
            return self.module(h)
        return torch.func.functional_call(self.module, {ln: values[c] for ln, c in self.state.items()}, (h,))


class _RowPullback:
    """The pullback of a linear module on vectors, ``g ↦ c · g A`` for ``y = c · x Aᵀ (+ b)``: one GEMM with the
    scale folded in (``torch.addmm``'s ``alpha``), for the ``n·M`` cotangent rows at once."""

    def __init__(self, weight: Tensor, scale: float):
        self.weight, self.scale = weight, scale

    def __call__(self, rows: Tensor) -> Tensor:
        return torch.addmm(rows.new_zeros(()), rows, self.weight, beta=0.0, alpha=self.scale)


def _row_pullback(link: _Link, values: dict[str, Tensor], d_in: int, d_out: int) -> Optional[_RowPullback]:
    """:class:`_RowPullback` of an ``nn.Linear`` or ``DenseModule`` (stock forwards) on per-sample vectors
    (``(batch, features)`` in and out), read from its formula: ``nn.Linear`` ``y = x Wᵀ + b``; ``DenseModule``
    ``y = (W_std/√fan_in) x Wᵀ + b_std b`` (NTK parameterisation) or ``y = x Wᵀ/√s_in + b`` (standard). None
    otherwise (the caller takes the vjp)."""
    m = link.module
    if d_in != 2 or d_out != 2 or "weight" not in link.state:
        return None
    weight = values[link.state["weight"]]
    if weight.dim() != 2:
        return None
    if type(m) is nn.Linear:
        return _RowPullback(weight, 1.0)
    if type(m) is DenseModule:
        return _RowPullback(weight, m.weight_scale)
    return None


class _Chain:
    """A model that is an ``nn.Sequential`` of modules known to treat samples independently (:func:`_kind`:
    linear and norm layers with rules, elementwise activations, ntkit's nonlinearity twins, ``Flatten``,
    ``Identity``, eval-mode dropout), without hooks, every selected parameter a weight or bias of one of its
    ruled modules.

    Such a model needs no probing: every parameter is read only by its own module (``nn.Sequential.forward``
    calls the modules and nothing else), no module mixes samples (so the batch-independence check has nothing
    to find), and FLOPs and activation sizes follow from the layer shapes, read from one forward pass on a
    batch of no samples (every module checks its inputs; nothing is computed, no weight read). The cotangents
    ``G[i, a] = ∂f_a(x_i)/∂y_i`` of all samples come from one batched backward pass, module by module (the
    Jacobian of a per-sample model is block-diagonal over the batch), with ``G`` kept ``(n, M, ...)``-contiguous
    for the pairwise products:

    * an affine module pulls every row back by the vjp of the module at one sample (its Jacobian is the same
      for every input), ``vmap``-ed over the ``n·M`` rows: one GEMM;
    * an elementwise module multiplies by its derivative ``φ'(z)`` (one reverse-mode pass with a cotangent of
      ones: autograd's own convention at kinks; for ``nn.ReLU`` directly ``[relu(z) > 0]``, the same values,
      ``relu'(0) = 0``);
    * a norm layer (or another per-sample map) by its vjp at the batch, ``vmap``-ed over the ``M`` entries;
    * the output cotangent ``e_a`` is the same for every sample, and so is its pullback through affine
      modules: it is kept once (``M`` rows) until the first elementwise module makes it per-sample.

    No per-sample ``vmap``, no hooks, no zero perturbations. Exact: autograd's formulas of every module, on
    the same values as the general path (tests compare both, and brute-force Jacobians, at 1e-9 in float64).
    """

    def __init__(self, links: list[_Link], first: int, probe: Probe, geo: dict[str, list], calls: list):
        self.links, self.first, self.probe, self.geo = links, first, probe, geo
        self.calls = calls  # (link index, module, per-sample output shape with a leading 1, dtype) per ruled call
        self.structured = set(geo)

    def cotangents(self, x: Tensor, values: dict[str, Tensor], O: tuple[int, ...]) -> list[tuple]:
        """``(module, y shape, G (n, M, *y shape), record (n, 1, *input shape), factors)`` per ruled call, in call
        order; ``factors`` is ``(U (M, *s), D (n, *s))`` with ``G = U ⊙ D`` when ``G`` is the output cotangent
        pulled back through affine modules (the same for every sample) and then one elementwise module."""
        n, M = x.shape[0], math.prod(O)
        h = x
        back: list[tuple[int, Any, tuple]] = []  # (link index, its pullback data, its input's per-sample shape)
        recs: dict[int, Tensor] = {}
        for k, link in enumerate(self.links):
            if link.record is not None and link.local:
                recs[k] = link.record(link.module, h)
            s_in = tuple(h.shape[1:])
            if k <= self.first:
                h = link(h, values)
                if k == self.first:
                    back.append((k, None, s_in))
                continue

            def call(t: Tensor, link: _Link = link) -> Tensor:
                return link(t, values)

            data: Any = None
            if link.kind == "affine":  # the pullback of a row does not depend on the input: at one sample
                h_out = call(h)
                data = _row_pullback(link, values, h.dim(), h_out.dim()) or torch.func.vjp(call, h[:1])[1]
                h = h_out
            elif link.kind == "diag" and type(link.module) is nn.ReLU:
                h = call(h)
                data = (h > 0).to(h.dtype)  # relu'(z) = [z > 0] = [relu(z) > 0], autograd's value at 0 too
            elif link.kind == "diag":
                h, fn = torch.func.vjp(call, h)[:2]
                data = fn(torch.ones_like(h))[0]  # φ'(z): the Jacobian is diagonal
            elif link.kind in ("norm", "vjp"):
                h, data = torch.func.vjp(call, h)[:2]
            else:  # "same", "flatten"
                h = call(h)
            back.append((k, data, s_in))
        G = torch.eye(M, dtype=h.dtype, device=h.device).reshape((M,) + O)
        shared = True  # G is (M, *s), the same for every sample; else (n, M, *s)
        fac: Optional[tuple[Tensor, Tensor]] = None  # (U, D) with G = U[None] * D[:, None], when known
        cot: dict[int, tuple[Tensor, Optional[tuple[Tensor, Tensor]]]] = {}
        for k, data, s_in in reversed(back):
            if k in recs:
                cot[k] = (G.expand((n,) + tuple(G.shape)) if shared else G, fac)
            if data is None and k == back[0][0]:
                break
            kind = self.links[k].kind
            lead = (M,) if shared else (n, M)
            if kind == "affine" and isinstance(data, _RowPullback):
                G = data(G.reshape(-1, G.shape[-1])).reshape(lead + s_in)
            elif kind == "affine":
                rows = G.reshape((-1, 1) + tuple(G.shape[len(lead) :]))
                (G,) = torch.func.vmap(data)(rows)
                G = G.reshape(lead + s_in)
            elif kind == "diag":
                fac = (G, data) if shared else None
                G = (G.unsqueeze(0) if shared else G) * data.unsqueeze(1)
                shared = False
            elif kind in ("norm", "vjp"):
                g = G.expand((n,) + tuple(G.shape)) if shared else G
                (G,) = torch.func.vmap(data, in_dims=1, out_dims=1)(g)
                G, shared = G.contiguous(), False
            elif kind == "flatten":
                G = G.reshape(lead + s_in)
            if kind not in ("diag", "same"):
                fac = None
        out = []
        for k, m, yshape, _ in self.calls:
            g, f = cot[k]
            out.append((m, yshape, g.reshape((n, M) + yshape), recs[k].unsqueeze(1), f))
        return out


def plan_chain(model: nn.Module, params: dict[str, Tensor], fixed: dict[str, Tensor], x1: Tensor) -> Optional[_Chain]:
    """The :class:`_Chain` analysis of ``model`` on inputs like ``x1``, or None when the model is not such a
    chain (then the general analysis applies: probe passes, the batch-independence check, hooks). Any error of
    the model on one sample also gives None, so that the general path reports it."""
    if any(getattr(torch.nn.modules.module, h, None) for h in _GLOBAL_HOOKS):
        return None
    mods = _chain_modules(model)
    if not mods:
        return None
    canon: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        canon.setdefault(id(p), name)
    links: list[_Link] = []
    owned: set[str] = set()
    for m in mods:
        kind = _kind(m)
        if kind is None or any(True for _ in m.children()):
            return None
        state = {ln: canon[id(p)] for ln, p in m.named_parameters(recurse=False)}
        local = {ln: c for ln, c in state.items() if c in params}
        rule = None
        if kind in ("affine", "norm"):
            try:
                rule = _rule(m)
            except AttributeError:  # a subclass without the settings its stock forward reads
                return None
            if rule is None or not set(local) <= {"weight", "bias"}:
                return None
        elif state:
            return None
        owned |= set(local.values())
        links.append(_Link(m, kind, state, rule, local))
    if owned != set(params):  # a selected parameter the chain does not use
        return None
    first = min((k for k, lk in enumerate(links) if lk.local), default=None)
    if first is None:
        return None
    # shapes only: a batch of no samples (every module checks its inputs, no weight is read, nothing computed)
    values = {**fixed, **params}
    h = x1[:0]
    flops, saved = 0.0, 0
    geo: dict[str, list] = {}
    calls = []
    try:
        with torch.no_grad():
            for k, link in enumerate(links):
                m = cast(Any, link.module)
                if link.kind == "flatten" and not 1 <= m.start_dim % h.dim() <= m.end_dim % h.dim():
                    return None  # it would merge the batch axis
                if link.kind == "norm" and len(tuple(getattr(m, "normalized_shape", ()))) >= h.dim():
                    return None  # it would normalise over the batch axis
                if link.kind == "norm" and h.dim() < 2:
                    return None
                y = link(h, values)
                if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != 0:
                    return None
                s_in, s_out = tuple(h.shape[1:]), tuple(y.shape[1:])
                if link.kind == "affine":
                    flops += 2.0 * math.prod(s_out) * m.weight.shape[-1]
                if link.local:
                    assert link.record is not None and link.uses is not None, "ruled links have a rule"
                    if k > 0:
                        saved += math.prod(s_in) * h.element_size()
                    one = torch.zeros((1,) + s_in, dtype=h.dtype, device=h.device)
                    rec = link.record(m, one).unsqueeze(1)
                    yshape = (1,) + s_out
                    G = torch.zeros((1, 1) + yshape, dtype=y.dtype, device=y.device)
                    got = link.uses(m, rec, G, 1, 1, set(link.local))
                    for ln, c in link.local.items():
                        u = got.get(ln)
                        if u is None or not _describes(_outer(u), params[c].numel()):
                            return None
                        geo.setdefault(c, []).append(_outer(u))
                    calls.append((k, m, yshape, y.dtype))
                h = y
    except Exception:  # the model's own error: the general path reports it
        return None
    if not h.is_floating_point():
        return None
    return _Chain(links, first, Probe(tuple(h.shape[1:]), flops, saved), geo, calls)


# ---------------------------------------------------------------------------------------------------
# the implementation
# ---------------------------------------------------------------------------------------------------
class Structured(Implementation):
    """``implementation="structured"``: see the module docstring."""

    name = "structured"

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        spec: OutSpec,
        pr,
        x1: Tensor,
        fixed: Optional[dict] = None,
        chain: Optional[_Chain] = None,
    ):
        self.model, self.params, self.spec, self.pr = model, params, spec, pr
        self.fixed = fixed or {}
        self.M = math.prod(spec.O)
        self.itemsize = next(iter(params.values())).element_size()
        self.ctx = _Ctx()
        self.chain = chain
        self.mode: dict[str, str] = {}
        self._pair_cost = self._mat_cost = self._feat_elems = self._pair_elems = 0.0
        if chain is not None:  # analysed from the structure (plan_chain): no probe pass, no hooks
            self.mods: list[tuple[nn.Module, Any, Any, dict]] = []
            self.structured: set[str] = set(chain.structured)
            self.generic: list[str] = []
            self.calls: list = [(m, yshape, dt) for _, m, yshape, dt in chain.calls]
            self._plan(chain.geo, x1.shape[0])
            return
        # local parameter name -> canonical name, per candidate module
        canon: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon.setdefault(id(p), name)
        self.mods = []
        for m in model.modules():
            try:
                r = _rule(m)
            except AttributeError:  # a subclass without the settings its stock forward reads: no structure
                r = None
            if r is None:
                continue
            local = {ln: canon[id(p)] for ln, p in m.named_parameters(recurse=False) if canon.get(id(p)) in params}
            if local:
                self.mods.append((m, r[0], r[1], local))
        self.structured = {c for *_, loc in self.mods for c in loc.values()}
        self.generic = [n for n in self.params if n not in self.structured]
        self.calls = []
        if self.structured:
            self._probe(x1)

    @contextlib.contextmanager
    def _hooked(self) -> Iterator[Structured]:
        """Forward hooks on the structured modules for the duration of the block (removed in ``finally``)."""
        handles = []
        try:
            for m, record, _, local in self.mods:
                names = {ln for ln, c in local.items() if c in self.structured}
                pre, post = _hooks(m, record, names, self.ctx)
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post, prepend=True, with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            self.ctx.mode = "off"
            self.ctx.stack.clear()

    def active(self):
        return self._hooked() if self.structured and self.chain is None else contextlib.nullcontext(self)

    # -- analysis ----------------------------------------------------------------------------------
    def has_structure(self) -> bool:
        return bool(self.structured)

    def _probe(self, x1: Tensor) -> None:
        """Which structured parameters are used only by their module's forward; call shapes; geometry."""
        leaves = {n: v.detach() for n, v in self.params.items()}
        owner: dict[int, set] = {}
        for m, _, _, local in self.mods:
            for c in local.values():
                owner.setdefault(id(leaves[c]), set()).add(m)
        reads = _ReadsOutside(self.ctx, {k: _Owners(v) for k, v in owner.items()})
        ctx = self.ctx
        with self.active(), compute_mode():
            ctx.mode, ctx.calls, ctx.outside, ctx.unrecorded = "probe", [], set(), set()
            with reads:
                torch.func.functional_call(self.model, {**self.fixed, **leaves}, (x1[:1],), tie_weights=True)
            ctx.mode = "off"
        # a module whose input was modified in place after the call (``x += lin(x)``): its rule would read the
        # modified values; its parameters are ordinary ones (autograd then refuses the model, as it does for
        # the other implementations)
        ctx.unrecorded |= {id(m) for m, *_, rec, version in ctx.calls if rec._version != version}
        calls, ctx.calls = [c[:4] for c in ctx.calls], []
        rules = {id(m): (uses, local) for m, _, uses, local in self.mods}
        self.structured -= {n for n, v in leaves.items() if id(v) in ctx.outside}
        self.structured -= {c for m, *_, local in self.mods if id(m) in ctx.unrecorded for c in local.values()}
        geo: dict[str, list] = {}
        for m, yshape, ydtype, rec in calls:
            uses, local = rules[id(m)]
            names = {ln for ln, c in local.items() if c in self.structured}
            if not names:
                continue
            G = torch.zeros((1, 1) + yshape, dtype=ydtype)
            try:
                got = uses(m, rec.unsqueeze(0), G, 1, 1, names)
            except Exception:  # the rule cannot describe this call: the module's parameters are ordinary ones
                got = {}
            for ln in names:
                u = got.get(ln)
                if u is None or not _describes(u, self.params[local[ln]].numel()):
                    self.structured.discard(local[ln])
                else:
                    geo.setdefault(local[ln], []).append(u)
        geo = {k: v for k, v in geo.items() if k in self.structured}
        self.structured &= set(geo)  # structured parameters the forward never uses contribute 0
        self.generic = [n for n in self.params if n not in self.structured]
        # the calls that get a perturbation in run mode (those of modules with a structured parameter left),
        # in call order, with the shape and dtype of their outputs
        self.calls = [
            (m, yshape, ydtype)
            for m, yshape, ydtype, _ in calls
            if any(c in self.structured for c in rules[id(m)][1].values())
        ]
        self._plan(geo, x1.shape[0])

    def _plan(self, geo: dict[str, list], n: int) -> None:
        """Per structured parameter: 'pairwise' or 'materialise', the fewer FLOPs for ``n`` samples a side."""
        self.mode = {}
        self._pair_cost, self._mat_cost, self._feat_elems, self._pair_elems = 0.0, 0.0, 0.0, 0.0
        q, per_pair, M = self.spec.q, self.spec.per_pair, self.M
        for name, uses in geo.items():
            P = self.params[name].numel()
            outer = [u for u in uses if isinstance(u, _Outer)]
            if len(outer) == len(uses) and len({u.key() for u in outer}) == 1:
                u0 = outer[0]
                T = sum(u.G.shape[2] for u in outer)
                g, fout = u0.G.shape[3], u0.G.shape[4]
                if u0.ids is not None:
                    fin = 1
                else:
                    assert u0.X is not None, "a weight use without token ids has inputs X"
                    fin = u0.X.shape[3]
                pair = T * T * g * (fin + q * fout + per_pair)  # per (i, j)
                mat_pair, mat_sample = q * P, M * T * g * fout * fin
                # ~n²/2 pairs against n samples (n: the x1 batch)
                self.mode[name] = "pairwise" if n * pair < 2 * mat_sample + n * mat_pair else "materialise"
                if self.mode[name] == "pairwise":
                    self._pair_cost += 2 * pair
                    self._feat_elems += T * g * (fin + M * fout)
                    self._pair_elems += T * T * g * (1 + per_pair)
                    continue
                self._mat_cost += 2 * mat_sample
            else:
                self.mode[name] = "materialise"
            self._pair_cost += 2 * q * P
            self._feat_elems += M * P

    # -- estimates for auto and block sizes ----------------------------------------------------------
    def feature_flops(self) -> float:
        """Per sample: forward, a backward pass per output entry (input cotangents; weight gradients only
        for generic parameters), local Jacobians of materialised parameters."""
        P = sum(p.numel() for p in self.params.values())
        fwd = max(self.pr.flops, 2.0 * P)
        frac = sum(self.params[n].numel() for n in self.generic) / max(P, 1)
        return (1 + self.M * (1 + frac)) * fwd + self._mat_cost

    def pair_flops(self) -> float:  # per (i, j)
        Pg = sum(self.params[n].numel() for n in self.generic)
        return self._pair_cost + 2 * self.spec.q * Pg

    def feature_bytes(self) -> float:
        Pg = sum(self.params[n].numel() for n in self.generic)
        return self.itemsize * (self._feat_elems + self.M * (Pg + self.pr.saved_bytes / self.itemsize + 1))

    def pair_bytes(self) -> float:
        return self.itemsize * (self.spec.per_pair + self._pair_elems)

    # -- features and pairs ---------------------------------------------------------------------------
    def features(self, x: Tensor, params: Optional[dict] = None):
        """Per-sample features of a block: materialised Jacobians and pairwise (X, G) factors. ``params``
        (default: the analysed values) may hold other values, with extra entries such as buffers."""
        params = self.params if params is None else params
        n, M, O = x.shape[0], self.M, self.spec.O
        direct: dict[str, Tensor] = {}
        if self.chain is not None:
            calls = self.chain.cotangents(x, {**self.fixed, **params}, O)
            rules = {id(lk.module): (lk.uses, lk.local) for lk in self.chain.links if lk.local}
        else:
            dJ, calls = self._jacrev(x, params)
            direct = {k: v.reshape(n, M, -1) for k, v in dJ.items()}
            rules = {id(m): (uses, local) for m, _, uses, local in self.mods}
        outer: dict[str, list] = {}
        for m, _yshape, G, rec, fac in calls:
            uses, local = rules[id(m)]
            assert uses is not None, "every recorded call is of a module with a rule"
            names = {ln for ln, c in local.items() if c in self.structured}
            for ln, u in uses(m, rec, G, n, M, names).items():
                name = local[ln]
                if isinstance(u, _Outer) and self.mode[name] == "pairwise":
                    if fac is not None and _same_layout(m, u, G, fac):
                        u.factors = fac
                    outer.setdefault(name, []).append(u)
                else:
                    j = u.materialise() if isinstance(u, _Outer) else u
                    direct[name] = direct[name] + j if name in direct else j
        pw = []

        def cat(ts, dim):
            return ts[0] if len(ts) == 1 else torch.cat(ts, dim)

        for us in outer.values():
            G = cat([u.G for u in us], 2)
            if us[0].ids is not None:
                pw.append((None, cat([u.ids for u in us], 1), G, None))
            else:
                pw.append((cat([u.X for u in us], 1), None, G, us[0].factors if len(us) == 1 else None))
        return [v.reshape((n,) + O + (-1,)) for v in direct.values()], pw

    def _jacrev(self, x: Tensor, params: dict) -> tuple[dict, list]:
        """The general path: per sample (``vmap``), the Jacobian of ``f`` with respect to zero perturbations of
        the structured calls' outputs (their cotangents) and to the generic parameters, the structured modules'
        inputs recorded by the hooks. Returns the generic Jacobians and ``(module, y shape, G, record, None)`` per
        call."""
        n, M = x.shape[0], self.M
        f = single_fn(self.model)
        ctx = self.ctx
        gparams = {k: params[k] for k in self.generic}
        svals = {**self.fixed, **{k: v for k, v in params.items() if k not in gparams}}
        deltas = [torch.zeros(s, dtype=dt, device=x.device) for _, s, dt in self.calls]

        def fs(deltas, gp, xi):
            ctx.mode, ctx.deltas, ctx.records = "run", deltas, []
            try:
                out = f({**gp, **svals}, xi)
            finally:
                ctx.mode = "off"
            recs = tuple(ctx.records)
            ctx.records, ctx.deltas = [], []
            return out, recs

        jac = torch.func.jacrev(fs, argnums=(0, 1), has_aux=True)
        (dG, dJ), recs = torch.func.vmap(jac, in_dims=(None, None, 0))(deltas, gparams, x)
        calls = [
            (m, yshape, G.reshape((n, M) + yshape), rec, None) for (m, yshape, _), G, rec in zip(self.calls, dG, recs)
        ]
        return dJ, calls

    def pair(self, f1, f2) -> Tensor:
        """Kernel block (traced axes summed, not yet averaged): materialised Jacobians contracted, plus
        ``Σ_{t,s} (X1 X2ᵀ)[t, s] (G1 G2ᵀ)[t, s]`` for each pairwise parameter."""
        (d1, p1), (d2, p2) = f1, f2
        spec = self.spec
        out = None
        for a, b in zip(d1, d2):
            c = spec.contract(a, b)
            out = c if out is None else out + c
        bd = spec.batch_diag
        xx_out = "itsg" if bd else "ijtsg"
        for (X1, i1, G1, fac1), (X2, i2, G2, fac2) in zip(p1, p2):
            if X1 is not None:
                xx = torch.einsum(f"itgc,{'i' if bd else 'j'}sgc->{xx_out}", X1, X2)
            else:
                eq = i1[:, :, None] == i2[:, None, :] if bd else i1[:, None, :, None] == i2[None, :, None, :]
                xx = eq.to(G1.dtype).unsqueeze(-1)
            n1, n2 = G1.shape[0], G2.shape[0]
            g1 = G1.reshape((n1,) + spec.O + tuple(G1.shape[2:]))
            g2 = G2.reshape((n2,) + spec.O + tuple(G2.shape[2:]))
            if xx.shape[-3] == 1 and xx.shape[-2] == 1 and xx.shape[-1] == 1:
                # one position and one group (dense layers): (x1·x2) times (G1 G2ᵀ), accumulated in place
                if fac1 is not None and fac2 is not None and spec.per_pair == 1:
                    # every output axis traced and G = U ⊙ D: Σ_{a,d} G1[i,a,d] G2[j,a,d] = Σ_d w[d] D1[i,d] D2[j,d]
                    # with w = Σ_a U1[a] U2[a] (one (n1, fout) x (fout, n2) product instead of (n1, M·fout) x ...)
                    (U1, D1), (U2, D2) = fac1, fac2
                    dw = D1 * (U1 * U2).sum(0)
                    gg = (dw * D2).sum(-1) if bd else dw @ D2.T
                else:
                    gg = torch.einsum(f"{spec.s1}d,{spec.s2}d->{spec.out}", g1[..., 0, 0, :], g2[..., 0, 0, :])
                w = xx.reshape(xx.shape[:-3] + (1,) * (gg.dim() - xx.dim() + 3))
                # out of place: under vmap over models (:mod:`ntkit.monte_carlo`) a shared cotangent makes ``gg``
                # unbatched while ``w`` is batched, and an in-place product would be refused
                gg = gg * w
                out = gg if out is None else out + gg
                continue
            gg = torch.einsum(f"{spec.s1}tgd,{spec.s2}sgd->{spec.out}tsg", g1, g2)
            c = torch.einsum(f"{spec.out}tsg,{xx_out}->{spec.out}", gg, xx)
            out = c if out is None else out + c
        assert out is not None, "every selected parameter contributes a materialised or a pairwise block"
        return out
