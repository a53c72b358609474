"""Combinators ``serial`` and ``parallel``, and :class:`Net`: one description, two objects.

``net.kernel_fn(x1, x2=None, get=("nngp", "ntk"))`` gives the exact infinite-width kernels;
``net.module(in_features, width=None, seed=None)`` gives the finite ``torch.nn.Module`` whose limit they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ntkit import _compile
from ntkit._inputs import all_finite, kernel_inputs
from ntkit._memory import CACHE_TILE_ENTRIES, FUSED_TILE_ENTRIES, WORK_FACTOR, plan_tile
from ntkit._memory import memory_budget as _memory_budget
from ntkit.kernel import GETS, Kernel, kernel_from_inputs, normalize_get
from ntkit.layers.aggregate import SampleKwargs
from ntkit.layers.attention import requires_self_covariances
from ntkit.layers.base import Kernels, Layer, LayerError, warn_if_channels_last
from ntkit.layers.conv import Conv
from ntkit.layers.elementwise import ElementwiseLayer
from ntkit.layers.fused import ConvActivation, fuse_conv_activations
from ntkit.layers.masking import TileMasks, masked_inputs
from ntkit.layers.pooling import AvgPool, SumPool
from ntkit.nets.symmetric import blocked_symmetric, entrywise_leaves, symmetric_blocks
from ntkit.nets.tiler import (
    NonFinite,
    apply_layer,
    diagnose_non_finite,
    run_tiled,
    tape_bytes,
    tape_pays,
    variances_finite,
)

__all__ = ["Net", "serial", "parallel", "repeat", "KERNEL_FIELDS"]

#: the fields of the result ``Net.kernel_fn(get=...)`` can return (NT's ``get`` of any Kernel field)
KERNEL_FIELDS = (
    "nngp",
    "ntk",
    "cov1",
    "cov2",
    "shape1",
    "shape2",
    "is_gaussian",
    "is_input",
    "diagonal_spatial",
    "x1_is_x2",
)


class _ParallelModule(nn.Module):
    def __init__(self, branches: Sequence[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, xs):
        if not isinstance(xs, (tuple, list)) or len(xs) != len(self.branches):
            raise ValueError(f"parallel of {len(self.branches)} branches needs as many inputs (use FanOut).")
        return tuple(m(x) for m, x in zip(self.branches, xs))


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype``, as a tensor of its own (the inputs' zero NTK is a broadcast view until a layer writes
    it: a result handed to the user never shares one memory location between entries)."""
    if t is None:
        return None
    if any(s == 0 and n > 1 for s, n in zip(t.stride(), t.shape)):
        t = t.contiguous()
    return t if t.dtype == dtype else t.to(dtype)


class Net(Layer):
    """A network: a layer that can also compute kernels from inputs and build its finite twin."""

    is_combinator = True

    def kernel_fn(
        self,
        x1: Any,
        x2: Any = None,
        get: Union[str, Sequence[str], None] = ("nngp", "ntk"),
        *,
        tile_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        diagonal_spatial: Optional[bool] = None,
        mask_constant: Optional[float] = None,
        **kwargs: Any,
    ) -> Union[Kernel, Tensor]:
        """Infinite-width kernels of this network between ``x1`` and ``x2``.

        Args:
          x1: ``(N1, features)`` or ``(N1, C, *spatial)`` float tensor (numpy accepted).
          x2: same per-sample shape, or ``None`` for ``x1`` against itself: then only the upper tiles are
            computed, ``cov2`` is ``None`` and the kernels are exactly symmetric.
          get: ``"nngp"``, ``"ntk"``, another field of the result (:data:`KERNEL_FIELDS`: ``"cov1"``,
            ``"shape1"``, ``"is_gaussian"``, ...) or a tuple of them. A single name returns that field (a tensor
            for the kernels), a tuple a :class:`Kernel` whose unrequested kernels are ``None``.
          tile_size: samples per tile side (default: planned from ``memory_budget`` and cache size).
          memory_budget: bytes the working set of one tile may take (default: ``$NTKIT_MEMORY_BUDGET``, else a
            quarter of the memory available now; see :mod:`ntkit.memory`).
          diagonal_spatial: ``None`` (default): the covariances between pixels are tracked only when a layer needs
            them (pooling, Flatten after a convolution), and the outputs hold what was tracked; ``True``: only
            same-pixel covariances, outputs ``(N1, N2, *spatial)`` (an error for a net that needs the others, as
            in NT); ``False``: every pixel pair, outputs ``(N1, N2, H, H', W, W', ...)`` (NT's layout) where the
            output has spatial axes.
          mask_constant: NT's masking (e.g. the padding of variable-length sequences): input entries equal to it
            (``float("nan")`` matches NaN) are masked: zeroed, and carried through the layers as NT does (masked
            keys get no attention, GlobalAvgPool averages the unmasked positions, ...; :mod:`ntkit.nets.masks`).
            The result carries no masks.
          **kwargs: per-sample inputs of the layers that read them (``Aggregate``'s ``pattern``), as NT: a pair
            ``(v1, v2)`` whose leading axes run over the samples of ``x1`` and ``x2`` (``x2=None``: ``(v1, None)``);
            each tile gets its samples' rows (:class:`ntkit.layers.aggregate.SampleKwargs`).

        The layers run tile by tile over blocks of samples, so the working memory is bounded by the budget
        whatever ``N1, N2``; only the output itself is ``N1 x N2`` (checked against free memory first).
        Returns kernels of shape ``(N1, N2)`` (traced over output channels, as NT) in ``x1``'s dtype, on its
        device.
        """
        fields, single_out = normalize_get(get, allowed=KERNEL_FIELDS, default=GETS)
        # the kernels to compute: those asked for (other fields, e.g. get="cov1", come with the NNGP)
        names = tuple(g for g in fields if g in GETS) or ("nngp",)
        m1 = m2 = None
        if mask_constant is not None:  # masked entries zeroed before the checks (a NaN constant is allowed)
            x1, m1 = masked_inputs(x1, mask_constant, "x1")
            if x2 is not None:
                x2, m2 = masked_inputs(x2, mask_constant, "x2")
        x1, x2, out_dtype = kernel_inputs(x1, x2)
        masks = None if m1 is None else TileMasks(x1, x2, m1.to(x1.device), None if m2 is None else m2.to(x1.device))
        warn_if_channels_last(x1, "Net.kernel_fn")
        sample = SampleKwargs.of(self, kwargs, x1, x2)  # None without keyword arguments
        expected = self.input_rank()
        if expected is not None and x1.dim() != expected:
            raise LayerError(
                f"this network expects {expected}-D inputs (batch, channels{', spatial' * (expected - 2)}) "
                f"but x1 has shape {tuple(x1.shape)}."
            )
        needs_full = self.requires_full_spatial()
        if diagonal_spatial not in (None, True, False):
            raise TypeError(f"diagonal_spatial={diagonal_spatial!r}: choose None, True or False.")
        if diagonal_spatial is True and needs_full:
            raise LayerError(
                "diagonal_spatial=True, but this network needs the covariances between pixels (a pooling layer, or "
                "Flatten/Dense after a convolution mixes the pixels): use diagonal_spatial=False or None."
            )
        diagonal = not needs_full if diagonal_spatial is None else bool(diagonal_spatial)
        n1 = x1.shape[0]
        n2 = n1 if x2 is None else x2.shape[0]
        pixels = math.prod(x1.shape[2:])
        entries = pixels if diagonal else pixels * pixels
        # inside ntkit.compiled(): Conv → ReLU pairs evaluated as one compiled pass (ntkit.layers.fused)
        net: Layer = _fused_layers(self) if (_compile.compile_enabled() and masks is None) else self
        # tiles near CACHE_TILE_ENTRIES kernel entries keep a rule's passes in cache: measured 3x faster for
        # Myrtle-5 on 8x8 images (tile 8 vs 50) and 2x for FC nets. A fused pass reads its tile once, so it
        # takes larger tiles (fewer of them: the small layers after the pools cost a fixed time per tile)
        fused = net is not self
        cap = max(1, math.isqrt((FUSED_TILE_ENTRIES if fused else CACHE_TILE_ENTRIES) // entries))
        pair_bytes = entries * x1.element_size() * WORK_FACTOR
        # the largest tile's working set: when it is small, the limits need not be read (_memory.memory_budget)
        need = min(cap, max(n1, n2)) ** 2 * pair_bytes
        budget = _memory_budget(x1.device, memory_budget, need=need)
        tile = plan_tile(
            n1,
            n2,
            pair_bytes=pair_bytes,
            budget=budget,
            cap=cap,
            tile_size=tile_size,
            what=f"one pair of inputs (a covariance of {entries} entries per pair)",
            fix="raise memory_budget, use smaller images, or a net without pooling (diagonal covariances).",
        )
        if fused and tile_size is None:  # blocks of even size (50 samples, cap 22: 17 + 17 + 16, not 22 + 22 + 6)
            n = max(n1, n2)
            tile = -(-n // -(-n // tile))

        stage = [net]  # what run_inputs applies: the net, or the head of a re-tiled one (below)
        # a serial stack of entrywise layers on vectors, x2 = None: its diagonal tiles run on blocks of their
        # upper triangle (ntkit.nets.symmetric)
        entrywise = None
        if x2 is None and x1.dim() == 2 and masks is None and sample is None and net is self:
            leaves = serial_leaves(self)
            entrywise = leaves if isinstance(leaves, list) and entrywise_leaves(leaves) else None

        def run(a: Tensor, b: Optional[Tensor], pair_only: bool = False) -> Kernel:
            ma = mb = None
            if masks is not None:  # a, b are sample numbers (masks.indices()): the tile's rows of the masks
                ma, mb = masks.rows(a, b)
            if sample is not None:  # a, b are sample numbers (sample.indices()): the tile's inputs and kwargs rows
                with sample.tile(a, b) as (xa, xb):
                    return run_inputs(xa, xb, pair_only, ma, mb)
            if masks is not None:
                a, b = masks.inputs(a, b)
            return run_inputs(a, b, pair_only, ma, mb)

        def run_inputs(
            a: Tensor,
            b: Optional[Tensor],
            pair_only: bool = False,
            ma: Optional[Tensor] = None,
            mb: Optional[Tensor] = None,
        ) -> Kernel:
            # x1 against itself through an entrywise net: the rules run on the upper triangle's blocks only
            blocks = None if (b is not None or entrywise is None) else symmetric_blocks(a.shape[0])
            # no silent Inf/NaN (issue #16): the variances are checked after every layer (apply_layer) and the
            # outputs here, each a single reduction; only a tile that fails is re-run layer by layer, to name
            # the first layer whose output is not finite
            try:
                out: Kernels
                if blocks is not None:
                    assert entrywise is not None
                    out = blocked_symmetric(entrywise, a, "ntk" in names, blocks)
                else:
                    k = kernel_from_inputs(
                        a,
                        b,
                        diagonal_spatial=diagonal,
                        compute_ntk="ntk" in names,
                        pair_only=pair_only,
                        mask1=ma,
                        mask2=mb,
                    )
                    if not variances_finite(k):
                        raise NonFinite()
                    out = stage[0].kernel(k)
                if isinstance(out, list):
                    raise LayerError(f"the network ends with {len(out)} branches; merge them with a FanIn layer.")
                if not _outputs_finite(out):
                    raise NonFinite()
            except NonFinite:
                full = kernel_from_inputs(
                    a, b, diagonal_spatial=diagonal, compute_ntk="ntk" in names, mask1=ma, mask2=mb
                )
                raise diagnose_non_finite(self, full, a, b) from None
            return out

        # what the tiles slice: the inputs, or sample numbers (the same for per-sample kwargs and masks)
        t1, t2 = sample.indices() if sample is not None else ((x1, x2) if masks is None else masks.indices())
        if tile >= n1 and tile >= n2:
            out = run(t1, t2)
        else:
            # full pixel covariances: propagate each sample's self-covariance once, not once per tile (unless a
            # layer's rule needs the full self-covariances themselves, which pair-only tiles do not carry)
            use_tape = (
                not diagonal
                and pixels > 1
                and not requires_self_covariances(self)
                and tape_pays(n1, None if x2 is None else n2, tile)
                and tape_bytes(self, pixels, x1, n1 + (0 if x2 is None else n2)) <= budget
            )
            split = _retile_point(net, tuple(x1.shape[1:]), n1, n2) if (fused and sample is None) else None
            if split is None:
                out = run_tiled(run, t1, t2, tile, names, use_tape)
            else:
                # the layers after the first pool run on all pairs at once (see _retile_point)
                stage[0] = split[0]
                rec = run_tiled(run, t1, t2, tile, ("nngp", "ntk") if "ntk" in names else ("nngp",), use_tape)
                rec = rec.replace(mean1=None, mean2=None)  # the tail starts with a layer that resets the means
                try:
                    tail = split[1].kernel(rec)
                    assert not isinstance(tail, list), "a serial stack of single-record layers returns one record"
                    out = tail
                    if not _outputs_finite(out):
                        raise NonFinite()
                except NonFinite:
                    full = kernel_from_inputs(x1, x2, diagonal_spatial=diagonal, compute_ntk="ntk" in names)
                    raise diagnose_non_finite(self, full, x1, x2) from None
        res = out.replace(
            nngp=_cast(out.nngp, out_dtype) if "nngp" in fields else None,
            ntk=_cast(out.ntk, out_dtype) if "ntk" in fields else None,
            cov1=_cast(out.cov1, out_dtype),
            cov2=_cast(out.cov2, out_dtype),
            # per-tile bookkeeping of the rules (the means of the last tile only): not part of the result
            mean1=None,
            mean2=None,
            mean_kind="exact" if out.is_gaussian else "unknown",
            mask1=None,  # per tile, like the means
            mask2=None,
        )
        return getattr(res, fields[0]) if single_out else res

    def __call__(self, x1: Any, x2: Any = None, get: Union[str, Sequence[str], None] = ("nngp", "ntk"), **kwargs: Any):
        return self.kernel_fn(x1, x2, get, **kwargs)

    def input_rank(self) -> Optional[int]:
        """Rank the inputs must have, if a layer fixes it (None: any)."""
        for layer in self.sublayers():
            r = layer.input_rank()
            if r is not None:
                return r
        return None

    # -- hyper-parameters ---------------------------------------------------------------------------
    def hyperparameters(self) -> dict[str, Any]:
        """Every layer's :meth:`~ntkit.layers.base.Layer.tunables` by dotted path, e.g. ``{"0.W_std": 1.5,
        "0.b_std": 0.05, "2.W_std": 1.0}`` (``"i.j.name"`` inside nested ``serial``/``parallel``)."""
        out: dict[str, Any] = {}
        for i, layer in enumerate(self.sublayers()):
            sub = layer.hyperparameters() if isinstance(layer, Net) else layer.tunables()
            out.update({f"{i}.{k}": v for k, v in sub.items()})
        return out

    def with_hyperparameters(self, values: Mapping[str, Any]) -> Net:
        """A copy of this net with some :meth:`hyperparameters` replaced (floats or tensors: the kernel is then a
        differentiable function of them, e.g. for GPyTorch). Neither this net nor its layers are modified."""
        known = self.hyperparameters()
        bad = sorted(set(values) - set(known))
        if bad:
            raise LayerError(f"unknown hyper-parameters {bad}; this net has {sorted(known)}.")
        groups: dict[int, dict[str, Any]] = {}
        for path, v in values.items():
            index, rest = path.split(".", 1)
            groups.setdefault(int(index), {})[rest] = v
        layers = list(self.sublayers())
        for i, vals in groups.items():
            layer = layers[i]
            layers[i] = layer.with_hyperparameters(vals) if isinstance(layer, Net) else layer.with_tunables(**vals)
        return self._with_sublayers(layers)

    def _with_sublayers(self, layers: Sequence[Layer]) -> Net:
        raise NotImplementedError

    def module(
        self,
        in_features: Union[int, Sequence[int]],
        width: Optional[int] = None,
        seed: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        device: Union[str, torch.device, None] = None,
        parameterization: Optional[str] = None,
        gamma: Optional[float] = None,
    ) -> nn.Module:
        """The finite network this kernel describes (same parameterisation, W_std/b_std; N(0,1) parameters
        under the NTK parameterisation).

        Args:
          in_features: input features, or the per-sample input shape ``(C, *spatial)``.
          width: if given, overrides every hidden width (the readout keeps its size).
          seed: seeds the parameters' initialisation (``None``: torch's global generator state).
          dtype, device: of the parameters (default: torch's default dtype, CPU). Parameters are drawn on the
            CPU in float64 and then cast, so a seed gives the same network on every device and dtype.
          parameterization: ``None`` (each layer's own) or ``"mup"``: the mean-field / maximal-update twin of
            Bordelon & Pehlevan 2022 (Yang & Hu 2021), the NTK-parameterised net (``N(0, 1)`` parameters,
            ``1/√fan_in`` multipliers) with its output divided by ``γ₀ √N`` (``N`` the readout's fan-in):
            ``h¹ = W⁰x/√D``, ``h^{ℓ+1} = W^ℓ φ(h^ℓ)/√N``, ``f = w^L·φ(h^L)/(γ₀ N)`` (times ``W_std``, plus
            ``b_std`` biases). The readout's ``W_std``/``b_std`` carry the factor; ``module.mup_gamma`` and
            ``module.mup_width`` record ``γ₀`` and ``N``. Train it with ``dθ/dt = −η₀ γ₀² N ∇L``
            (:func:`ntkit.feature_learning.train_mup`); its infinite-width limit is
            :func:`ntkit.feature_learning.dmft`. Fully-connected nets with NTK-parameterised Dense layers only.
          gamma: ``γ₀ > 0``, the feature-learning strength (``"mup"`` only).
        """
        in_shape = (in_features,) if isinstance(in_features, int) else tuple(int(s) for s in in_features)
        if width is not None and not (isinstance(width, int) and width > 0):
            raise ValueError(f"width={width!r} must be a positive int or None.")
        if parameterization not in (None, "mup"):
            raise ValueError(
                f"parameterization={parameterization!r}: choose None (the layers' own) or 'mup' (with gamma=γ₀)."
            )
        if parameterization == "mup":
            if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
                raise ValueError(f"parameterization='mup' needs gamma=γ₀, a finite number > 0; got {gamma!r}.")
        elif gamma is not None:
            raise ValueError("gamma= is the μP feature-learning strength: pass it with parameterization='mup'.")
        gen = torch.Generator()
        if seed is None:
            gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        else:
            gen.manual_seed(int(seed))
        mod, _ = self.build(in_shape, width, gen, readout=True)  # parameters drawn in float64 (layers.base.gaussian)
        if parameterization == "mup":
            assert gamma is not None
            # the Dense twins (layers.dense.DenseModule, by duck type: nets may not import a layer family):
            # N(0, 1) parameters, forward W_std/√fan_in·W x + b_std·b along the feature axis
            dense = [
                m
                for m in mod.modules()
                if all(hasattr(m, a) for a in ("W_std", "b_std", "parameterization", "in_features", "out_features"))
            ]
            others = [
                type(m).__name__
                for m in mod.modules()
                if m not in dense and any(True for _ in m.parameters(recurse=False))
            ]
            if not dense or others:
                raise LayerError(
                    f"parameterization='mup' builds fully-connected nets (Dense layers and elementwise "
                    f"nonlinearities); this net has parametrised modules {sorted(set(others))}."
                )
            bad = [m for m in dense if getattr(m, "parameterization") != "ntk"]
            if bad:
                raise LayerError(
                    "parameterization='mup' is defined from the NTK parameterisation (N(0, 1) parameters); the net "
                    "has Dense(..., parameterization='standard') layers: use parameterization='ntk' (the default)."
                )
            readout = dense[-1]
            fan_in = int(getattr(readout, "in_features"))
            scale = 1.0 / (float(gamma) * math.sqrt(fan_in))
            setattr(readout, "W_std", float(getattr(readout, "W_std")) * scale)
            if getattr(readout, "b_std") is not None:
                setattr(readout, "b_std", float(getattr(readout, "b_std")) * scale)
            setattr(mod, "mup_gamma", float(gamma))
            setattr(mod, "mup_width", fan_in)
        return mod.to(dtype=dtype or torch.get_default_dtype(), device=device)


def _outputs_finite(k: Kernel) -> bool:
    """The record's NNGP and NTK are finite (a single reduction each; see ``Net.kernel_fn``)."""
    return all(t is None or all_finite(t.detach()) for t in (k.nngp, k.ntk))


#: a re-tiled net's layers after its first pool run as one tile when it has at most this many entries
RETILE_ENTRIES = 1 << 22


def _retile_point(net: Layer, shape: tuple[int, ...], n1: int, n2: int) -> Optional[tuple[Layer, Layer]]:
    """``(head, tail)`` of a serial net, split after its first pool, when the tail should run on all sample pairs
    as one tile: inside ``ntkit.compiled()`` the layers before the pool dominate the work and run tiled, but
    those after it (covariances 16× smaller after a 2×2 pool) cost a fixed time per tile. The head's kernels are
    assembled (both triangles, as the tiler does for the outputs) with every sample's self-covariance, and the
    tail continues from them: the same numbers as one pass per tile. Only when the head is Conv / fused
    Conv → ReLU / nonlinearities / pools, the tail starts with a Conv (which resets the means), the pool
    shrinks the covariance at least 4×, and the tail's kernels fit :data:`RETILE_ENTRIES`."""
    if not isinstance(net, Serial):
        return None
    layers = list(net.layers)
    spatial = tuple(shape[1:])
    for i, layer in enumerate(layers[:-1]):
        if isinstance(layer, (AvgPool, SumPool)):
            wins = layer._plan((1,) + spatial)
            out = tuple(w.n_out for w in wins)
            before, after = math.prod(spatial) ** 2, math.prod(out) ** 2
            nxt = layers[i + 1]
            if after * 4 > before or not isinstance(nxt, (Conv, ConvActivation)) or n1 * n2 * after > RETILE_ENTRIES:
                return None
            return Serial(layers[: i + 1]), Serial(layers[i + 1 :])
        if isinstance(layer, (Conv, ConvActivation)):
            conv = layer if isinstance(layer, Conv) else layer.conv
            spatial = tuple(w.n_out for w in conv._plan((1,) + spatial))
        elif not isinstance(layer, ElementwiseLayer):
            return None
    return None


def serial_leaves(layer: Layer) -> Union[list[Layer], Layer]:
    """The leaf layers of a (nested) serial stack in order, or the first combinator in it that is not a
    ``serial`` (callers that need a plain stack name it in their error)."""
    if not layer.is_combinator:
        return [layer]
    if not isinstance(layer, Serial):
        return layer
    out: list[Layer] = []
    for sub in layer.sublayers():
        leaves = serial_leaves(sub)
        if not isinstance(leaves, list):
            return leaves
        out.extend(leaves)
    return out


def _fused_layers(layer: Layer) -> Layer:
    """``layer`` with the ``Conv → ReLU`` pairs of every serial stack in it replaced by one fused layer
    (:func:`ntkit.layers.fused.fuse_conv_activations`); the layer itself when there are none. Not modified."""
    if not isinstance(layer, Net):
        return layer
    subs = list(layer.sublayers())
    new = [_fused_layers(s) for s in subs]
    if isinstance(layer, Serial):
        new = fuse_conv_activations(new)
    if len(new) == len(subs) and all(a is b for a, b in zip(new, subs)):
        return layer
    return layer._with_sublayers(new)


class Serial(Net):
    """Layers applied one after another."""

    def __init__(self, layers: Sequence[Layer]):
        for i, l in enumerate(layers):
            if not isinstance(l, Layer):
                raise TypeError(f"serial(...) argument {i} is {type(l).__name__}, not an ntkit layer.")
        self.layers = tuple(layers)

    def sublayers(self):
        return self.layers

    def kernel(self, k):
        for layer in self.layers:
            k = apply_layer(layer, k)
        return k

    def _with_sublayers(self, layers):
        return Serial(layers)

    def build(self, in_shape, width, generator, readout):
        last = max((i for i, l in enumerate(self.layers) if l.contains_params()), default=-1)
        mods, shape = [], in_shape
        for i, layer in enumerate(self.layers):
            m, shape = layer.build(shape, width, generator, readout and i == last)
            mods.append(m)
        return nn.Sequential(*mods), shape

    def __repr__(self):
        return "serial(" + ", ".join(map(repr, self.layers)) + ")"


class Parallel(Net):
    """Branch ``i`` applied to the ``i``-th input branch (after ``FanOut``)."""

    def __init__(self, layers: Sequence[Layer]):
        for i, l in enumerate(layers):
            if not isinstance(l, Layer):
                raise TypeError(f"parallel(...) argument {i} is {type(l).__name__}, not an ntkit layer.")
        self.layers = tuple(layers)

    def sublayers(self):
        return self.layers

    def kernel(self, k):
        if not isinstance(k, list) or len(k) != len(self.layers):
            got = len(k) if isinstance(k, list) else 1
            raise LayerError(
                f"parallel of {len(self.layers)} layers got {got} branch(es); put FanOut({len(self.layers)}) before it."
            )
        return [apply_layer(layer, x) for layer, x in zip(self.layers, k)]

    def _with_sublayers(self, layers):
        return Parallel(layers)

    def build(self, in_shape, width, generator, readout):
        if not isinstance(in_shape, list) or len(in_shape) != len(self.layers):
            raise LayerError(f"parallel of {len(self.layers)} layers needs FanOut({len(self.layers)}) before it.")
        built = [layer.build(s, width, generator, readout) for layer, s in zip(self.layers, in_shape)]
        return _ParallelModule([m for m, _ in built]), [s for _, s in built]

    def __repr__(self):
        return "parallel(" + ", ".join(map(repr, self.layers)) + ")"


def serial(*layers: Layer) -> Net:
    """Compose layers in sequence; the result is itself a layer and a :class:`Net`."""
    return Serial(layers)


def parallel(*layers: Layer) -> Net:
    """Apply ``layers[i]`` to branch ``i`` (use after ``FanOut(len(layers))``)."""
    return Parallel(layers)


def repeat(layer: Layer, n: int) -> Net:
    """``layer`` applied ``n`` times in sequence: ``serial(*[layer] * n)`` (NT's ``stax.repeat``).

    The kernel is the ``n``-fold composition ``k ↦ layer.kernel(k)``; in the finite twin every copy gets its own
    parameters (independent draws, as in ``serial``), so the twin's limit is that composition. ``layer`` must map
    its output shape to an input it accepts again (e.g. ``Dense(w)`` then a nonlinearity). ``n = 0`` is the
    identity (an empty ``serial``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"repeat(layer, n={n!r}): n must be an integer >= 0.")
    if not isinstance(layer, Layer):
        raise TypeError(f"repeat(...) layer is {type(layer).__name__}, not an ntkit layer.")
    return Serial((layer,) * n)
