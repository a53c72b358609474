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
in it. Each structured module's ``forward`` is replaced, while the kernel is computed, by the same formula
with its structured parameters detached, the perturbation added and its input recorded. A parameter is only
treated this way when a probe shows it reaches the output through those forwards alone (an autograd graph
walk); any other use (a weight read by a parent module, ``nn.MultiheadAttention``'s projections) makes it an
ordinary parameter, differentiated by Jacobian contraction. So results are exact for any model.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkit._empirical_core import EmpiricalError, OutSpec, compute_mode, single_fn

__all__ = ["Structured"]


# ---------------------------------------------------------------------------------------------------
# per-module rules
# ---------------------------------------------------------------------------------------------------
class _Outer:
    """A use ``y[t, g·fout + d] = Σ_c W[g, d, c] X[t, g, c]`` of a weight (groups ``g``)."""

    def __init__(self, X: Optional[Tensor], G: Tensor, ids: Optional[Tensor] = None, vocab: int = 0):
        self.X, self.G, self.ids, self.vocab = X, G, ids, vocab  # X (n,T,g,fin), G (n,M,T,g,fout), ids (n,T)

    def key(self):
        if self.ids is not None:
            return ("ids", self.vocab, self.G.shape[-1])
        return ("x", self.X.shape[2], self.X.shape[3], self.G.shape[-1])

    def materialise(self) -> Tensor:
        """``Σ_t G ⊗ x`` flattened as the parameter: ``(n, M, numel)``."""
        n, M = self.G.shape[:2]
        if self.ids is not None:  # weight (V, D): J[v, d] = Σ_t [id_t = v] G[t, d]
            onehot = F.one_hot(self.ids, self.vocab).to(self.G.dtype)
            return torch.einsum("itv,iatgd->iavd", onehot, self.G).reshape(n, M, -1)
        return torch.einsum("itgc,iatgd->iagdc", self.X, self.G).reshape(n, M, -1)


def _linear_fwd(m, x, P):
    return F.linear(x, P["weight"], P.get("bias")), x


def _linear_uses(m, rec, G, n, M, names):
    fin, fout = m.in_features, m.out_features
    Gt = G.reshape(n, M, -1, 1, fout)
    out = {"weight": _Outer(rec.reshape(n, -1, 1, fin), Gt)} if "weight" in names else {}
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, fout)
    return out


def _dense_fwd(m, x, P):  # ntkit.layers.dense.DenseModule
    xc = x.movedim(1, -1) if x.dim() > 2 else x
    if m.parameterization == "ntk":  # scaling the output, not the weight: fewer elementwise products
        y = (xc @ P["weight"].T) * (m.W_std / math.sqrt(m.in_features))
        if "bias" in P:
            y = y + m.b_std * P["bias"]
    else:
        y = xc @ P["weight"].T
        if "bias" in P:
            y = y + P["bias"]
    return (y.movedim(-1, 1) if x.dim() > 2 else y), x


def _dense_uses(m, rec, G, n, M, names):
    fin, fout = m.in_features, m.out_features
    ntk = m.parameterization == "ntk"
    g = G[:, :, 0]
    Gt = (g.movedim(2, -1) if g.dim() > 3 else g).reshape(n, M, -1, 1, fout)
    out = {}
    if "weight" in names:
        x = rec[:, 0]
        X = (x.movedim(1, -1) if x.dim() > 2 else x).reshape(n, -1, 1, fin)
        out["weight"] = _Outer(X * (m.W_std / math.sqrt(fin)) if ntk else X, Gt)
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, fout) * (m.b_std if ntk else 1.0)
    return out


def _conv_fwd(m, x, P):
    return m._conv_forward(x, P["weight"], P.get("bias")), x


def _patches(x: Tensor, kernel_size, stride, dilation, groups: int) -> Tensor:
    """Patches of an already padded input ``x (n, Cin, *S)``: ``(n, L, groups, Cin/groups · prod(kernel))``,
    ordered as a convolution weight ``(Cout, Cin/groups, *kernel)`` is."""
    d = len(kernel_size)
    for ax in range(d):
        k, s, dil = kernel_size[ax], stride[ax], dilation[ax]
        x = x.unfold(2 + ax, (k - 1) * dil + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # (n, Cin, *Lout, *k) -> (n, *Lout, Cin, *k)
    n, cin = x.shape[:2]
    x = x.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return x.reshape(n, -1, groups, (cin // groups) * math.prod(kernel_size))


def _conv_G(G: Tensor, n: int, M: int, d: int, groups: int, cout: int) -> Tensor:
    g = G.reshape((n, M) + tuple(G.shape[-(d + 1):]))  # (n, M, Cout, *Lout)
    return g.movedim(2, -1).reshape(n, M, -1, groups, cout // groups)


def _conv_uses(m, rec, G, n, M, names):
    d = len(m.kernel_size)
    Gt = _conv_G(G, n, M, d, m.groups, m.out_channels)
    out = {}
    if "weight" in names:
        x = rec.reshape((n,) + tuple(rec.shape[-(d + 1):]))  # (n, Cin, *S)
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        out["weight"] = _Outer(_patches(x, m.kernel_size, m.stride, m.dilation, m.groups), Gt)
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, m.out_channels)
    return out


def _ntkit_conv_fwd(m, x, P):  # ntkit.layers.conv.ConvModule
    from ntkit.layers.conv import _CONV_FNS, pad_spatial

    xp = pad_spatial(x, m.wins)
    conv = _CONV_FNS[len(m.wins)]
    if m.parameterization == "ntk":
        y = conv(xp, P["weight"], None, m.stride) * m.scale
        if "bias" in P:
            y = y + (m.b_std * P["bias"]).reshape((-1,) + (1,) * len(m.wins))
        return y, xp
    return conv(xp, P["weight"], P.get("bias"), m.stride), xp


def _ntkit_conv_uses(m, rec, G, n, M, names):
    d = len(m.kernel_size)
    ntk = m.parameterization == "ntk"
    Gt = _conv_G(G, n, M, d, 1, m.out_channels)
    out = {}
    if "weight" in names:
        x = rec.reshape((n,) + tuple(rec.shape[-(d + 1):]))
        X = _patches(x, m.kernel_size, m.stride, (1,) * d, 1)
        out["weight"] = _Outer(X * m.scale if ntk else X, Gt)
    if "bias" in names:
        out["bias"] = Gt.sum(2).reshape(n, M, m.out_channels) * (m.b_std if ntk else 1.0)
    return out


def _emb_fwd(m, x, P):
    return F.embedding(x, P["weight"], m.padding_idx, None, m.norm_type, False, False), x


def _emb_uses(m, rec, G, n, M, names):
    ids = rec.reshape(n, -1)
    Gt = G.reshape(n, M, -1, 1, m.embedding_dim)
    if m.padding_idx is not None:  # autograd gives no gradient to the padding row; neither do we
        Gt = Gt * (ids != m.padding_idx).to(Gt.dtype)[:, None, :, None, None]
    return {"weight": _Outer(None, Gt, ids=ids, vocab=m.num_embeddings)}


def _affine(xhat, P, shape):
    y = xhat if "weight" not in P else xhat * P["weight"].reshape(shape)
    return y if "bias" not in P else y + P["bias"].reshape(shape)


def _layernorm_fwd(m, x, P):
    xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    return _affine(xhat, P, m.normalized_shape), xhat


def _rmsnorm_fwd(m, x, P):
    xhat = F.rms_norm(x, m.normalized_shape, None, m.eps)
    return _affine(xhat, P, m.normalized_shape), xhat


def _trailing_uses(m, rec, G, n, M, names):
    k = math.prod(m.normalized_shape)
    out = {}
    if "weight" in names:
        out["weight"] = (G * rec.unsqueeze(1)).reshape(n, M, -1, k).sum(2)
    if "bias" in names:
        out["bias"] = G.reshape(n, M, -1, k).sum(2)
    return out


def _chan_shape(x):
    return (-1,) + (1,) * (x.dim() - 2)


def _groupnorm_fwd(m, x, P):
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    return _affine(xhat, P, _chan_shape(x)), xhat


def _batchnorm_fwd(m, x, P):
    m._check_input_dim(x)
    xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)
    return _affine(xhat, P, _chan_shape(x)), xhat


def _channel_uses(m, rec, G, n, M, names):
    c = rec.shape[2]  # rec (n, 1, C, *S)
    out = {}
    if "weight" in names:
        out["weight"] = (G * rec.unsqueeze(1)).movedim(3, -1).reshape(n, M, -1, c).sum(2)
    if "bias" in names:
        out["bias"] = G.movedim(3, -1).reshape(n, M, -1, c).sum(2)
    return out


def _rule(m: nn.Module):
    """(forward, uses) for modules whose ``forward`` is the stock one, else None."""
    from ntkit.layers.dense import DenseModule

    t = type(m)
    if t.forward is nn.Linear.forward and isinstance(m, nn.Linear):
        return _linear_fwd, _linear_uses
    if t.forward is DenseModule.forward and isinstance(m, DenseModule):
        return _dense_fwd, _dense_uses
    from ntkit.layers.conv import ConvModule
    if t.forward is ConvModule.forward and isinstance(m, ConvModule):
        return _ntkit_conv_fwd, _ntkit_conv_uses
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(m, base) and t.forward is base.forward and isinstance(m.padding, (tuple, str)):
            return _conv_fwd, _conv_uses
    if isinstance(m, nn.Embedding) and t.forward is nn.Embedding.forward and m.max_norm is None \
            and not m.scale_grad_by_freq and not m.sparse:
        return _emb_fwd, _emb_uses
    if isinstance(m, nn.LayerNorm) and t.forward is nn.LayerNorm.forward:
        return _layernorm_fwd, _trailing_uses
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm) and t.forward is nn.RMSNorm.forward:
        return _rmsnorm_fwd, _trailing_uses
    if isinstance(m, nn.GroupNorm) and t.forward is nn.GroupNorm.forward:
        return _groupnorm_fwd, _channel_uses
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and t.forward is nn.modules.batchnorm._BatchNorm.forward \
            and not m.training and m.running_mean is not None:
        return _batchnorm_fwd, _channel_uses
    return None


# ---------------------------------------------------------------------------------------------------
# patched forwards
# ---------------------------------------------------------------------------------------------------
class _Ctx:
    def __init__(self):
        self.mode = "off"
        self.deltas: list = []
        self.records: list = []
        self.calls: list = []


def _patched(m: nn.Module, fwd, structured: set, ctx: _Ctx, orig):
    def forward(*args, **kwargs):
        if ctx.mode == "off" or len(args) != 1 or kwargs:
            return orig(*args, **kwargs)
        P = {}
        for name in m._parameters:  # functional_call swaps the values it is given in here
            v = getattr(m, name)
            if v is not None:
                P[name] = v.detach() if name in structured else v
        y, rec = fwd(m, args[0], P)
        if not structured:
            return y
        if ctx.mode == "probe":
            ctx.calls.append((m, tuple(y.shape), rec.detach()))
            return y
        k = len(ctx.records)
        if k >= len(ctx.deltas) or tuple(ctx.deltas[k].shape) != tuple(y.shape):
            raise EmpiricalError("the model's forward calls its layers differently from sample to sample; "
                                 "use implementation='jacobian' for data-dependent control flow.")
        ctx.records.append(rec)
        return y + ctx.deltas[k]

    return forward


def _leaves_reached(out: Tensor) -> set:
    """ids of the leaf tensors an output's autograd graph reaches."""
    found, seen = set(), set()
    stack = [out.grad_fn] if out.grad_fn is not None else []
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


# ---------------------------------------------------------------------------------------------------
# the implementation
# ---------------------------------------------------------------------------------------------------
class Structured:
    """``implementation="structured"``: see the module docstring."""

    name = "structured"

    def __init__(self, model: nn.Module, params: dict[str, Tensor], spec: OutSpec, pr, x1: Tensor,
                 fixed: Optional[dict] = None):
        self.model, self.params, self.spec, self.pr = model, params, spec, pr
        self.fixed = fixed or {}
        self.M = math.prod(spec.O)
        self.itemsize = next(iter(params.values())).element_size()
        self.ctx = _Ctx()
        # local parameter name -> canonical name, per candidate module
        canon = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            canon.setdefault(id(p), name)
        self.mods: list[tuple[nn.Module, Any, Any, dict]] = []
        for m in model.modules():
            r = _rule(m)
            if r is None:
                continue
            local = {ln: canon[id(p)] for ln, p in m.named_parameters(recurse=False)
                     if canon.get(id(p)) in params}
            if local:
                self.mods.append((m, r[0], r[1], local))
        self.structured: set[str] = {c for *_, loc in self.mods for c in loc.values()}
        self._installed = False
        if self.structured:
            self._probe(x1)

    # -- analysis ----------------------------------------------------------------------------------
    def has_structure(self) -> bool:
        return bool(self.structured)

    def _install(self):
        for m, fwd, _, local in self.mods:
            names = {ln for ln, c in local.items() if c in self.structured}
            orig = m.__dict__.get("forward", None)
            m._ntkit_orig_forward = orig
            m.forward = _patched(m, fwd, names, self.ctx, orig if orig is not None else type(m).forward.__get__(m))
        self._installed = True

    def _uninstall(self):
        for m, *_ in self.mods:
            orig = m.__dict__.pop("_ntkit_orig_forward", None)
            if orig is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = orig
        self._installed = False

    def active(self):
        impl = self

        class _Active:
            def __enter__(self):
                if impl.structured:
                    impl._install()
                return impl

            def __exit__(self, *a):
                if impl._installed:
                    impl._uninstall()
                impl.ctx.mode = "off"
                return False

        return _Active()

    def _probe(self, x1: Tensor) -> None:
        """Which structured parameters are used only by their module's forward; call shapes; geometry."""
        leaves = {n: v.detach().requires_grad_(True) for n, v in self.params.items()}
        with self.active(), compute_mode():
            self.ctx.mode, self.ctx.calls = "probe", []
            with torch.enable_grad():
                out = torch.func.functional_call(self.model, {**self.fixed, **leaves}, (x1[:1],),
                                                 tie_weights=True)
            self.ctx.mode = "off"
        reached = _leaves_reached(out)
        live = {n for n, v in leaves.items() if id(v) in reached}
        self.structured -= live
        self.generic = [n for n in self.params if n not in self.structured]
        rules = {id(m): (uses, local) for m, _, uses, local in self.mods}
        self.calls = []  # (module, y shape) of calls that get a perturbation, in call order
        geo: dict[str, list] = {}
        for m, yshape, rec in self.ctx.calls:
            uses, local = rules[id(m)]
            if not any(c in self.structured for c in local.values()):
                continue
            self.calls.append((m, yshape))
            G = torch.zeros((1, 1) + yshape, dtype=rec.dtype if rec.is_floating_point() else out.dtype)
            names = {ln for ln, c in local.items() if c in self.structured}
            for ln, u in uses(m, rec.unsqueeze(0), G, 1, 1, names).items():
                geo.setdefault(local[ln], []).append(u)
        self.ctx.calls = []
        self.structured &= set(geo)  # structured parameters the forward never uses contribute 0
        self.generic = [n for n in self.params if n not in self.structured]
        self._plan(geo, x1.shape[0])

    def _plan(self, geo: dict[str, list], n: int) -> None:
        """Per structured parameter: 'pairwise' or 'materialise', the fewer FLOPs for ``n`` samples a side."""
        self.mode: dict[str, str] = {}
        self._pair_cost, self._mat_cost, self._feat_elems, self._pair_elems = 0.0, 0.0, 0.0, 0.0
        q, per_pair, M = self.spec.q, self.spec.per_pair, self.M
        for name, uses in geo.items():
            P = self.params[name].numel()
            outer = [u for u in uses if isinstance(u, _Outer)]
            if len(outer) == len(uses) and len({u.key() for u in outer}) == 1:
                u0 = outer[0]
                T = sum(u.G.shape[2] for u in outer)
                g, fout = u0.G.shape[3], u0.G.shape[4]
                fin = 1 if u0.ids is not None else u0.X.shape[3]
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

    def flops(self, n1: int, n2: int, x2_none: bool) -> float:
        nf = n1 if x2_none else n1 + n2
        pairs = n1 * (n1 + 1) / 2 if x2_none else n1 * n2
        return nf * self.feature_flops() + pairs * self.pair_flops()

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
        f = single_fn(self.model)
        ctx = self.ctx
        gparams = {k: params[k] for k in self.generic}
        svals = {**self.fixed, **{k: v for k, v in params.items() if k not in gparams}}
        dtype = next(iter(self.params.values())).dtype
        deltas = [torch.zeros(s, dtype=dtype, device=x.device) for _, s in self.calls]

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
        direct: dict[str, Tensor] = {k: v.reshape(n, M, -1) for k, v in dJ.items()}
        outer: dict[str, list] = {}
        rules = {id(m): (uses, local) for m, _, uses, local in self.mods}
        for (m, yshape), G, rec in zip(self.calls, dG, recs):
            uses, local = rules[id(m)]
            names = {ln for ln, c in local.items() if c in self.structured}
            for ln, u in uses(m, rec, G.reshape((n, M) + yshape), n, M, names).items():
                name = local[ln]
                if isinstance(u, _Outer) and self.mode[name] == "pairwise":
                    outer.setdefault(name, []).append(u)
                else:
                    j = u.materialise() if isinstance(u, _Outer) else u
                    direct[name] = direct[name] + j if name in direct else j
        pw = []
        def cat(ts, dim):
            return ts[0] if len(ts) == 1 else torch.cat(ts, dim)

        for name, us in outer.items():
            G = cat([u.G for u in us], 2)
            if us[0].ids is not None:
                pw.append((None, cat([u.ids for u in us], 1), G))
            else:
                pw.append((cat([u.X for u in us], 1), None, G))
        return [v.reshape((n,) + O + (-1,)) for v in direct.values()], pw

    def pair(self, f1, f2) -> Tensor:
        """Kernel block (traced axes summed, not yet averaged): materialised Jacobians contracted, plus
        ``Σ_{t,s} (X1 X2ᵀ)[t, s] (G1 G2ᵀ)[t, s]`` for each pairwise parameter."""
        (d1, p1), (d2, p2) = f1, f2
        spec = self.spec
        out = None
        for a, b in zip(d1, d2):
            c = spec.contract(a, b)
            out = c if out is None else out.add_(c)
        bd = spec.batch_diag
        xx_out = "itsg" if bd else "ijtsg"
        for (X1, i1, G1), (X2, i2, G2) in zip(p1, p2):
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
                gg = torch.einsum(f"{spec.s1}d,{spec.s2}d->{spec.out}", g1[..., 0, 0, :], g2[..., 0, 0, :])
                w = xx.reshape(xx.shape[:-3] + (1,) * (gg.dim() - xx.dim() + 3))
                gg.mul_(w)  # (in-place ops with batching rules: this also runs under vmap over models)
                out = gg if out is None else out.add_(gg)
                continue
            gg = torch.einsum(f"{spec.s1}tgd,{spec.s2}sgd->{spec.out}tsg", g1, g2)
            c = torch.einsum(f"{spec.out}tsg,{xx_out}->{spec.out}", gg, xx)
            out = c if out is None else out.add_(c)
        return out
