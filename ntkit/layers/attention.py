"""Global self-attention over the spatial positions of ``(N, C, *spatial)`` activations: ``GlobalSelfAttention``.

The layer is NT's ``stax.GlobalSelfAttention`` (same arguments, keyword for keyword) in PyTorch's layout: the
channels are axis 1 and attention runs over all ``P = Π spatial`` positions (a sequence ``(N, C, L)``, an image
``(N, C, H, W)``, ...). Infinite-width limit: Hron, Bahri, Sohl-Dickstein & Novak 2020, "Infinite attention:
NNGP and NTK for deep attention networks" (arXiv:2006.10540; §3 for the two scalings of the logits, §4 for
positional encodings); the rules below are the ones NT 0.6.5 implements, with NT's conventions.

Finite twin (one head ``h`` of ``n_heads``, inputs ``X`` ``(P, C)`` of one sample, all parameters ``N(0, 1)``,
NTK parameterisation as NT)::

    X_qk = X + E  (SUM)  |  [X, E]  (CONCAT)  |  X  (NONE);    X_v = X_qk if val_pos_emb else X
    Q_h = X_qk W^Q_h,  K_h = X_qk W^K_h   (W^Q_h = W^K_h when linear_scaling),   V_h = X_v W^V_h
    A_h = φ(σ_QK / (C_qk · d^α) · Q_h K_hᵀ)      α = 1 (linear_scaling), ½ (otherwise), d = n_chan_key
    f = σ_OV / sqrt(n_chan_val · n_heads · C_v) · [A_1 V_1, ..., A_H V_H] W^O + b_std · b

with ``σ_QK = W_query_std · W_key_std``, ``σ_OV = W_out_std · W_value_std``, ``φ`` the attention mechanism
(SOFTMAX over the key positions, IDENTITY, ABS, RELU), and ``E = W_pos_emb_std · L Z`` positional embeddings
(``Z`` ``(P, C_pe)`` ``N(0, 1)``, ``L Lᵀ = R``, see below).

Kernel rules. ``K``, ``Θ``: the input NNGP/NTK between two samples, ``C_1``, ``C_2``: each sample's own
covariance, all full pixel-pixel matrices ``(P, P)``. Positional embeddings enter through interpolations with
``R[s, s'] = decay(Σ_a |s_a − s'_a|^p)`` (``p = pos_emb_p_norm``; ``decay = pos_emb_decay_fn``, ``None``: the
indicator ``d == 0``, ``R = I``)::

    K̃ = w_x K + w_e R,   Θ̃ = w_x Θ + w_e R,   C̃ = w_x C + w_e R       (the covariances of X_qk)
    SUM: w_x = 1, w_e = W_pos_emb_std²;   CONCAT: w_x = C/(C + C_pe), w_e = W_pos_emb_std² C_pe/(C + C_pe)

(``C_pe = n_chan_pos_emb``, default ``C``) and ``K_v, Θ_v, C_v`` are ``K̃, Θ̃, C̃`` with ``val_pos_emb``, else
``K, Θ, C``.

* ``linear_scaling=True`` (logits scaled by ``1/d``, keys and queries tied; Hron et al. §3): the logits converge
  to the deterministic ``σ_QK C̃`` of each sample, so the attention weights are the ``(P, P)`` matrices
  ``G_1 = φ(σ_QK C̃_1)``, ``G_2 = φ(σ_QK C̃_2)`` (SOFTMAX normalised over the key index ``t``), and::

      K'  = σ_OV² G_1 K_v G_2ᵀ + b_std²
      Θ'  = σ_OV² G_1 (Θ_v + 2 K_v) G_2ᵀ + b_std²       (the 2 K_v: W^V and W^O; the gradients through
      C'_1 = σ_OV² G_1 C_v,1 G_1ᵀ + b_std²                 the logits vanish in this limit)

  Written out, ``K'[s, s'] = σ_OV² Σ_{t, t'} G_1[s, t] K_v[t, t'] G_2[s', t'] + b_std²``. The weights need each
  sample's *full* self-covariance ``C̃``: a pair-only record (the tiler's self-covariance tape) does not carry
  it, so these layers declare :attr:`GlobalSelfAttention.needs_self_covariances` and a network containing one
  runs its tiles with full self-covariances (:func:`requires_self_covariances`).
* ``linear_scaling=False`` (the standard ``1/sqrt(d)``, independent ``W^Q``, ``W^K``): the logits stay Gaussian,
  ``E[L_1[s, t] L_2[s', t']] = σ_QK² K̃[s, s'] K̃[t, t']``, and only IDENTITY has a closed form (``⟨A, B⟩ =
  Σ_{t, t'} A[t, t'] B[t, t']``)::

      K' = (σ_QK σ_OV)² ⟨K̃, K_v⟩ K̃ + b_std²
      Θ' = (σ_QK σ_OV)² [(⟨K̃, Θ_v⟩ + ⟨K_v, Θ̃⟩) K̃ + ⟨K̃, K_v⟩ (Θ̃ + 4 K̃)] + b_std²

  (the 4: W^Q, W^K, W^V, W^O), which needs cross-covariances only (pair-only records are fine). ABS and RELU
  with ``linear_scaling=False`` raise ``NotImplementedError`` in the kernel (as NT's ``kernel_fn``); their finite
  twins work.

  SOFTMAX with ``linear_scaling=False`` (what ``nn.MultiheadAttention`` computes; NT raises): the logits
  ``z_st = σ_QK/(C_qk √d) Q_s·K_t`` are jointly Gaussian at infinite width with ``Cov(z_st(x), z_s't'(x')) = σ_QK²
  K̃[s, s'] K̃[t, t']`` (a product of the queries' and the keys' kernels), independent of the values, and
  (Hron et al. 2020, §3)::

      K'[s, s'] = σ_OV² Σ_{t, t'} E[softmax(z_s)_t softmax(z'_s')_t'] K_v[t, t'] + b_std²

  (self-covariances alike). The expectation has no closed form; it is computed by randomized quasi-Monte Carlo
  to a requested standard error (``softmax_tol``; :func:`softmax_attention_expectation` states the method and
  the bound), deterministic (fixed scrambling seeds), batched over all query pairs ``(s, s')`` and input pairs.
  Only the NNGP: ``get="ntk"`` raises :class:`~ntkit.layers.base.LayerError`. The rule needs each sample's full
  token covariance (:attr:`GlobalSelfAttention.needs_self_covariances`).

  The limit is a GP only when the number of heads grows too. With ``n_heads`` fixed and ``d → ∞`` the softmax
  weights are shared by all channels of a head, so the output is a *mixture* of Gaussians: its covariance is
  still ``K'`` above (exact at any ``n_heads``), but a nonlinearity or a LayerNorm after it sees the random
  conditional kernel ``σ_OV² A K_v A'ᵀ`` head by head, and the Gaussian recursion downstream is exact only for
  ``n_heads → ∞`` (Hron et al.'s limit: heads and their widths both grow; ``/work/wip/attention.md`` and
  ``tests/lift/test_lift_attention.py`` measure the gap at fixed heads).

Implementation: the ``(.., s_1, s_1', s_2, s_2', ..)`` layout of the Kernel record is permuted once to
``(.., P, P)`` matrices and the weighting is two batched matrix products per kernel (``σ_OV`` is folded into
``G``, the bias into the copy back to the record's layout); no loop over positions or samples.

Masks (NT's ``mask_constant``, :mod:`ntkit.nets.masks`): a masked key position gets no attention weight (its
logits are ``NEG_INF = −10²⁰`` before the SOFTMAX, ``0`` for the other mechanisms, as NT) and ``R`` is zero in
the rows and columns of masked positions (the twin's embeddings are zeroed there); masked query positions are
zeroed in the output. The twin takes the same masks: ``forward(x, mask=m)`` (``m`` ``(N, *spatial)``, ``True``:
masked).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ntkit.kernel import Kernel
from ntkit.layers.base import Layer, LayerError, gaussian, single, single_shape
from ntkit.layers.masking import NEG_INF, channel_all_masks

__all__ = [
    "GlobalSelfAttention",
    "GlobalSelfAttentionModule",
    "MECHANISMS",
    "POS_EMB_TYPES",
    "attention_weights",
    "pos_emb_covariance",
    "requires_self_covariances",
    "softmax_attention_expectation",
]

#: attention mechanisms φ (NT's ``AttentionMechanism``)
MECHANISMS = ("SOFTMAX", "IDENTITY", "ABS", "RELU")
#: positional embeddings (NT's ``PositionalEmbedding``)
POS_EMB_TYPES = ("NONE", "SUM", "CONCAT")

Std = Union[float, Tensor]
DecayFn = Callable[[Tensor], Tensor]


def requires_self_covariances(layer: Layer) -> bool:
    """Whether ``layer`` (or a layer inside it) needs each sample's full self-covariance in every tile: its
    rule cannot run on a pair-only record, so the tiler must not use the self-covariance tape for the net
    (see :mod:`ntkit.nets.tiler`). A layer declares it with a ``needs_self_covariances`` attribute."""
    return bool(getattr(layer, "needs_self_covariances", False)) or any(
        requires_self_covariances(sub) for sub in layer.sublayers()
    )


# ---------------------------------------------------------------------------------------------------
# positional-embedding covariance
# ---------------------------------------------------------------------------------------------------
def pos_emb_covariance(
    spatial: Sequence[int],
    p_norm: float,
    decay_fn: Optional[DecayFn],
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device, None] = None,
) -> Tensor:
    """``R`` ``(P, P)`` over the positions in C order: ``R[s, s'] = decay_fn(Σ_a |s_a − s'_a|^p_norm)``, or the
    identity for ``decay_fn=None`` (NT's ``_pos_emb_pdist``: one-hot embeddings)."""
    size = math.prod(spatial)
    if decay_fn is None:
        return torch.eye(size, dtype=dtype, device=device)
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in spatial), indexing="ij")
    pos = torch.stack([g.reshape(-1) for g in grids], 1)  # (P, S) coordinates
    d = (pos[:, None, :] - pos[None, :, :]).abs().pow(p_norm).sum(-1).to(dtype=dtype, device=device)
    r = decay_fn(d)
    r = torch.as_tensor(r, dtype=dtype, device=device)
    if r.shape != (size, size) or not bool(torch.isfinite(r).all()):
        raise LayerError(
            f"GlobalSelfAttention: pos_emb_decay_fn must map the ({size}, {size}) tensor of distances to finite "
            f"values of the same shape (elementwise, e.g. lambda d: torch.exp(-d)); got shape {tuple(r.shape)}."
        )
    return r


# ---------------------------------------------------------------------------------------------------
# the Kernel record's full layout <-> (P, P) matrices
# ---------------------------------------------------------------------------------------------------
def to_pixel_matrix(t: Tensor, batch_ndim: int) -> Tensor:
    """``(*batch, s_1, s_1', .., s_S, s_S')`` -> ``(*batch, P, P)`` (a view for ``S = 1``, else one copy)."""
    size = math.prod(t.shape[batch_ndim::2])
    return pixel_view(t, batch_ndim).reshape(tuple(t.shape[:batch_ndim]) + (size, size))


def pixel_view(t: Tensor, batch_ndim: int) -> Tensor:
    """``(*batch, s_1, s_1', .., s_S, s_S')`` as ``(*batch, s_1, .., s_S, s_1', .., s_S')`` (a permuted view)."""
    sp = (t.dim() - batch_ndim) // 2
    if sp <= 1:
        return t
    perm = list(range(batch_ndim)) + [batch_ndim + 2 * a for a in range(sp)]
    return t.permute(perm + [batch_ndim + 2 * a + 1 for a in range(sp)])


def from_pixel_matrix(m: Tensor, batch_ndim: int, spatial: Sequence[int], add: Std = 0.0) -> Tensor:
    """``(*batch, P, P)`` (any strides) -> a contiguous ``(*batch, s_1, s_1', ..)`` plus the constant ``add``,
    in one pass."""
    sp = len(spatial)
    view = m.reshape(tuple(m.shape[:batch_ndim]) + tuple(spatial) * 2)
    if sp > 1:
        perm = list(range(batch_ndim))
        for a in range(sp):
            perm += [batch_ndim + a, batch_ndim + sp + a]
        view = view.permute(perm)
    if m.requires_grad or isinstance(add, Tensor):  # differentiable hyper-parameters: no out= (autograd)
        out = view.contiguous()
        return out + add if _nonzero(add) else out
    if view.is_contiguous():
        return view.add_(add) if add else view
    out = torch.empty(view.shape, dtype=m.dtype, device=m.device)
    return torch.add(view, add, out=out) if add else out.copy_(view)


def _nonzero(v: Std) -> bool:
    return isinstance(v, Tensor) or v != 0.0


# ---------------------------------------------------------------------------------------------------
# attention weights
# ---------------------------------------------------------------------------------------------------
def attention_weights(logits: Tensor, mechanism: str) -> Tensor:
    """``φ(logits)`` for logits ``(.., P_query, P_key)``; SOFTMAX normalises over the key positions (last axis).

    (The future per-position mask enters here: masked key columns set to ``−∞`` for SOFTMAX, ``0`` otherwise.)
    """
    if mechanism == "SOFTMAX":
        return torch.softmax(logits, dim=-1)
    if mechanism == "IDENTITY":
        return logits
    if mechanism == "ABS":
        return logits.abs()
    if mechanism == "RELU":
        return logits.clamp_min(0.0)
    raise LayerError(f"attention_mechanism={mechanism!r}: choose one of {MECHANISMS}.")


def pair_view(t: Tensor) -> Tensor:
    """A pair kernel ``(N1, N2, s_1, s_1', .., s_S, s_S')`` as ``(N1, s_1, .., s_S, N2, s_1', .., s_S')`` (a
    permuted view; reshaped, the ``(N1, P, N2, P)`` row layout of :func:`weigh_pairs`)."""
    sp = (t.dim() - 2) // 2
    return t.permute([0, *(2 + 2 * a for a in range(sp)), 1, *(3 + 2 * a for a in range(sp))])


def pair_matrix(t: Tensor, scale: Std = 1.0, add: Optional[Tensor] = None, alpha: float = 1.0) -> Tensor:
    """``scale · t (+ alpha · add)`` of pair kernels in the record's layout, as a contiguous ``(N1, P, N2, P)``
    matrix: one pass (the permutation folded into the copy)."""
    n1, n2 = t.shape[:2]
    p = math.prod(t.shape[2::2])
    vt = pair_view(t)
    if t.requires_grad or isinstance(scale, Tensor) or (add is not None and add.requires_grad):
        out = vt * scale if _nonzero_weight(scale) else vt
        return (out if add is None else out + alpha * pair_view(add)).reshape(n1, p, n2, p)
    res = torch.empty(vt.shape, dtype=t.dtype, device=t.device)
    if add is not None:
        torch.add(vt, pair_view(add), alpha=alpha, out=res)
        if _nonzero_weight(scale):
            res.mul_(scale)
    elif _nonzero_weight(scale):
        torch.mul(vt, scale, out=res)
    else:
        res.copy_(vt)
    return res.view(n1, p, n2, p)


def weigh_pairs(g1: Tensor, x: Tensor, g2: Tensor) -> Tensor:
    """``g1[i] @ x[i, j] @ g2[j]ᵀ`` for ``g1`` ``(N1, P, P)``, ``x`` in the row layout ``(N1, P, N2, P)`` and
    ``g2`` ``(N2, P, P)``; returned as an ``(N1, N2, P, P)`` view (of a ``(N2, N1, P, P)`` tensor:
    :func:`from_pixel_matrix` makes the one copy into the record's layout).

    Two GEMM batches and no copies: the left product batched over ``i`` with the columns of all ``j`` side by
    side (``(P, P) @ (P, N2·P)``), the right one batched over ``j`` with the rows of all ``i`` stacked
    (``(N1·P, P) @ (P, P)``, a strided view of the first product)."""
    n1, p, n2 = x.shape[0], x.shape[1], x.shape[2]
    # y[i, s, j, u] = Σ_t g1[i, s, t] x[i, t, j, u]
    y = torch.matmul(g1, x.reshape(n1, p, n2 * p))
    # z[j, i, s, v] = Σ_u y[i, s, j, u] g2[j, v, u]
    z = torch.matmul(y.reshape(n1 * p, n2, p).transpose(0, 1), g2.transpose(1, 2))
    return z.reshape(n2, n1, p, p).transpose(0, 1)


# ---------------------------------------------------------------------------------------------------
# the finite twin
# ---------------------------------------------------------------------------------------------------
class GlobalSelfAttentionModule(nn.Module):
    """Finite twin of :class:`GlobalSelfAttention`: NT's ``apply_fn`` in PyTorch's layout (see the module
    docstring for the formula).

    Parameters (all ``N(0, 1)``, drawn in float64; stored in NT's shapes except the positional embeddings,
    which are channels-first): ``key`` ``(n_heads, C_qk, n_chan_key)``, ``query`` (only without
    ``linear_scaling``) the same, ``value`` ``(n_heads, C_v, n_chan_val)``, ``out``
    ``(n_chan_val · n_heads, n_chan_out)`` (rows: value channel major, head minor, as NT concatenates heads),
    ``bias`` ``(n_chan_out,)``, ``pos_emb`` ``(C_pe, *spatial)``; buffer ``pos_emb_L``: the Cholesky factor of
    ``R`` (with a ``pos_emb_decay_fn``).
    """

    def __init__(
        self,
        in_channels: int,
        spatial: Sequence[int],
        n_chan_out: int,
        n_chan_key: int,
        n_chan_val: int,
        n_heads: int,
        linear_scaling: bool,
        qk_std: float,
        ov_std: float,
        b_std: Optional[float],
        attention_mechanism: str,
        pos_emb_type: str,
        n_chan_pos_emb: int,
        W_pos_emb_std: float,
        val_pos_emb: bool,
        pos_emb_L: Optional[Tensor],
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.in_channels, self.spatial = in_channels, tuple(spatial)
        self.n_chan_out, self.n_chan_key, self.n_chan_val, self.n_heads = n_chan_out, n_chan_key, n_chan_val, n_heads
        self.linear_scaling, self.qk_std, self.ov_std, self.b_std = linear_scaling, qk_std, ov_std, b_std
        self.attention_mechanism, self.pos_emb_type = attention_mechanism, pos_emb_type
        self.W_pos_emb_std, self.val_pos_emb = W_pos_emb_std, val_pos_emb
        concat = pos_emb_type == "CONCAT"
        self.c_qk = in_channels + (n_chan_pos_emb if concat else 0)
        self.c_v = in_channels + (n_chan_pos_emb if concat and val_pos_emb else 0)
        self.key = nn.Parameter(gaussian((n_heads, self.c_qk, n_chan_key), generator))
        self.query = None if linear_scaling else nn.Parameter(gaussian((n_heads, self.c_qk, n_chan_key), generator))
        self.value = nn.Parameter(gaussian((n_heads, self.c_v, n_chan_val), generator))
        self.out = nn.Parameter(gaussian((n_chan_val * n_heads, n_chan_out), generator))
        self.bias = None if b_std is None else nn.Parameter(gaussian((n_chan_out,), generator))
        self.pos_emb = None
        if pos_emb_type != "NONE":
            self.pos_emb = nn.Parameter(gaussian((n_chan_pos_emb, *self.spatial), generator))
        self.register_buffer("pos_emb_L", pos_emb_L)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """``mask`` (optional, ``(N, *spatial)`` booleans, ``True``: masked; NT's ``apply_fn(..., mask_constant=)``):
        masked positions' inputs and positional embeddings are zeroed and masked keys get no weight (logits
        ``NEG_INF`` for SOFTMAX, ``0`` otherwise); the outputs at masked positions are left as they come (the
        next layer zeroes them, as NT)."""
        n, c = x.shape[0], x.shape[1]
        spatial = tuple(x.shape[2:])
        X = x.reshape(n, c, -1).transpose(1, 2)  # (N, P, C)
        keep = None if mask is None else ~mask.reshape(n, -1)  # (N, P)
        if keep is not None:
            X = X * keep[..., None]
        X_qk = X_v = X
        if self.pos_emb is not None:
            e = self.pos_emb.reshape(self.pos_emb.shape[0], -1)  # (C_pe, P)
            L = self.pos_emb_L
            if isinstance(L, Tensor):
                e = e @ L.T  # E[s] = Σ_t L[s, t] Z[t]
            e = (e * self.W_pos_emb_std).T  # (P, C_pe)
            if keep is not None:
                e = e * keep[..., None]  # (N, P, C_pe): no embeddings at masked positions
            if self.pos_emb_type == "SUM":
                X_qk = X + e
            else:
                X_qk = torch.cat([X, e.expand(n, -1, -1)], dim=-1)
            if self.val_pos_emb:
                X_v = X_qk
        keys = torch.einsum("npc,hck->nhpk", X_qk, self.key)
        queries = keys if self.query is None else torch.einsum("npc,hck->nhpk", X_qk, self.query)
        scale = self.qk_std / (X_qk.shape[-1] * self.n_chan_key ** (1.0 if self.linear_scaling else 0.5))
        logits = queries @ keys.transpose(-1, -2) * scale
        if keep is not None:
            masked_logit = NEG_INF if self.attention_mechanism == "SOFTMAX" else 0.0
            logits = torch.where(keep[:, None, None, :], logits, masked_logit)
        weights = attention_weights(logits, self.attention_mechanism)
        values = torch.einsum("npc,hcv->nhpv", X_v, self.value)
        heads = (weights @ values).permute(0, 2, 3, 1).reshape(n, X.shape[1], -1)  # (N, P, n_val · n_heads)
        y = heads @ self.out * (self.ov_std / math.sqrt(self.n_chan_val * self.n_heads * X_v.shape[-1]))
        if self.bias is not None:
            assert self.b_std is not None, "a bias exists only with a b_std"
            y = y + self.b_std * self.bias
        return y.transpose(1, 2).reshape((n, self.n_chan_out) + spatial)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, n_chan_out={self.n_chan_out}, n_chan_key={self.n_chan_key}, "
            f"n_chan_val={self.n_chan_val}, n_heads={self.n_heads}, linear_scaling={self.linear_scaling}, "
            f"attention_mechanism={self.attention_mechanism!r}, pos_emb_type={self.pos_emb_type!r}"
        )


# ---------------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------------
def _count(v: Any, name: str) -> int:
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"GlobalSelfAttention: {name}={v!r} must be a positive int.")
    return v


def _std(v: Any, name: str) -> float:
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
        raise ValueError(f"GlobalSelfAttention: {name}={v!r} must be a finite number >= 0.")
    return float(v)


def _choice(v: Any, name: str, choices: Sequence[str]) -> str:
    s = v.upper() if isinstance(v, str) else None
    if s is None or s not in choices:
        raise ValueError(f"GlobalSelfAttention: {name}={v!r}; choose one of {tuple(choices)}.")
    return s


class GlobalSelfAttention(Layer):
    """Global (all positions) multi-head scaled dot-product self-attention; NT's ``stax.GlobalSelfAttention``.

    ``GlobalSelfAttention(n_chan_out, n_chan_key, n_chan_val, n_heads, linear_scaling=True, W_key_std=1.0,
    W_value_std=1.0, W_query_std=1.0, W_out_std=1.0, b_std=None, attention_mechanism="SOFTMAX",
    pos_emb_type="NONE", pos_emb_p_norm=2, pos_emb_decay_fn=None, n_chan_pos_emb=None, W_pos_emb_std=1.0,
    val_pos_emb=False)`` on activations ``(N, C, *spatial)`` (1 or more spatial axes; attention over all
    positions); output ``(N, n_chan_out, *spatial)``.

    Args:
      n_chan_out, n_chan_key, n_chan_val, n_heads: widths of the finite twin (outputs, keys/queries, values)
        and its number of heads; the kernel is their infinite limit and does not depend on them. In
        ``net.module(width=w)`` the width overrides ``n_chan_key``, ``n_chan_val`` and (unless the layer is the
        readout) ``n_chan_out``; ``n_heads`` is kept.
      linear_scaling: ``True``: logits scaled by ``1/n_chan_key`` and ``W^Q = W^K`` (a closed-form kernel for
        every mechanism); ``False``: ``1/sqrt(n_chan_key)`` with independent ``W^Q``, ``W^K`` (a kernel for
        IDENTITY only).
      W_key_std, W_query_std: enter only as ``σ_QK = W_query_std · W_key_std`` (NTK parameterisation).
      W_value_std, W_out_std: enter only as ``σ_OV = W_out_std · W_value_std``.
      b_std: bias standard deviation (``None``: no bias).
      attention_mechanism: ``"SOFTMAX"``, ``"IDENTITY"``, ``"ABS"`` or ``"RELU"`` (case-insensitive).
      pos_emb_type: ``"NONE"``, ``"SUM"`` (added to the inputs) or ``"CONCAT"`` (appended channels).
      pos_emb_p_norm: ``p`` of the distance ``Σ_a |s_a − s'_a|^p`` between positions (with a decay function).
      pos_emb_decay_fn: elementwise function of that distance giving the embeddings' covariance ``R``
        (called on a torch tensor, e.g. ``lambda d: torch.exp(-d)``); ``None``: ``R = I`` (independent
        embeddings per position). The finite twin draws ``L Z`` with ``L Lᵀ = R``, so ``R`` must then be
        positive definite.
      n_chan_pos_emb: channels of the embeddings (CONCAT; ``None``: as many as the inputs). With SUM it must be
        ``None`` or the input channel count.
      W_pos_emb_std: standard deviation of the embeddings.
      val_pos_emb: the values see the embeddings too (else only keys and queries do).
      softmax_tol: SOFTMAX with ``linear_scaling=False`` only: the standard error requested of the
        quasi-Monte-Carlo kernel, relative to ``σ_OV² max|K_v|`` per entry (the error is below
        ``3.5 · softmax_tol`` of that scale with 99 % probability, 0.7 % at the default 2e-3;
        :func:`softmax_attention_expectation`). The cost grows about as ``softmax_tol^-1.25``.

    Kernel rule: see :mod:`ntkit.layers.attention` (Hron et al. 2020). ``needs_full_spatial``: the rule mixes
    all positions. With ``linear_scaling`` the attention weights are functions of each sample's own full
    covariance, so :attr:`needs_self_covariances` is true and tiled runs keep self-covariances.
    """

    needs_full_spatial = True
    has_params = True

    def __init__(
        self,
        n_chan_out: int,
        n_chan_key: int,
        n_chan_val: int,
        n_heads: int,
        linear_scaling: bool = True,
        W_key_std: float = 1.0,
        W_value_std: float = 1.0,
        W_query_std: float = 1.0,
        W_out_std: float = 1.0,
        b_std: Optional[float] = None,
        attention_mechanism: str = "SOFTMAX",
        pos_emb_type: str = "NONE",
        pos_emb_p_norm: float = 2,
        pos_emb_decay_fn: Optional[DecayFn] = None,
        n_chan_pos_emb: Optional[int] = None,
        W_pos_emb_std: float = 1.0,
        val_pos_emb: bool = False,
        softmax_tol: float = 2e-3,
    ):
        self.n_chan_out = _count(n_chan_out, "n_chan_out")
        self.n_chan_key = _count(n_chan_key, "n_chan_key")
        self.n_chan_val = _count(n_chan_val, "n_chan_val")
        self.n_heads = _count(n_heads, "n_heads")
        self.linear_scaling = bool(linear_scaling)
        self.W_key_std: Std = _std(W_key_std, "W_key_std")
        self.W_value_std: Std = _std(W_value_std, "W_value_std")
        self.W_query_std: Std = _std(W_query_std, "W_query_std")
        self.W_out_std: Std = _std(W_out_std, "W_out_std")
        if b_std is not None and not (isinstance(b_std, (int, float)) and math.isfinite(b_std) and b_std >= 0):
            raise ValueError(f"GlobalSelfAttention: b_std={b_std!r} must be None (no bias) or a finite number >= 0.")
        self.b_std: Optional[Std] = None if b_std is None else float(b_std)
        self.attention_mechanism = _choice(attention_mechanism, "attention_mechanism", MECHANISMS)
        self.pos_emb_type = _choice(pos_emb_type, "pos_emb_type", POS_EMB_TYPES)
        if not (isinstance(pos_emb_p_norm, (int, float)) and math.isfinite(pos_emb_p_norm) and pos_emb_p_norm > 0):
            raise ValueError(f"GlobalSelfAttention: pos_emb_p_norm={pos_emb_p_norm!r} must be a positive number.")
        self.pos_emb_p_norm = float(pos_emb_p_norm)
        if pos_emb_decay_fn is not None and not callable(pos_emb_decay_fn):
            raise ValueError("GlobalSelfAttention: pos_emb_decay_fn must be None or a callable of the distances.")
        self.pos_emb_decay_fn = pos_emb_decay_fn
        if n_chan_pos_emb is not None:
            _count(n_chan_pos_emb, "n_chan_pos_emb")
        self.n_chan_pos_emb = n_chan_pos_emb
        self.W_pos_emb_std: Std = _std(W_pos_emb_std, "W_pos_emb_std")
        self.val_pos_emb = bool(val_pos_emb)
        if not (isinstance(softmax_tol, (int, float)) and 1e-6 <= softmax_tol <= 0.5):
            raise ValueError(
                f"GlobalSelfAttention: softmax_tol={softmax_tol!r} must be a number in [1e-6, 0.5] (the standard "
                f"error of the quasi-Monte-Carlo softmax kernel relative to the values' scale)."
            )
        self.softmax_tol = float(softmax_tol)

    @property
    def needs_self_covariances(self) -> bool:
        """The rule needs each sample's full self-covariance (``linear_scaling``: the attention weights are
        functions of it; SOFTMAX at ``1/sqrt(d)``: the logits' law needs each input's own token covariance), so
        the tiler must not run this net on pair-only records."""
        return self.linear_scaling or self.attention_mechanism == "SOFTMAX"

    # -- checks ------------------------------------------------------------------------------------------
    def _name(self) -> str:
        return (
            f"GlobalSelfAttention(attention_mechanism={self.attention_mechanism!r}, "
            f"linear_scaling={self.linear_scaling}, pos_emb_type={self.pos_emb_type!r})"
        )

    def _check_spatial(self, shape: Sequence[int]) -> None:
        if len(shape) < 2:
            raise LayerError(
                f"{self._name()} attends over spatial positions but got per-sample shape {tuple(shape)} (no "
                f"spatial axes). Give activations (N, C, L) for sequences or (N, C, H, W) for images (channels "
                f"first), and put the layer before Flatten/GlobalAvgPool."
            )

    def _pos_channels(self, c: int) -> int:
        """Channels of the positional embeddings for ``c`` input channels (checks SUM's constraint)."""
        if self.pos_emb_type == "SUM" and self.n_chan_pos_emb not in (None, c):
            raise LayerError(
                f"{self._name()}: n_chan_pos_emb={self.n_chan_pos_emb} but SUM embeddings are added to inputs "
                f"with {c} channels; use n_chan_pos_emb=None (or {c}), or pos_emb_type='CONCAT'."
            )
        return c if self.n_chan_pos_emb is None else self.n_chan_pos_emb

    def _interpolation(self, c: int) -> tuple[Std, Std]:
        """``(w_x, w_e)``: the weights of the inputs' and the embeddings' covariances in ``K̃``."""
        pe = self.W_pos_emb_std**2
        if self.pos_emb_type == "NONE":
            return 1.0, 0.0
        c_pe = self._pos_channels(c)
        if self.pos_emb_type == "SUM":
            return 1.0, pe
        return c / (c + c_pe), pe * (c_pe / (c + c_pe))

    # -- the kernel rule -----------------------------------------------------------------------------------
    def kernel(self, k):
        k = single(k, self)
        self._check_spatial(k.shape1[1:])
        if k.diagonal_spatial:
            raise LayerError(
                f"{self._name()} needs the full pixel-pixel covariance, but the kernel tracks only the "
                f"diagonal. Call it through a network (serial(...).kernel_fn), which tracks the full "
                f"covariance whenever a GlobalSelfAttention or pooling layer is present."
            )
        if not self.linear_scaling and self.attention_mechanism not in ("IDENTITY", "SOFTMAX"):
            raise NotImplementedError(
                f"{self._name()}: with linear_scaling=False (logits scaled by 1/sqrt(n_chan_key)) the kernel of "
                f"{self.attention_mechanism} attention is an integral over Gaussian logits with no known closed "
                f"form (NT raises too). Use linear_scaling=True (tied keys and queries, logits scaled by "
                f"1/n_chan_key) or attention_mechanism='IDENTITY'; the finite twin (net.module) works for every "
                f"combination."
            )
        spatial = k.spatial_shape
        R = None
        if self.pos_emb_type != "NONE":
            R = pos_emb_covariance(spatial, self.pos_emb_p_norm, self.pos_emb_decay_fn, k.dtype, k.device)
        w_x, w_e = self._interpolation(k.width)
        p1, p2 = channel_all_masks(k)  # NT's mask_constant: masked keys, masked embeddings
        if self.linear_scaling:
            nngp, ntk, cov1, cov2 = self._linear_rule(k, R, w_x, w_e, p1, p2)
        elif self.attention_mechanism == "SOFTMAX":
            nngp, ntk, cov1, cov2 = self._sqrt_softmax_rule(k, R, w_x, w_e, p1, p2)
        else:
            nngp, ntk, cov1, cov2 = self._sqrt_identity_rule(k, R, w_x, w_e, p1, p2)
        if k.x1_is_x2 and nngp is not None:
            # the batch diagonal of K' is C'_1 (the same products): take it, bit-consistent with nngp
            cov1 = torch.diagonal(nngp, 0, 0, 1).movedim(-1, 0).clone()
        return k.replace(
            nngp=nngp,
            ntk=ntk,
            cov1=cov1,
            cov2=cov2,
            shape1=(k.shape1[0], self.n_chan_out) + spatial,
            shape2=(k.shape2[0], self.n_chan_out) + spatial,
            is_gaussian=True,
            is_input=False,
        )

    def _linear_rule(
        self,
        k: Kernel,
        R: Optional[Tensor],
        w_x: Std,
        w_e: Std,
        p1: Optional[Tensor] = None,
        p2: Optional[Tensor] = None,
    ):
        """``linear_scaling=True``: ``K' = σ_OV² G_1 K_v G_2ᵀ + b²``, ``Θ' = σ_OV² G_1 (Θ_v + 2 K_v) G_2ᵀ + b²``.

        Masks (``p1``/``p2``: position masks ``(N, *s)``, NT's ``mask_constant``): a masked key ``t`` gets no
        weight (its logits ``C̃[s, t]`` are set to ``NEG_INF`` before the SOFTMAX, to 0 for the others, as NT),
        and ``R`` is zero in the rows and columns of masked positions (the finite twin zeroes their embeddings).
        The output's masked positions are zeroed afterwards (:mod:`ntkit.nets.masks`)."""
        if k.cov1 is None:
            raise LayerError(
                f"{self._name()} got a pair-only Kernel record (no self-covariances): its attention weights are "
                f"functions of each sample's full self-covariance. Tiled runs of a net containing it keep the "
                f"self-covariances (requires_self_covariances); if you build records yourself, pass cov1/cov2."
            )
        qk = self.W_query_std * self.W_key_std
        ov = self.W_out_std * self.W_value_std
        b2: Std = 0.0 if self.b_std is None else self.b_std**2
        spatial = k.spatial_shape

        keep1 = None if p1 is None else (~p1).reshape(p1.shape[0], -1)  # (N, P): unmasked positions
        keep2 = None if p2 is None else (~p2).reshape(p2.shape[0], -1)
        r1 = r2 = R
        if R is not None and keep1 is not None and keep2 is not None:
            r1 = R * (keep1[:, :, None] & keep1[:, None, :])  # (N, P, P): each sample's masked R
            r2 = R * (keep2[:, :, None] & keep2[:, None, :])

        def interp(m: Tensor, r: Optional[Tensor]) -> Tensor:
            """``w_x m + w_e R`` (the covariance of the keys' and queries' inputs)."""
            return m if r is None else (m * w_x if _nonzero_weight(w_x) else m) + w_e * r

        def weights(cov: Tensor, r: Optional[Tensor], keep: Optional[Tensor]) -> Tensor:
            """``σ_OV · φ(σ_QK C̃)`` (σ_OV folded in: ``G K Gᵀ`` then carries σ_OV²)."""
            c = interp(to_pixel_matrix(cov, 1), r)
            if keep is not None:
                c = torch.where(keep[:, None, :], c, NEG_INF if self.attention_mechanism == "SOFTMAX" else 0.0)
            return attention_weights(c * qk, self.attention_mechanism) * ov

        g1 = weights(k.cov1, r1, keep1)
        g2 = g1 if k.cov2 is None else weights(k.cov2, r2, keep2)
        on_values = self.val_pos_emb and R is not None

        def values(m: Tensor, r: Optional[Tensor]) -> Tensor:
            return interp(m, r) if on_values else m

        nngp = ntk = cov1 = cov2 = None
        if k.nngp is not None:
            r_rows = None if R is None else R[:, None, :]  # R against the (N1, P, N2, P) row layout
            if r_rows is not None and keep1 is not None and keep2 is not None:
                r_rows = r_rows * (keep1[:, :, None, None] & keep2[None, None, :, :])
            if k.ntk is not None:
                # Θ_v + 2 K_v; with val_pos_emb (Θ_v = w_x Θ + w_e R, K_v = w_x K + w_e R): w_x (Θ + 2K) + 3 w_e R
                m = pair_matrix(k.ntk, w_x if on_values else 1.0, k.nngp, 2.0)
                if on_values:
                    assert r_rows is not None, "val_pos_emb interpolates with R"
                    m = _add_scaled(m, r_rows, 3 * w_e)
                ntk = from_pixel_matrix(weigh_pairs(g1, m, g2), 2, spatial, b2)
            kv = pair_matrix(k.nngp, w_x if on_values else 1.0)
            if on_values:
                assert r_rows is not None, "val_pos_emb interpolates with R"
                kv = _add_scaled(kv, r_rows, w_e)
            nngp = from_pixel_matrix(weigh_pairs(g1, kv, g2), 2, spatial, b2)
        if not k.x1_is_x2 or k.nngp is None:
            v1 = values(to_pixel_matrix(k.cov1, 1), r1)
            cov1 = from_pixel_matrix(g1 @ v1 @ g1.transpose(-1, -2), 1, spatial, b2)
        if k.cov2 is not None:
            v2 = values(to_pixel_matrix(k.cov2, 1), r2)
            cov2 = from_pixel_matrix(g2 @ v2 @ g2.transpose(-1, -2), 1, spatial, b2)
        return nngp, ntk, cov1, cov2

    def _sqrt_identity_rule(
        self,
        k: Kernel,
        R: Optional[Tensor],
        w_x: Std,
        w_e: Std,
        p1: Optional[Tensor] = None,
        p2: Optional[Tensor] = None,
    ):
        """``linear_scaling=False``, IDENTITY: ``K' = (σ_QK σ_OV)² ⟨K̃, K_v⟩ K̃ + b²`` (module docstring for Θ').

        Masks (``p1``/``p2``, NT's ``mask_constant``): ``R`` is zero at masked positions; the logits of masked keys
        are then zero in the finite twin (their inputs and embeddings are), which the rule has already."""
        std2 = (self.W_query_std * self.W_key_std * self.W_out_std * self.W_value_std) ** 2
        b2: Std = 0.0 if self.b_std is None else self.b_std**2
        sp = k.spatial_ndim
        r_full = None
        if R is not None:  # R in the record's (s_1, s_1', ..) layout
            r_full = from_pixel_matrix(R.clone(), 0, k.spatial_shape)
        r_of: dict[int, Optional[Tensor]] = {0: r_full, 1: r_full, 2: r_full}  # against nngp, cov1, cov2
        if r_full is not None and p1 is not None and p2 is not None:
            r_of = {w: r_full * k.outer_means(~a, ~b, w) for w, a, b in ((0, p1, p2), (1, p1, p1), (2, p2, p2))}

        def interp(t: Tensor, which: int = 0) -> Tensor:
            r = r_of[which]
            return t if r is None else t * w_x + w_e * r

        def dot(a: Tensor, b: Tensor, batch_ndim: int) -> Tensor:
            """``⟨a, b⟩`` over the spatial axes, kept as size-1 axes for broadcasting."""
            return (a * b).sum(tuple(range(batch_ndim, batch_ndim + 2 * sp)), keepdim=True)

        def on_values(t: Tensor, t_interp: Tensor) -> Tensor:
            return t_interp if (self.val_pos_emb and r_full is not None) else t

        nngp = ntk = None
        if k.nngp is not None:
            kq = interp(k.nngp)
            kv = on_values(k.nngp, kq)
            d12 = dot(kq, kv, 2)
            nngp = d12 * kq * std2 + b2
            if k.ntk is not None:
                tq = interp(k.ntk)
                tv = on_values(k.ntk, tq)
                ntk = ((dot(kq, tv, 2) + dot(kv, tq, 2)) * kq + d12 * (tq + 4 * kq)) * std2 + b2

        def self_cov(c: Optional[Tensor], which: int) -> Optional[Tensor]:
            if c is None:
                return None
            cq = interp(c, which)
            return dot(cq, on_values(c, cq), 1) * cq * std2 + b2

        cov1 = None if (k.x1_is_x2 and nngp is not None) else self_cov(k.cov1, 1)
        return nngp, ntk, cov1, self_cov(k.cov2, 2)

    def _sqrt_softmax_rule(
        self,
        k: Kernel,
        R: Optional[Tensor],
        w_x: Std,
        w_e: Std,
        p1: Optional[Tensor] = None,
        p2: Optional[Tensor] = None,
    ):
        """``linear_scaling=False``, SOFTMAX: ``K'[s, s'] = σ_OV² Σ_{t,t'} E[p_st p'_s't'] K_v[t, t'] + b²`` over the
        Gaussian logits (module docstring), by :func:`softmax_attention_expectation`. No NTK (LayerError).

        Masks (``p1``/``p2``, NT's ``mask_constant``): a masked key gets the logit ``NEG_INF`` (no weight), ``R`` is
        zero in the rows and columns of masked positions; the output's masked positions are zeroed afterwards."""
        if k.ntk is not None:
            raise LayerError(
                f"{self._name()}: the NTK of softmax attention at the 1/sqrt(d) scaling is not implemented (its "
                f"query/key terms need E[∂softmax ⊗ ∂softmax] over the Gaussian logits); only the NNGP is. Ask for "
                f"get='nngp', or use linear_scaling=True (whose NTK is exact)."
            )
        if k.cov1 is None:
            raise LayerError(
                f"{self._name()} got a pair-only Kernel record (no self-covariances): the law of its logits needs "
                f"each sample's full token covariance. Tiled runs of a net containing it keep the self-covariances "
                f"(requires_self_covariances); if you build records yourself, pass cov1/cov2."
            )
        qk2 = (self.W_query_std * self.W_key_std) ** 2
        ov2 = (self.W_out_std * self.W_value_std) ** 2
        b2: Std = 0.0 if self.b_std is None else self.b_std**2
        spatial = k.spatial_shape
        on_values = self.val_pos_emb and R is not None
        keep1 = None if p1 is None else (~p1).reshape(p1.shape[0], -1)  # (N, P): unmasked positions
        keep2 = keep1 if (p2 is None or k.x1_is_x2) else (~p2).reshape(p2.shape[0], -1)

        def r_between(ka: Optional[Tensor], kb: Optional[Tensor]) -> Optional[Tensor]:
            """``R`` between the positions of two samples (zero at masked ones): ``(P, P)`` or ``(.., P, P)``."""
            if R is None or ka is None or kb is None:
                return R
            return R * (ka[..., :, None] & kb[..., None, :])

        def interp(m: Tensor, r: Optional[Tensor]) -> Tensor:
            return m if r is None else m * w_x + w_e * r

        def expectation(A, B, C, V, ka, kb) -> Tensor:
            return softmax_attention_expectation(A, B, C, V, qk2, self.softmax_tol, ka, kb)[0] * ov2

        def self_cov(cov: Tensor, keep: Optional[Tensor]) -> Tensor:
            raw = to_pixel_matrix(cov, 1)
            c = interp(raw, r_between(keep, keep))
            e = expectation(c, c, c, c if on_values else raw, keep, keep)
            return from_pixel_matrix((e + e.transpose(-1, -2)) / 2, 1, spatial, b2)  # E[s, s'] is symmetric

        r11 = r_between(keep1, keep1)
        c1 = interp(to_pixel_matrix(k.cov1, 1), r11)
        c2 = c1 if k.cov2 is None else interp(to_pixel_matrix(k.cov2, 1), r_between(keep2, keep2))
        nngp = cov1 = cov2 = None
        if k.nngp is not None:
            raw12 = to_pixel_matrix(k.nngp, 2)  # (N1, N2, P, P)
            r12 = r_between(None if keep1 is None else keep1[:, None], None if keep2 is None else keep2[None, :])
            kq = interp(raw12, r12)
            kv = kq if on_values else raw12
            n1, n2, p = kq.shape[0], kq.shape[1], kq.shape[-1]
            if k.x1_is_x2:
                # the pairs a <= b; the others by the symmetry K'[b, a, s', s] = K'[a, b, s, s'] (exactly symmetric)
                ia, ib = torch.triu_indices(n1, n1, device=kq.device)
                ka = None if keep1 is None else keep1[ia]
                kb = None if keep1 is None else keep1[ib]
                e = expectation(c1[ia], c1[ib], kq[ia, ib], kv[ia, ib], ka, kb)
                same = (ia == ib)[:, None, None]
                e = torch.where(same, (e + e.transpose(-1, -2)) / 2, e)
                full = torch.empty((n1, n1, p, p), dtype=e.dtype, device=e.device)
                full[ia, ib] = e
                full[ib, ia] = e.transpose(-1, -2)
            else:
                A = c1[:, None].expand(n1, n2, p, p).reshape(-1, p, p)
                B = c2[None].expand(n1, n2, p, p).reshape(-1, p, p)
                ka = None if keep1 is None else keep1[:, None].expand(n1, n2, p).reshape(-1, p)
                kb = None if keep2 is None else keep2[None].expand(n1, n2, p).reshape(-1, p)
                flat = expectation(A, B, kq.reshape(-1, p, p), kv.reshape(-1, p, p), ka, kb)
                full = flat.reshape(n1, n2, p, p)
            nngp = from_pixel_matrix(full, 2, spatial, b2)
        if not k.x1_is_x2 or k.nngp is None:
            cov1 = self_cov(k.cov1, keep1)
        if k.cov2 is not None:
            cov2 = self_cov(k.cov2, keep2)
        return nngp, None, cov1, cov2

    # -- the finite twin -------------------------------------------------------------------------------------
    def build(self, in_shape, width, generator, readout):
        s = single_shape(in_shape, self)
        self._check_spatial(s)
        c, spatial = s[0], tuple(s[1:])
        n_out = self.n_chan_out if (width is None or readout) else width
        n_key = self.n_chan_key if width is None else width
        n_val = self.n_chan_val if width is None else width
        L = None
        if self.pos_emb_type != "NONE" and self.pos_emb_decay_fn is not None:
            R = pos_emb_covariance(spatial, self.pos_emb_p_norm, self.pos_emb_decay_fn)
            L, info = torch.linalg.cholesky_ex(R)
            if int(info) != 0:
                raise LayerError(
                    f"{self._name()}: the positional-embedding covariance R = pos_emb_decay_fn(distances) on "
                    f"{spatial} positions is not positive definite, so the finite twin cannot draw embeddings "
                    f"with it (E = L Z, R = L Lᵀ). Use a positive-definite decay (e.g. lambda d: torch.exp(-d) "
                    f"with pos_emb_p_norm 1 or 2); the kernel itself only needs R."
                )
        mod = GlobalSelfAttentionModule(
            c,
            spatial,
            n_out,
            n_key,
            n_val,
            self.n_heads,
            self.linear_scaling,
            float(self.W_query_std * self.W_key_std),
            float(self.W_out_std * self.W_value_std),
            None if self.b_std is None else float(self.b_std),
            self.attention_mechanism,
            self.pos_emb_type,
            self._pos_channels(c),
            float(self.W_pos_emb_std),
            self.val_pos_emb,
            L,
            generator,
        )
        return mod, (n_out,) + spatial

    # -- hooks ---------------------------------------------------------------------------------------------
    def tunables(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "W_key_std": self.W_key_std,
            "W_query_std": self.W_query_std,
            "W_value_std": self.W_value_std,
            "W_out_std": self.W_out_std,
        }
        if self.b_std is not None:
            out["b_std"] = self.b_std
        if self.pos_emb_type != "NONE":
            out["W_pos_emb_std"] = self.W_pos_emb_std
        return out

    def __repr__(self) -> str:
        args = [f"{self.n_chan_out}, {self.n_chan_key}, {self.n_chan_val}, {self.n_heads}"]
        defaults = GlobalSelfAttention(1, 1, 1, 1)
        for name, v in vars(self).items():
            if name.startswith("_") or name in ("n_chan_out", "n_chan_key", "n_chan_val", "n_heads"):
                continue
            if isinstance(v, Tensor) or v != getattr(defaults, name):
                args.append(f"{name}={v!r}")
        return f"GlobalSelfAttention({', '.join(args)})"


def _add_scaled(m: Tensor, r: Tensor, w: Std) -> Tensor:
    """``m + w·r``, in place in ``m`` (a fresh buffer) unless autograd needs it out of place."""
    return m + w * r if (m.requires_grad or isinstance(w, Tensor)) else m.add_(r, alpha=w)


def _nonzero_weight(w: Std) -> bool:
    """``w`` is not the float 1 (a multiplication to do)."""
    return isinstance(w, Tensor) or w != 1.0


# ---------------------------------------------------------------------------------------------------
# softmax attention at the standard 1/sqrt(d) scaling: randomized quasi-Monte Carlo over Gaussian logits
# ---------------------------------------------------------------------------------------------------
#: independent scramblings of the Sobol sequence (seeds 0..R-1): R estimates whose spread is the error estimate
QMC_SCRAMBLES = 8
#: Sobol points per scrambling at the first try (doubled until the tolerance is met)
QMC_START_POINTS = 128
#: the most Sobol points per scrambling (then the tolerance is declared unreachable)
QMC_MAX_POINTS = 2**14
#: elements of the largest intermediate tensor per chunk of input pairs
_QMC_CHUNK_ELEMENTS = 2**22


def _qmc_normals(dim: int, start: int, count: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Points ``start .. start + count − 1`` of the Sobol sequence in ``dim`` dimensions, Owen-scrambled with
    ``seed`` (deterministic), mapped to standard normals by the inverse normal CDF (``ndtri``)."""
    eng = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    if start:
        eng.fast_forward(start)
    u = eng.draw(count, dtype=torch.float64).clamp_(1e-15, 1 - 1e-15)
    return torch.special.ndtri(u).to(dtype=dtype, device=device)


def _psd_sqrt(m: Tensor) -> Tensor:
    """Symmetric square root ``F`` (``F Fᵀ = m``) of PSD matrices ``(.., n, n)``; eigenvalues below 0 (round-off
    of a singular covariance) are clamped to 0."""
    m = (m + m.transpose(-1, -2)) / 2
    lam, vec = torch.linalg.eigh(m)
    return (vec * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ vec.transpose(-1, -2)


def _softmax_pair_sums(
    A: Tensor,
    B: Tensor,
    C: Tensor,
    V: Tensor,
    qk2: Std,
    normals: Tensor,
    keep_a: Optional[Tensor] = None,
    keep_b: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``Σ_s Σ_{j,j'} p_s[i, j] V[j, j'] p'_s[i', j']`` over the QMC normals ``(S, 3L)`` for ``P`` pairs of inputs,
    the same sum of the control variate ``g`` and its exact mean ``E[g]`` (per point): ``(f_sum, g_sum, Eg)``.

    ``A``, ``B`` ``(P, L, L)``: the two inputs' token covariances (keys and queries, before ``σ_QK²``), ``C``
    ``(P, L, L)`` their cross-covariance, ``V`` ``(P, L, L)`` the values' cross-covariance. The logits are
    ``z_i = σ √a_i u¹ₓ`` and ``z'_i' = σ (c_ii'/√a_i u¹_y + √(b_i' − c_ii'²/a_i) u²)``, with ``(u¹ₓ, u¹_y) ~ N(0,
    [[A, C], [Cᵀ, B]])`` and ``u² ~ N(0, B)`` independent, ``a = diag A``, ``b = diag B``, ``c = C``: exactly the
    joint law ``Cov(z_ij, z'_i'j') = σ² C[i, i'] C[j, j']`` (and ``σ² A[i, i] A[j, j']``, ``σ² B[i', i'] B[j, j']``)
    of the logits of query ``i`` of one input and query ``i'`` of the other (the Kronecker structure of the
    covariance: a 2 × 2 factor over the two queries times one over the keys). ``p = softmax(z)``; keys with
    ``keep_a``/``keep_b`` ``(P, L)`` false get the logit ``NEG_INF`` (masked: no weight).

    Control variate: the softmax linearised at zero logits, ``q = w + M z`` (``w`` the uniform weights over the
    kept keys, ``(M z)_j = keep_j (z_j − z̄)/n``, ``z̄`` the mean over the ``n`` kept keys), whose product has the
    closed-form mean ``E[qᵀ V q'] = wᵀ V w' + σ² c_ii' ⟨V, M C M'ᵀ⟩`` (Gaussian second moments; ``c``, ``C`` the
    covariances actually simulated). ``f − g + E[g]`` is unbiased and removes the first-order part of the
    variance (most of it at PyTorch's init, where the logits are small)."""
    P, L = A.shape[0], A.shape[-1]
    sigma = qk2**0.5 if isinstance(qk2, Tensor) else math.sqrt(qk2)
    joint = torch.cat([torch.cat([A, C], -1), torch.cat([C.transpose(-1, -2), B], -1)], -2)
    F = _psd_sqrt(joint)  # (P, 2L, 2L)
    G = _psd_sqrt(B)  # (P, L, L)
    xi, eta = normals[:, : 2 * L], normals[:, 2 * L :]
    u1 = torch.matmul(xi, F.transpose(-1, -2))  # (P, S, 2L)
    u1x, u1y = u1[..., :L], u1[..., L:]
    u2 = torch.matmul(eta, G.transpose(-1, -2))  # (P, S, L)
    a = torch.diagonal(A, 0, -2, -1).clamp_min(0)  # (P, L_i)
    b = torch.diagonal(B, 0, -2, -1).clamp_min(0)  # (P, L_i')
    sa = a.sqrt()
    tiny = torch.finfo(A.dtype).tiny
    l21 = torch.where(sa[:, :, None] > 0, C / sa[:, :, None].clamp_min(tiny), torch.zeros_like(C))  # (P, Li, Li')
    l22 = (b[:, None, :] - l21 * l21).clamp_min(0).sqrt()
    S = normals.shape[0]
    ones = torch.ones((P, L), dtype=A.dtype, device=A.device)
    ka = ones if keep_a is None else keep_a.to(A.dtype)
    kb = ones if keep_b is None else keep_b.to(A.dtype)

    def linearised(keep: Tensor) -> tuple[Tensor, Tensor]:
        """``w`` (P, L) and ``M`` (P, L, L) of the softmax linearised at zero logits over the kept keys."""
        n = keep.sum(-1, keepdim=True).clamp_min(1)
        w = keep / n
        M = (torch.diag_embed(keep) - keep[:, :, None] * w[:, None, :]) / n[:, :, None]
        return w, M

    wa, Ma = linearised(ka)
    wb, Mb = linearised(kb)
    # the control variate's sum: qV1 = (w_a + σ√a_i M_a u¹ₓ) V, then against q2 = w_b + σ (l21 M_b u¹_y + l22 M_b u²)
    Mu1x = torch.matmul(u1x, Ma.transpose(-1, -2))  # (P, S, L)
    q1 = wa[:, None, None, :] + (sigma * sa)[:, :, None, None] * Mu1x[:, None]  # (P, L_i, S, L)
    qV1 = torch.matmul(q1, V[:, None])  # (P, L_i, S, L)
    t0 = torch.einsum("pisj,pj->pi", qV1, wb)
    t1 = torch.einsum("pisj,psj->pi", qV1, torch.matmul(u1y, Mb.transpose(-1, -2)))
    t2 = torch.einsum("pisj,psj->pi", qV1, torch.matmul(u2, Mb.transpose(-1, -2)))
    g_sum = t0[:, :, None] + sigma * (l21 * t1[:, :, None] + l22 * t2[:, :, None])  # (P, L_i, L_i')
    c_sim = torch.matmul(F, F.transpose(-1, -2))[:, :L, L:]  # the keys' cross-covariance simulated
    quad = (V * torch.matmul(torch.matmul(Ma, c_sim), Mb.transpose(-1, -2))).sum((-2, -1))  # ⟨V, M_a C M_bᵀ⟩
    uniform = torch.einsum("pj,pjk,pk->p", wa, V, wb)  # wᵀ V w'
    Eg = uniform[:, None, None] + sigma**2 * (sa[:, :, None] * l21) * quad[:, None, None]
    # p_i = softmax(σ √a_i u¹ₓ): (P, L_i, S, L_j); pV[.., j'] = Σ_j p_ij V[j, j']
    z1 = (sigma * sa)[:, :, None, None] * u1x[:, None]
    if keep_a is not None:
        z1 = torch.where(keep_a[:, None, None, :], z1, NEG_INF)
    p = torch.softmax(z1, dim=-1)
    pV = torch.matmul(p, V[:, None]).reshape(P, L, S * L, 1)  # (P, L_i, S·L_j', 1)
    # logits of p'_{i i'}: σ (l21 u¹_y + l22 u²), one batched product (P, L_i·L_i', 2) @ (P, 2, S·L_j')
    coef = torch.stack([l21, l22], -1).reshape(P, L * L, 2) * sigma
    z2 = torch.bmm(coef, torch.stack([u1y, u2], 1).reshape(P, 2, S * L)).reshape(P, L, L, S, L)
    if keep_b is not None:
        z2 = torch.where(keep_b[:, None, None, None, :], z2, NEG_INF)
    p2 = torch.softmax(z2, dim=-1).reshape(P, L, L, S * L)
    f_sum = torch.matmul(p2, pV)[..., 0]  # Σ_{s, j'} pV[i, s, j'] p2[i, i', s, j']: (P, L_i, L_i')
    return f_sum, g_sum, Eg


def softmax_attention_expectation(
    A: Tensor,
    B: Tensor,
    C: Tensor,
    V: Tensor,
    qk2: Std,
    tol: float,
    keep_a: Optional[Tensor] = None,
    keep_b: Optional[Tensor] = None,
) -> tuple[Tensor, dict[str, Any]]:
    """``E[i, i'] = Σ_{j,j'} E[softmax(z_i)_j softmax(z'_i')_j'] V[j, j']`` for ``P`` pairs of inputs by randomized
    quasi-Monte Carlo, to a requested tolerance.

    Args:
      A, B: ``(P, L, L)`` token covariances of the keys'/queries' inputs of the two inputs of each pair; C:
        ``(P, L, L)`` their cross-covariance (``C[p, i, i'] = K̃(x_i, x'_i')``); V: ``(P, L, L)`` the values'
        cross-covariance; qk2: ``σ_QK²``. The logits are jointly Gaussian with ``Cov(z_ij, z'_i'j') = σ_QK²
        C[i, i'] C[j, j']`` (Hron et al. 2020, §3, the ``1/sqrt(d)`` scaling at infinite width).
      tol: the requested standard error, relative to ``max_{j, j'} |V[p, j, j']|`` (the scale of ``E``, whose
        entries are weighted averages of ``V``'s).
      keep_a, keep_b: optional ``(P, L)`` booleans, the unmasked keys of each side (masked keys: no weight).

    Method: ``R`` = :data:`QMC_SCRAMBLES` independently Owen-scrambled Sobol sequences (fixed seeds ``0..R−1``:
    deterministic output) in ``3L`` dimensions, mapped to normals by ``ndtri`` and to the logits of every pair of
    queries ``(i, i')`` through the Kronecker factorisation of their covariance (:func:`_softmax_pair_sums`: the
    same points serve all ``L²`` query pairs), with the linearised softmax as a control variate of exactly known
    mean (coefficient per entry from 256 pilot points of another scrambling, so the estimates stay unbiased; it
    cuts the variance ~7× at PyTorch's init, where the logits are small). ``m`` points per scrambling, starting at
    :data:`QMC_START_POINTS` and doubled (the sequences continued) until the standard error estimated from the
    spread of the ``R`` estimates, ``SE = std_r / sqrt(R)``, is below ``tol · max|V|`` for every entry, or
    ``m`` = :data:`QMC_MAX_POINTS` (then :class:`~ntkit.layers.base.LayerError`).

    Error bound: the ``R`` scrambled estimates are i.i.d. and unbiased, so ``(E − Ê)/SE`` follows Student's t
    with ``R − 1 = 7`` degrees of freedom: ``|E − Ê| < 3.5 · SE ≤ 3.5 · tol · max|V|`` with 99 % probability per
    entry (``tests/layers/test_attention_softmax.py`` checks it against a 2¹⁹-sample plain Monte-Carlo reference).
    Constant logits (one token, or ``σ_QK = 0``) are exact: uniform weights, no sampling. The sums over the
    points run in float32 for float64 inputs (round-off ~1e-6 relative, far below any allowed tolerance) and the
    result is returned in the inputs' dtype.

    Returns ``(E (P, L, L), info)`` with ``info = {"points": m·R, "se": max SE / max|V|}``.
    """
    P, L = A.shape[0], A.shape[-1]
    dtype, device = A.dtype, A.device
    if L == 1 or (not isinstance(qk2, Tensor) and qk2 == 0):
        # constant logits: uniform weights over the unmasked keys, exactly (one key: the weight 1)
        wa = torch.ones((P, L), dtype=dtype, device=device) if keep_a is None else keep_a.to(dtype)
        wb = torch.ones((P, L), dtype=dtype, device=device) if keep_b is None else keep_b.to(dtype)
        wa = wa / wa.sum(-1, keepdim=True).clamp_min(1)
        wb = wb / wb.sum(-1, keepdim=True).clamp_min(1)
        e = torch.einsum("pj,pjk,pk->p", wa, V, wb)[:, None, None].expand(P, L, L).clone()
        return e, {"points": 0, "se": 0.0}
    # the sums run in float32 (their round-off, ~1e-6 relative, is far below any tolerance allowed): half the time
    work = torch.float32 if dtype == torch.float64 and not (A.requires_grad or V.requires_grad) else dtype
    A, B, C, V = (t.to(work) for t in (A, B, C, V))
    R = QMC_SCRAMBLES
    scale = V.detach().abs().amax((-2, -1)).double().clamp_min(1e-300)  # (P,)
    sums = torch.zeros((R, P, L, L), dtype=torch.float64 if work == torch.float32 else dtype, device=device)
    done, m = 0, QMC_START_POINTS

    def pair_sums(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(f_sum, g_sum, E[g])`` over the points ``z`` for all pairs, chunked to bound memory."""
        chunk = max(1, _QMC_CHUNK_ELEMENTS // max(L * L * z.shape[0] * L, 1))
        parts = [
            _softmax_pair_sums(
                A[s : s + chunk],
                B[s : s + chunk],
                C[s : s + chunk],
                V[s : s + chunk],
                qk2,
                z,
                None if keep_a is None else keep_a[s : s + chunk],
                None if keep_b is None else keep_b[s : s + chunk],
            )
            for s in range(0, P, chunk)
        ]
        return tuple(torch.cat([q[i] for q in parts], 0).to(sums.dtype) for i in range(3))  # type: ignore[return-value]

    # the control variate's coefficient β = Cov(f, g)/Var(g) per entry, from a pilot set of points independent of
    # the estimate's (seed R: β is independent of the R estimates, which stay unbiased): 32 batches of 8 points
    pilot = _qmc_normals(3 * L, 0, 256, R, work, device)
    fg = [pair_sums(b)[:2] for b in pilot.split(8)]
    pf, pg = torch.stack([f for f, _ in fg]), torch.stack([g for _, g in fg])
    pf, pg = pf - pf.mean(0), pg - pg.mean(0)
    beta = ((pf * pg).sum(0) / (pg * pg).sum(0).clamp_min(1e-300)).clamp(0.0, 1.5)  # (P, L, L)
    Eg: Optional[Tensor] = None
    while True:
        new = m - done
        for r in range(R):
            f, g, e = pair_sums(_qmc_normals(3 * L, done, new, r, work, device))
            sums[r] = sums[r] + (f - beta * g)
            Eg = e
        done = m
        assert Eg is not None
        est = sums / m + beta * Eg  # (R, P, L, L): f − β (g − E[g]), the control-variate estimates
        se = est.detach().std(0, correction=1) / math.sqrt(R)
        rel = float((se / scale[:, None, None]).max()) if P else 0.0
        if rel <= tol:
            break
        if m >= QMC_MAX_POINTS:
            raise LayerError(
                f"softmax attention (1/sqrt(d) scaling): the quasi-Monte-Carlo estimate did not reach the requested "
                f"tolerance softmax_tol={tol:g} with {m * R} points (estimated standard error {rel:.3g} of the "
                f"values' scale). Raise softmax_tol (e.g. {max(tol * 4, rel * 1.5):.2g}) or scale the logits down "
                f"(smaller W_query_std·W_key_std, or normalised inputs)."
            )
        m *= 2
    return est.mean(0).to(dtype), {"points": m * R, "se": rel}
