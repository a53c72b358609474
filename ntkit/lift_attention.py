"""Lifting sequence models: ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``/``Encoder``, ``nn.Embedding``,
and inputs in the model's own layout (used by :func:`ntkit.lift`).

Layouts. A torch sequence model reads ``(N, L, E)`` (``batch_first=True``), ``(L, N, E)`` (``batch_first=False``)
or token ids ``(N, L)`` / ``(L, N)`` (``nn.Embedding``); ntkit's layers read ``(N, C, L)`` (channels axis 1). The
lifted net (:class:`SequenceInputNet`) takes what the model's ``forward`` takes and moves the features to axis 1
(ids become one-hot vectors over the vocabulary) before its kernel runs; inside, every graph value remembers its
torch layout (:class:`SequenceGraph`), so that ``nn.Linear`` on ``(N, L, E)`` is a ``Dense`` on the features of
each token, ``x.mean(1)`` over the tokens a ``GlobalAvgPool``, ``x.flatten(1)`` a ``Flatten``, ``x[:, 0]`` (a
CLS token) an ``Index`` of the token axis and ``x.transpose(0, 1)`` a change of layout; an axis-dependent call lift
cannot place is refused. The kernel is that of the model's output, traced over output features as NT does:
``(N1, N2, L, L)`` for a sequence output, ``(N1, N2)`` after pooling, flattening or picking one token.

Modules (PyTorch's default initialisation, the limit of every hidden width → ∞):

* ``nn.Embedding(V, E)``: ``W ~ N(0, 1)``, so the embeddings of tokens ``a, b`` have covariance ``δ_ab`` per
  feature (``0`` for ``padding_idx``, whose row is zero). With the ids one-hot encoded (``x·x'/V = δ/V``) this is
  exactly ``Dense(E, W_std=√V, parameterization="standard")``.
* ``nn.MultiheadAttention(E, H)`` (self-attention, ``attn(x, x, x)[0]``): ``in_proj_weight`` is
  ``xavier_uniform_`` on ``(3E, E)``: variance ``2/(E + 3E) = 1/(2E)``, i.e. ``W_std² = 1/2`` for the queries,
  keys and values; ``out_proj`` is a default ``nn.Linear`` (``W_std² = 1/3``); both biases are zero
  (``_reset_parameters``). The logits ``q·k/√(E/H)`` keep the ``1/sqrt(d)`` scaling: the kernel is
  :class:`~ntkit.layers.GlobalSelfAttention` with SOFTMAX and ``linear_scaling=False``, ``σ_QK² = 1/4``,
  ``σ_OV² = 1/6`` — the quasi-Monte-Carlo rule of Hron et al. 2020 (NNGP only; the NTK raises).
* ``nn.TransformerEncoderLayer``: ``x ← LN₁(x + SA(x))``, ``x ← LN₂(x + FF(x))`` (``norm_first``:
  ``x ← x + SA(LN₁(x))``, ``x ← x + FF(LN₂(x))``), ``FF = linear2 ∘ act ∘ linear1`` (ReLU or GELU), dropout the
  identity (eval mode). In the limit ``LayerNorm`` over the features divides each token by its own standard
  deviation (:class:`~ntkit.layers.LayerNorm` on axis 1), the residual sums add kernels (the attention and FF
  outputs are fresh zero-mean Gaussians) and the hidden biases vanish (their fan-in grows). The residual stream
  must have a growing width: a layer fed by the model's raw input (fixed ``d_model``) is refused.
* ``nn.TransformerEncoder``: its layers in sequence, then its optional final norm. It deep-copies its layer, so
  as constructed all its layers have the *same* weights; weights reused across depth correlate the layers through
  the residual stream (a different limit), so lift refuses identical layers and asks for an independent
  re-initialisation of each (then the layers are independent and the kernel is the composition).

What grows. The lift's kernel is the limit ``d_model, dim_feedforward, nhead → ∞`` with ``d_head = d_model/nhead
→ ∞`` (Hron et al.'s limit: a Gaussian process). At a fixed ``nhead`` the softmax weights are shared by the
channels of a head and the attention output is a Gaussian *mixture*: its covariance is still the rule's, but
layers after it (FF, LayerNorm) see a random conditional kernel, and the lift is then an approximation whose error
falls as the heads grow (measured in ``/work/wip/attention.md``).

Masks (``attn_mask``, ``key_padding_mask``, ``src_mask``, ``is_causal``), cross-attention, ``kdim``/``vdim``,
``add_bias_kv``, ``add_zero_attn``, dropout in train mode and ``max_norm`` embeddings are refused with a
:class:`~ntkit.layers.base.LiftError` naming the fix.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit.layers import (
    Dense,
    FanInSum,
    FanOut,
    Flatten,
    GlobalAvgPool,
    GlobalSelfAttention,
    Identity,
    Index,
    LayerNorm,
)
from ntkit.layers.base import LIFT_RULES, Layer, LayerError, LayoutWarning, LiftError, LiftOptions
from ntkit.nets import Net, parallel, serial

__all__ = ["SEQUENCE_MODULES", "SequenceGraph", "SequenceInputNet", "is_sequence_model", "LAYOUTS"]

#: torch modules whose presence makes a model a sequence model (its input in the model's own layout)
SEQUENCE_MODULES: tuple[type, ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerEncoder,
    nn.Embedding,
)
#: torch layouts of the lifted net's input: features last, batch first / sequence first; token ids
LAYOUTS = ("NLE", "LNE", "ids_NL", "ids_LN")
_ATTENTION = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
_FIX = "or use ntkit.empirical.empirical_ntk for the finite-width NTK of any module"


def is_sequence_model(model: nn.Module) -> bool:
    """Whether ``model`` contains a module of :data:`SEQUENCE_MODULES` (then lift reads its input layout)."""
    return any(isinstance(m, SEQUENCE_MODULES) for m in model.modules())


def _batch_first(model: nn.Module) -> bool:
    """The ``batch_first`` of the model's attention modules (all must agree); ``True`` without attention."""
    flags: dict[bool, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            flags.setdefault(bool(m.batch_first), name or type(m).__name__)
    if len(flags) > 1:
        raise LiftError(
            f"the model mixes batch_first=True ({flags[True]}) and batch_first=False ({flags[False]}) attention "
            f"modules, so lift cannot tell the layout of its input. Fix: use one batch_first everywhere, {_FIX}."
        )
    return next(iter(flags), True)


def _input_layout(model: nn.Module) -> str:
    bf = _batch_first(model)
    if any(isinstance(m, nn.Embedding) for m in model.modules()):
        return "ids_NL" if bf else "ids_LN"
    return "NLE" if bf else "LNE"


# ---------------------------------------------------------------------------------------------------
# the lifted net: inputs in the model's layout
# ---------------------------------------------------------------------------------------------------
class SequenceInputNet(Net):
    """The lifted net of a sequence model: ``kernel_fn`` takes the model's own inputs (``layout``, one of
    :data:`LAYOUTS`) and runs ``inner`` (ntkit's ``(N, C, L)`` layout) on them; see the module docstring.

    ``"NLE"``: ``(N, L, E)`` floats; ``"LNE"``: ``(L, N, E)``; ``"ids_NL"``/``"ids_LN"``: integer token ids
    ``(N, L)``/``(L, N)`` in ``[0, vocab)``, one-hot encoded (the ``padding_idx`` column zero: the padding token's
    embedding is the zero vector) in ``torch.get_default_dtype()``. ``kernel(k)``, ``build`` and ``module`` are the
    inner net's, in ntkit's layout (the finite twin reads ``(N, C, L)``)."""

    def __init__(self, inner: Net, layout: str, vocab: Optional[int] = None, padding_idx: Optional[int] = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}: choose one of {LAYOUTS}.")
        if layout.startswith("ids") and not (isinstance(vocab, int) and vocab > 0):
            raise ValueError("token-id layouts need the vocabulary size vocab=V.")
        self.inner, self.layout, self.vocab, self.padding_idx = inner, layout, vocab, padding_idx

    def sublayers(self):
        return (self.inner,)

    def _with_sublayers(self, layers):
        (inner,) = layers
        return SequenceInputNet(inner, self.layout, self.vocab, self.padding_idx)

    def kernel(self, k):
        return self.inner.kernel(k)

    def build(self, in_shape, width, generator, readout):
        return self.inner.build(in_shape, width, generator, readout)

    def input_rank(self) -> Optional[int]:
        return None

    def to_ntkit(self, x: Any) -> Optional[Tensor]:
        """The model's input ``x`` in ntkit's ``(N, C, L)`` layout (``None`` stays ``None``)."""
        if x is None:
            return None
        x = torch.as_tensor(x)
        if self.layout.startswith("ids"):
            if x.dim() != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                want = "(N, L)" if self.layout == "ids_NL" else "(L, N)"
                raise LayerError(
                    f"this lifted model starts with nn.Embedding: give integer token ids {want}, got "
                    f"{'a ' + str(x.dtype) if x.is_floating_point() else 'shape ' + str(tuple(x.shape))} tensor."
                )
            assert self.vocab is not None, "ids layouts carry the vocabulary size"
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab):
                raise LayerError(
                    f"token ids must lie in [0, {self.vocab}) (the Embedding's num_embeddings); got ids from "
                    f"{int(x.min())} to {int(x.max())}."
                )
            ids = x if self.layout == "ids_NL" else x.T
            onehot = F.one_hot(ids.long(), self.vocab).to(torch.get_default_dtype())  # (N, L, V)
            if self.padding_idx is not None:
                onehot[..., self.padding_idx] = 0.0
            return onehot.permute(0, 2, 1).contiguous()
        if x.dim() != 3:
            want = "(N, L, E) (batch_first=True)" if self.layout == "NLE" else "(L, N, E) (batch_first=False)"
            raise LayerError(f"this lifted sequence model takes {want} inputs, got shape {tuple(x.shape)}.")
        return (x.permute(0, 2, 1) if self.layout == "NLE" else x.permute(1, 2, 0)).contiguous()

    def kernel_fn(self, x1: Any, x2: Any = None, get: Any = ("nngp", "ntk"), **kwargs: Any):
        """The kernels of the model's output between the model inputs ``x1`` and ``x2`` (its own layout; see
        the class docstring); otherwise :meth:`ntkit.nets.Net.kernel_fn`."""
        a, b = self.to_ntkit(x1), self.to_ntkit(x2)
        with warnings.catch_warnings():  # (N, C, L) is ntkit's layout by construction: no layout guess to warn of
            warnings.simplefilter("ignore", LayoutWarning)
            return self.inner.kernel_fn(a, b, get, **kwargs)

    def __repr__(self):
        return f"SequenceInputNet({self.inner!r}, layout={self.layout!r})"


# ---------------------------------------------------------------------------------------------------
# module rules
# ---------------------------------------------------------------------------------------------------
def _read_std(opts_value: Any, param: Optional[Tensor], init: str, default2: float, fan_in: int) -> Optional[float]:
    """``W_std`` (or ``b_std`` with ``fan_in = 1``): ``default2`` is its square under PyTorch's init."""
    if param is None:
        return None
    if isinstance(opts_value, (int, float)) and not isinstance(opts_value, bool):
        return float(opts_value)
    p = param.detach().double()
    if opts_value == "empirical":
        return float(p.pow(2).mean().sqrt()) * math.sqrt(fan_in)
    if init == "weights":
        return math.sqrt(float(p.var(correction=0)) * fan_in)
    return math.sqrt(default2)


def _check_eval(m: nn.Module, p: float, qualname: str) -> None:
    if m.training and p > 0:
        raise LiftError(
            f"{qualname} ({type(m).__name__}) is in train mode with dropout p={p}: dropout makes the kernel that of a "
            f"random thinning, not the model at initialisation. Fix: call model.eval() (dropout is then the "
            f"identity), {_FIX}."
        )


def lift_embedding(m: nn.Embedding, qualname: str, opts: LiftOptions, init: str) -> Layer:
    """``nn.Embedding(V, E)`` on one-hot ids: ``Dense(E, W_std=√V·σ, parameterization="standard")`` (σ = 1 under
    PyTorch's ``N(0, 1)`` init; ``init="weights"``: the weight's standard deviation)."""
    if m.max_norm is not None:
        raise LiftError(
            f"{qualname} (nn.Embedding(max_norm={m.max_norm})) renormalises embeddings whose norm exceeds max_norm, "
            f"a data-dependent map with no infinite-width kernel. Fix: max_norm=None, {_FIX}."
        )
    w = m.weight
    if m.padding_idx is not None:
        w = torch.cat([w[: m.padding_idx], w[m.padding_idx + 1 :]], 0)
    sigma = _read_std(opts.W_std, w, init, 1.0, 1)
    assert sigma is not None
    return Dense(m.embedding_dim, W_std=math.sqrt(m.num_embeddings) * sigma, b_std=None, parameterization="standard")


def lift_multihead_attention(m: nn.MultiheadAttention, qualname: str, opts: LiftOptions, init: str) -> Layer:
    """``nn.MultiheadAttention`` (self-attention) -> SOFTMAX :class:`~ntkit.layers.GlobalSelfAttention` at the
    ``1/sqrt(d_head)`` scaling (see the module docstring for the init read)."""
    if not m._qkv_same_embed_dim:
        raise LiftError(
            f"{qualname} (nn.MultiheadAttention(kdim={m.kdim}, vdim={m.vdim})) has separate key/value widths; lift "
            f"maps self-attention attn(x, x, x) only. Fix: kdim = vdim = embed_dim, {_FIX}."
        )
    if m.bias_k is not None or m.add_zero_attn:
        raise LiftError(
            f"{qualname}: add_bias_kv / add_zero_attn append extra key/value positions, which ntkit's attention "
            f"kernel does not have. Fix: add_bias_kv=False, add_zero_attn=False, {_FIX}."
        )
    _check_eval(m, float(m.dropout), qualname)
    E, H = m.embed_dim, m.num_heads
    w = m.in_proj_weight
    assert w is not None
    wq, wk, wv = w[:E], w[E : 2 * E], w[2 * E :]
    sq, sk, sv = (_read_std(opts.W_std, t, init, 0.5, E) for t in (wq, wk, wv))
    so = _read_std(opts.W_std, m.out_proj.weight, init, 1 / 3, E)
    b_std: Optional[float] = None
    if m.in_proj_bias is not None and init == "weights":
        bq, bk, bv = m.in_proj_bias[:E], m.in_proj_bias[E : 2 * E], m.in_proj_bias[2 * E :]
        if float(bq.detach().abs().max()) > 0 or float(bk.detach().abs().max()) > 0:
            raise LiftError(
                f"{qualname}: its query/key biases are not zero; they add terms to the logits that ntkit's attention "
                f"kernel does not have (PyTorch initialises them to zero). Fix: zero them (or lift with "
                f"init='default'), {_FIX}."
            )
        v2 = float(bv.detach().double().var(correction=0))
        ob = m.out_proj.bias
        o2 = 0.0 if ob is None else float(ob.detach().double().var(correction=0))
        assert so is not None
        b2 = so * so * v2 + o2  # Σ_t A[s, t] = 1: a value bias b_v passes through the weights as W_O b_v
        b_std = math.sqrt(b2) if b2 > 0 else None
    assert sq is not None and sk is not None and sv is not None and so is not None
    return GlobalSelfAttention(
        E,
        max(E // H, 1),
        max(E // H, 1),
        H,
        linear_scaling=False,
        W_query_std=sq,
        W_key_std=sk,
        W_value_std=sv,
        W_out_std=so,
        b_std=b_std,
        attention_mechanism="SOFTMAX",
    )


def _lift_linear(lin: nn.Linear, opts: LiftOptions, init: str) -> Layer:
    """A hidden ``nn.Linear`` inside an encoder layer: its fan-in grows, so its default-init bias vanishes."""
    fan_in = lin.in_features
    W = _read_std(opts.W_std, lin.weight, init, 1 / 3, fan_in)
    b: Optional[float] = None
    if lin.bias is not None:
        if isinstance(opts.b_std, (int, float)) and not isinstance(opts.b_std, bool):
            b = float(opts.b_std)
        elif opts.b_std == "empirical":
            b = float(lin.bias.detach().double().pow(2).mean().sqrt())
        elif init == "weights":
            b = math.sqrt(float(lin.bias.detach().double().var(correction=0)))
        else:
            b = 0.0  # bias variance 1/(3·fan_in) → 0
    assert W is not None
    return Dense(lin.out_features, W_std=W, b_std=b, parameterization="standard")


def _lift_layernorm(ln: nn.Module, qualname: str, init: str) -> Layer:
    assert isinstance(ln, nn.LayerNorm)
    if len(ln.normalized_shape) != 1:
        raise LiftError(
            f"{qualname} (nn.LayerNorm{tuple(ln.normalized_shape)}) normalises over several axes of a sequence; lift "
            f"maps a LayerNorm over the features (normalized_shape=(E,)) only. Fix: normalise the features, {_FIX}."
        )
    if init == "weights" and ln.elementwise_affine:
        ok = bool((ln.weight == 1).all()) and (ln.bias is None or bool((ln.bias == 0).all()))
        if not ok:
            raise LiftError(
                f"{qualname}: its affine weight/bias differ from PyTorch's init (1, 0); per-feature trained values "
                f"have no infinite-width limit. Fix: ln.reset_parameters(), or lift with init='default', {_FIX}."
            )
    return LayerNorm(axis=1, eps=float(ln.eps))


def _activation(act: Any, qualname: str, opts: LiftOptions) -> Layer:
    if act is F.relu:
        return LIFT_RULES[nn.ReLU](nn.ReLU(), opts)
    if act is F.gelu:
        return LIFT_RULES[nn.GELU](nn.GELU(), opts)
    if isinstance(act, nn.Module) and type(act) in LIFT_RULES:
        return LIFT_RULES[type(act)](act, opts)
    raise LiftError(
        f"{qualname}: activation {act!r} has no lift rule; use activation='relu' or 'gelu' (or a supported "
        f"activation module), {_FIX}."
    )


def _residual(branch: Layer) -> Layer:
    """``x + branch(x)`` (the branch's output is a fresh zero-mean Gaussian: the kernels add)."""
    return serial(FanOut(2), parallel(Identity(), branch), FanInSum())


def lift_encoder_layer(m: nn.TransformerEncoderLayer, qualname: str, opts: LiftOptions, init: str) -> Layer:
    """``nn.TransformerEncoderLayer`` (post-norm or ``norm_first``) -> its residual graph of kernel layers."""
    attn = m.self_attn
    sa = lift_multihead_attention(attn, f"{qualname}.self_attn", opts, init)
    for name in ("dropout", "dropout1", "dropout2"):
        d = getattr(m, name)
        _check_eval(d, float(d.p), f"{qualname}.{name}")
    ff = serial(
        _lift_linear(m.linear1, opts, init),
        _activation(m.activation, f"{qualname}.activation", opts),
        _lift_linear(m.linear2, opts, init),
    )
    ln1 = _lift_layernorm(m.norm1, f"{qualname}.norm1", init)
    ln2 = _lift_layernorm(m.norm2, f"{qualname}.norm2", init)
    if m.norm_first:
        return serial(_residual(serial(ln1, sa)), _residual(serial(ln2, ff)))
    return serial(_residual(sa), ln1, _residual(ff), ln2)


def lift_encoder(m: nn.TransformerEncoder, qualname: str, opts: LiftOptions, init: str) -> Layer:
    """``nn.TransformerEncoder``: its layers in sequence, then its optional final norm."""
    for i in range(1, len(m.layers)):
        if all(torch.equal(a, b) for a, b in zip(m.layers[0].parameters(), m.layers[i].parameters())):
            raise LiftError(
                f"{qualname} (nn.TransformerEncoder): layers 0 and {i} have identical parameters — "
                f"nn.TransformerEncoder deep-copies its encoder layer, so all its layers start from the same weights. "
                f"Reusing weights across depth correlates the layers' outputs through the residual stream (extra "
                f"cross terms), a different infinite-width limit that ntkit does not compute. Fix: initialise each "
                f"layer independently, e.g. `for layer in {qualname or 'encoder'}.layers: "
                f"layer.self_attn._reset_parameters(); layer.linear1.reset_parameters(); "
                f"layer.linear2.reset_parameters()`, {_FIX}."
            )
    layers: list[Layer] = [
        lift_encoder_layer(layer, f"{qualname}.layers.{i}", opts, init) for i, layer in enumerate(m.layers)
    ]
    if m.norm is not None:
        layers.append(_lift_layernorm(m.norm, f"{qualname}.norm", init))
    return serial(*layers)


def lift_sequence_module(m: nn.Module, qualname: str, opts: LiftOptions, init: str) -> Layer:
    """The kernel layer of one module of :data:`SEQUENCE_MODULES`."""
    if isinstance(m, nn.Embedding):
        return lift_embedding(m, qualname, opts, init)
    if isinstance(m, nn.MultiheadAttention):
        return lift_multihead_attention(m, qualname, opts, init)
    if isinstance(m, nn.TransformerEncoderLayer):
        return lift_encoder_layer(m, qualname, opts, init)
    if isinstance(m, nn.TransformerEncoder):
        return lift_encoder(m, qualname, opts, init)
    raise LiftError(f"{qualname} ({type(m).__name__}) is not a sequence module.")


# ---------------------------------------------------------------------------------------------------
# the graph: layouts per value
# ---------------------------------------------------------------------------------------------------
#: calls that act on each entry (or sum/multiply values of one layout): the layout passes through
_ELEMENTWISE = {
    torch.relu,
    F.relu,
    F.gelu,
    torch.tanh,
    F.tanh,
    torch.sigmoid,
    F.sigmoid,
    F.silu,
    F.leaky_relu,
    F.dropout,
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    torch.add,
    torch.mul,
    "relu",
    "tanh",
    "sigmoid",
    "contiguous",
}
#: modules that act on the features of each token (or on each entry): the layout passes through
_FEATUREWISE = (nn.Linear, nn.Dropout, nn.Identity)


@dataclasses.dataclass
class SeqNode:
    """One graph node translated by :class:`SequenceGraph`: ``layer`` applied to the values ``inputs``."""

    layer: Layer
    inputs: list[torch.fx.Node]
    torch_op: str
    note: str
    widens: bool  # the node's output width grows with the model's hidden widths (later biases are hidden)


class SequenceGraph:
    """Tracks the torch layout of every value of a traced sequence model and translates the nodes whose meaning
    depends on it (see the module docstring). ``translate(n, hidden)`` returns a :class:`SeqNode`, or ``None``
    for a node the generic lift maps unchanged (it acts per token on the features, or the model is not a sequence
    model); a call it cannot place raises :class:`~ntkit.layers.base.LiftError`."""

    def __init__(self, model: nn.Module, opts: LiftOptions, init: str):
        self.model, self.opts, self.init = model, opts, init
        self.active = is_sequence_model(model)
        self.layout = _input_layout(model) if self.active else ""
        self.vocab: Optional[int] = None
        self.padding_idx: Optional[int] = None
        self.layouts: dict[str, Optional[str]] = {}  # value name -> "NLE" | "LNE" | "ids_NL" | "ids_LN" | None
        self.tuples: dict[str, str] = {}  # MultiheadAttention outputs (a tuple) -> the layout of element 0

    # -- helpers ---------------------------------------------------------------------------------------
    def _layout_of(self, a: Any) -> Optional[str]:
        if not isinstance(a, torch.fx.Node):
            return None
        if a.op == "placeholder":
            return self.layout
        return self.layouts.get(a.name)

    def _where(self, n: torch.fx.Node) -> str:
        t = n.target
        name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        return f"{n.target}" if n.op == "call_module" else f"{name} (graph node {n.name!r})"

    def _refuse(self, n: torch.fx.Node, layout: str, why: str) -> LiftError:
        shape = {"NLE": "(N, L, E)", "LNE": "(L, N, E)"}.get(layout, "token ids")
        return LiftError(f"{self._where(n)} on a sequence value {shape}: {why} Fix: {_FIX}.")

    @staticmethod
    def _srcs(n: torch.fx.Node) -> list[torch.fx.Node]:
        a = n.args[0] if n.args else None
        if not isinstance(a, torch.fx.Node):
            raise LiftError(f"graph node {n.name!r} is not called on a tensor value.")
        return [a]

    @staticmethod
    def _dims(n: torch.fx.Node) -> Optional[tuple[int, ...]]:
        dim: Any = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if dim is None:
            return None
        return tuple(int(d) for d in dim) if isinstance(dim, (tuple, list)) else (int(dim),)

    # -- the translation ---------------------------------------------------------------------------------
    def translate(self, n: torch.fx.Node, hidden: dict[str, bool]) -> Optional[SeqNode]:
        """See the class docstring; ``hidden``: lift's per-value flag "a width-growing layer lies before it"."""
        if not self.active or n.op not in ("call_module", "call_function", "call_method"):
            return None
        args = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.fx.Node)]
        if n.op == "call_function" and n.target is operator.getitem and args and args[0].name in self.tuples:
            if n.args[1] != 0:
                raise LiftError(
                    f"{self._where(n)} reads element {n.args[1]} of nn.MultiheadAttention's output (the attention "
                    f"weights), which has no kernel. Fix: use element 0, the attention output, {_FIX}."
                )
            self.layouts[n.name] = self.tuples[args[0].name]
            return SeqNode(Identity(), [args[0]], "getitem 0", "the attention output", False)
        if n.op == "call_module":
            m = self.model.get_submodule(str(n.target))
            if isinstance(m, SEQUENCE_MODULES):
                return self._module(n, m, hidden)
        layouts = {self._layout_of(a) for a in args} - {None}
        if not layouts:
            return None  # no sequence value involved: the generic lift maps it
        if len(layouts) > 1:
            raise LiftError(
                f"{self._where(n)} combines values of different layouts {sorted(map(str, layouts))}; lift cannot "
                f"align their axes. Fix: transpose them to one layout, {_FIX}."
            )
        layout = str(next(iter(layouts)))
        if layout.startswith("ids"):
            raise self._refuse(n, layout, "token ids can only go into nn.Embedding.")
        if n.op == "call_module":
            return self._featurewise_module(n, layout)
        return self._call(n, layout, args)

    def _module(self, n: torch.fx.Node, m: nn.Module, hidden: dict[str, bool]) -> SeqNode:
        qualname = str(n.target)
        src = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
        if not isinstance(src, torch.fx.Node):
            raise LiftError(f"{qualname} ({type(m).__name__}) is not called on a tensor value.")
        layout = self._layout_of(src)
        if isinstance(m, nn.Embedding):
            if layout not in ("ids_NL", "ids_LN") or src.op != "placeholder":
                raise LiftError(
                    f"{qualname} (nn.Embedding) must read the model's input (token ids); here it reads "
                    f"{src.name!r}. Fix: embed the input ids directly, {_FIX}."
                )
            if len(n.args) != 1 or n.kwargs:
                raise LiftError(f"{qualname} (nn.Embedding) is called with extra arguments; call it on the ids only.")
            if self.vocab not in (None, m.num_embeddings):
                raise LiftError(f"{qualname}: two Embeddings of different vocabularies read the input ids.")
            self.vocab, self.padding_idx = m.num_embeddings, m.padding_idx
            self.layouts[n.name] = "NLE" if layout == "ids_NL" else "LNE"
            layer = lift_embedding(m, qualname, self.opts, self.init)
            return SeqNode(layer, [src], "Embedding", f"{layer!r} on one-hot ids (N(0, 1) embeddings)", True)
        attn = m if isinstance(m, nn.MultiheadAttention) else getattr(m, "self_attn", None)
        want = "NLE" if getattr(attn, "batch_first", False) else "LNE"
        if isinstance(m, nn.TransformerEncoder):
            first = m.layers[0] if len(m.layers) else None
            want = "NLE" if first is not None and first.self_attn.batch_first else "LNE"
        if layout != want:
            raise LiftError(
                f"{qualname} ({type(m).__name__}, batch_first={want == 'NLE'}) reads {src.name!r}, whose layout lift "
                f"tracks as {layout or 'not a sequence'}. Fix: give the model inputs in the attention's own layout "
                f"((N, L, E) for batch_first=True, (L, N, E) otherwise), {_FIX}."
            )
        if isinstance(m, nn.MultiheadAttention):
            q, k, v = (list(n.args) + [n.kwargs.get(x) for x in ("query", "key", "value")][len(n.args) :])[:3]
            if not (q is k is v):
                raise LiftError(
                    f"{qualname} (nn.MultiheadAttention) is called with different query, key and value tensors; "
                    f"lift maps self-attention attn(x, x, x) only. Fix: self-attention, {_FIX}."
                )
            extra = dict(zip(("key_padding_mask", "need_weights", "attn_mask"), n.args[3:]))
            extra.update({kk: vv for kk, vv in n.kwargs.items() if kk not in ("query", "key", "value")})
            self._no_masks(qualname, m, extra, ("key_padding_mask", "attn_mask"), ("is_causal",))
            self.tuples[n.name] = layout
        else:
            extra = dict(zip(("mask", "src_key_padding_mask"), n.args[1:]))
            extra.update({kk: vv for kk, vv in n.kwargs.items() if kk not in ("src",)})
            names = ("src_mask", "mask", "src_key_padding_mask")
            self._no_masks(qualname, m, extra, names, ("is_causal",))
            self.layouts[n.name] = layout
            if not hidden.get(src.name, False):
                raise LiftError(
                    f"{qualname} ({type(m).__name__}) reads the model's input directly: its residual stream then has "
                    f"the input's fixed width d_model, which has no infinite-width limit. Fix: project the input "
                    f"first (an nn.Linear to d_model, or nn.Embedding), so that d_model can grow, {_FIX}."
                )
        layer = lift_sequence_module(m, qualname, self.opts, self.init)
        heads = m.num_heads if isinstance(m, nn.MultiheadAttention) else None
        note = "softmax attention, 1/sqrt(d_head), QMC NNGP (no NTK); limit: widths and heads → ∞"
        if heads is None:
            note = "residual encoder; limit: d_model, dim_feedforward and nhead → ∞ (QMC softmax NNGP, no NTK)"
        return SeqNode(layer, [src], type(m).__name__, note, True)

    @staticmethod
    def _no_masks(qualname: str, m: nn.Module, extra: dict[str, Any], masks: Sequence[str], flags: Sequence[str]):
        for key, val in extra.items():
            if key in masks and val is not None:
                raise LiftError(
                    f"{qualname} ({type(m).__name__}) is called with {key}: masked attention is not mapped by lift "
                    f"(a mask changes which keys each query sees, per sample). Fix: call it without masks (ntkit's "
                    f"GlobalSelfAttention takes masks through ntkit.nets.masks), {_FIX}."
                )
            if key in flags and val:
                raise LiftError(f"{qualname} ({type(m).__name__}): {key}=True (a causal mask) is not mapped by lift.")

    def _featurewise_module(self, n: torch.fx.Node, layout: str) -> Optional[SeqNode]:
        m = self.model.get_submodule(str(n.target))
        if isinstance(m, nn.LayerNorm):
            self.layouts[n.name] = layout
            return SeqNode(_lift_layernorm(m, str(n.target), self.init), self._srcs(n), "LayerNorm", "", False)
        if isinstance(m, nn.Flatten):
            if layout != "NLE" or m.start_dim != 1 or m.end_dim != -1:
                raise self._refuse(n, layout, "only nn.Flatten(1) of (N, L, E) flattens per sample.")
            self.layouts[n.name] = None
            return SeqNode(Flatten(), self._srcs(n), "Flatten", "(N, L·E): traced over tokens", False)
        elementwise_activation = (
            type(m) in LIFT_RULES
            and type(m).__module__.endswith("activation")
            and not isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU))  # axis-dependent
        )
        if isinstance(m, _FEATUREWISE) or elementwise_activation:
            self.layouts[n.name] = layout
            return None  # per token on the features (nn.Linear: a Dense on axis 1 of ntkit's layout)
        raise self._refuse(
            n,
            layout,
            f"{type(m).__name__} is not known to act on the features of each token, so its axes cannot "
            f"be placed in ntkit's (N, C, L) layout.",
        )

    def _call(self, n: torch.fx.Node, layout: str, args: list[torch.fx.Node]) -> Optional[SeqNode]:
        t = n.target
        tokens = 1 if layout == "NLE" else 0
        if t in _ELEMENTWISE:
            self.layouts[n.name] = layout
            return None
        if (n.op == "call_method" and t == "size") or t is getattr:
            return None  # shape bookkeeping (the generic lift checks where it is used)
        src = args[0]
        if t in ("mean", torch.mean):
            dims = self._dims(n)
            keep = bool(n.kwargs.get("keepdim", False) or (len(n.args) > 2 and n.args[2]))
            if dims is None or keep or tuple(d % 3 for d in dims) != (tokens,):
                raise self._refuse(
                    n,
                    layout,
                    f"only a mean over the tokens (dim={tokens}, keepdim=False) has a kernel rule "
                    f"(GlobalAvgPool); a mean over the features has none.",
                )
            self.layouts[n.name] = None
            return SeqNode(GlobalAvgPool(), [src], "mean over tokens", "GlobalAvgPool over L", False)
        if t in ("flatten", torch.flatten):
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            if layout != "NLE" or start != 1 or end not in (-1, 2):
                raise self._refuse(n, layout, "only flatten(1) of (N, L, E) flattens per sample.")
            self.layouts[n.name] = None
            return SeqNode(Flatten(), [src], "flatten(1)", "(N, L·E): traced over tokens", False)
        if t in ("transpose", torch.transpose, "permute", torch.permute):
            if t in ("transpose", torch.transpose):
                a, b = (n.args[1], n.args[2]) if len(n.args) > 2 else (n.kwargs.get("dim0"), n.kwargs.get("dim1"))
                ia, ib = int(cast(int, a)) % 3, int(cast(int, b)) % 3
                perm = [0, 1, 2]
                perm[ia], perm[ib] = perm[ib], perm[ia]
            else:
                rest: Any = n.args[1:]
                order = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                perm = [int(p) % 3 for p in order]
            # the axes (batch, tokens, features) of the result, in order
            axes = ("N", "L", "E") if layout == "NLE" else ("L", "N", "E")
            new = "".join(axes[p] for p in perm)
            out: Optional[str] = {"NLE": "NLE", "LNE": "LNE", "NEL": None}.get(new, "?")
            if out == "?":
                raise self._refuse(
                    n, layout, f"the result's axes are {tuple(new)}; lift follows (N, L, E), (L, N, E) and (N, E, L)."
                )
            self.layouts[n.name] = out
            return SeqNode(Identity(), [src], str(t if isinstance(t, str) else t.__name__), f"layout → {new}", False)
        if t is operator.getitem:
            return self._index(n, layout, src)
        if n.op == "call_method" and t in ("view", "reshape") and layout == "NLE":
            shape = tuple(n.args[1:]) if not (len(n.args) == 2 and isinstance(n.args[1], (tuple, list))) else n.args[1]
            if len(shape) == 2 and shape[1] == -1:
                self.layouts[n.name] = None
                return SeqNode(Flatten(), [src], f"{t}(N, -1)", "(N, L·E): traced over tokens", False)
        raise self._refuse(
            n,
            layout,
            "lift does not know how this call treats the token and feature axes (mapped on sequences: "
            "elementwise calls, +, *, mean over tokens, token selection x[:, t], flatten(1), transpose/permute, "
            "nn.Linear, nn.LayerNorm, "
            "activations, dropout).",
        )

    def _index(self, n: torch.fx.Node, layout: str, src: torch.fx.Node) -> SeqNode:
        """``x[:, t]`` (NLE) / ``x[t]`` (LNE): token ``t`` (an int: e.g. a CLS token) or a slice of the tokens, all
        samples and features -> :class:`~ntkit.layers.Index` on ntkit's token axis."""
        idx: Any = n.args[1]
        items = list(idx) if isinstance(idx, tuple) else [idx]
        items += [slice(None)] * (3 - len(items))
        full = slice(None)
        tokens = 1 if layout == "NLE" else 0
        batch = 1 - tokens
        ok = (
            len(items) == 3
            and items[batch] == full
            and items[2] == full
            and (isinstance(items[tokens], (int, slice)) and not isinstance(items[tokens], bool))
            and not any(isinstance(i, torch.fx.Node) for i in items)
        )
        if not ok:
            raise self._refuse(
                n,
                layout,
                f"indexing {idx!r}: lift maps the selection of tokens only (x[:, t] or x[:, a:b] for "
                f"(N, L, E), x[t] for (L, N, E)), with every sample and feature kept.",
            )
        sel = items[tokens]
        self.layouts[n.name] = None if isinstance(sel, int) else layout
        return SeqNode(Index((slice(None), slice(None), sel)), [src], "getitem", f"tokens [{sel!r}]", False)

    # -- the result ------------------------------------------------------------------------------------
    def wrap(self, net: Net) -> Net:
        """The lifted net taking the model's own inputs (:class:`SequenceInputNet`); ``net`` if not a sequence
        model."""
        if not self.active:
            return net
        if self.layout.startswith("ids") and self.vocab is None:
            raise LiftError("the model contains nn.Embedding but its input does not go into it; embed the input ids.")
        return SequenceInputNet(net, self.layout, self.vocab, self.padding_idx)


def as_traceable(model: nn.Module) -> nn.Module:
    """A bare sequence module as a one-module ``nn.Sequential`` (so it is traced as a leaf of a graph)."""
    return nn.Sequential(model) if isinstance(model, SEQUENCE_MODULES) else model
