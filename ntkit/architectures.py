"""Ready-made convolutional architectures whose kernels are standard in the literature.

* :func:`myrtle` — Myrtle-5/7/10 (Shankar et al. 2020, "Neural kernels without tangents"): groups of
  3×3 SAME convolutions with ReLU, 2×2 average pools between groups, a global average pool and a Dense
  readout.
* :func:`cntk` — the CNTK-V (vectorised: Flatten readout) and CNTK-GAP (global average pool readout) nets
  of Arora et al. 2019 ("On exact computation with an infinitely wide neural net") at any depth.
* :func:`wide_resnet` — a Wide-ResNet-style residual CNN (Zagoruyko & Komodakis 2016) in the pre-activation
  form used by Novak et al. 2019 / NT's examples.
* :func:`fc_net` — the fully-connected ReLU network of the estimators and the CLI (``fc3``).

Every function returns a :class:`~ntkit.nets.Net`: ``net.kernel_fn(x)`` for the kernels, ``net.module(...)``
for the finite network (``channels`` / ``width`` only matter for the finite twin in the NTK
parameterisation). Inputs are channels-first ``(N, C, H, W)``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

from ntkit.layers import AvgPool, Conv, Dense, FanInSum, FanOut, Flatten, GlobalAvgPool, Identity, Relu
from ntkit.layers.base import Layer
from ntkit.nets import Net, parallel, serial

__all__ = ["myrtle", "cntk", "wide_resnet", "fc_net", "MYRTLE_DEPTHS"]

SQRT2 = math.sqrt(2.0)

#: convolutions per group (3 groups) for each Myrtle depth; depth = convs + the Dense readout
MYRTLE_DEPTHS = {5: (2, 1, 1), 7: (2, 2, 2), 10: (3, 3, 3)}


def myrtle(
    depth: int = 5,
    W_std: float = math.sqrt(2.0),
    b_std: Optional[float] = 0.0,
    out_features: int = 10,
    channels: int = 128,
) -> Net:
    """Myrtle-``depth`` (5, 7 or 10) of Shankar et al. 2020, as a kernel.

    ``[Conv3×3 SAME, ReLU] × g1, AvgPool 2×2/2, [Conv, ReLU] × g2, AvgPool 2×2/2, [Conv, ReLU] × g3,
    GlobalAvgPool, Dense(out_features)`` with ``(g1, g2, g3) = (2, 1, 1), (2, 2, 2), (3, 3, 3)``.

    The final global pool is Shankar's 8×8 average pool on 32×32 images (equivalently NT's three
    ``AvgPool((2, 2), (2, 2))`` followed by ``Flatten``), written so that any image size ≥ 4×4 works.
    Defaults ``W_std = √2, b_std = 0`` are those of NT's Myrtle example. Needs the full pixel covariance
    (it pools), so costs ``O((H·W)²)`` per pair of images.
    """
    if depth not in MYRTLE_DEPTHS:
        raise ValueError(f"myrtle(depth={depth!r}): choose one of {sorted(MYRTLE_DEPTHS)}.")
    g1, g2, g3 = MYRTLE_DEPTHS[depth]

    def block(n):
        return [
            layer
            for _ in range(n)
            for layer in (Conv(channels, (3, 3), padding="SAME", W_std=W_std, b_std=b_std), Relu())
        ]

    layers = (
        block(g1)
        + [AvgPool((2, 2), (2, 2))]
        + block(g2)
        + [AvgPool((2, 2), (2, 2))]
        + block(g3)
        + [GlobalAvgPool(), Dense(out_features, W_std, b_std)]
    )
    return serial(*layers)


def cntk(
    depth: int,
    pooling: str = "gap",
    W_std: float = math.sqrt(2.0),
    b_std: Optional[float] = None,
    out_features: int = 1,
    channels: int = 128,
    kernel_size: int = 3,
) -> Net:
    """CNTK-V / CNTK-GAP of Arora et al. 2019 with ``depth`` convolutional layers.

    ``[Conv k×k SAME (stride 1), ReLU] × depth`` then ``Flatten`` (``pooling="flatten"``: CNTK-V, the
    kernel only tracks same-pixel covariances, ``O(H·W)`` per pair) or ``GlobalAvgPool``
    (``pooling="gap"``: CNTK-GAP, full covariance, ``O((H·W)²)`` per pair), and a Dense readout.
    ``W_std = √2`` is Arora et al.'s ``c_σ = 2`` for ReLU; no bias, as in the paper.
    """
    if not (isinstance(depth, int) and depth >= 1):
        raise ValueError(f"cntk(depth={depth!r}): depth (number of conv layers) must be an int >= 1.")
    readouts = {"gap": GlobalAvgPool, "flatten": Flatten, "v": Flatten}
    if pooling.lower() not in readouts:
        raise ValueError(f"cntk(pooling={pooling!r}): choose 'gap' (CNTK-GAP) or 'flatten' (CNTK-V).")
    layers = []
    for _ in range(depth):
        layers += [Conv(channels, (kernel_size, kernel_size), padding="SAME", W_std=W_std, b_std=b_std), Relu()]
    layers += [readouts[pooling.lower()](), Dense(out_features, W_std=1.0, b_std=b_std)]
    return serial(*layers)


def _wrn_block(channels: int, strides: int, project: bool, W_std: float, b_std: Optional[float]) -> Net:
    conv = lambda s: Conv(channels, (3, 3), strides=(s, s), padding="SAME", W_std=W_std, b_std=b_std)
    main = serial(Relu(), conv(strides), Relu(), conv(1))
    shortcut = conv(strides) if project else Identity()
    return serial(FanOut(2), parallel(main, shortcut), FanInSum())


def wide_resnet(
    blocks_per_group: int = 1, k: int = 1, out_features: int = 10, W_std: float = 1.0, b_std: Optional[float] = 0.0
) -> Net:
    """A Wide-ResNet-style residual CNN: ``Conv3×3(16)``, three groups of ``blocks_per_group`` pre-activation
    residual blocks with ``16k, 32k, 64k`` channels (the 2nd and 3rd groups downsample with stride 2; the
    first block of each group has a 3×3 conv shortcut), ``GlobalAvgPool`` and ``Dense(out_features)``.

    Residual block: ``x + Conv(ReLU(Conv(ReLU(x))))`` (branches independent, so ``K = K_main + K_shortcut``).
    """
    if not (isinstance(blocks_per_group, int) and blocks_per_group >= 1):
        raise ValueError(f"wide_resnet(blocks_per_group={blocks_per_group!r}) must be an int >= 1.")
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"wide_resnet(k={k!r}): the widening factor must be an int >= 1.")
    layers: list[Layer] = [Conv(16, (3, 3), padding="SAME", W_std=W_std, b_std=b_std)]
    for ch, s in ((16 * k, 1), (32 * k, 2), (64 * k, 2)):
        layers.append(_wrn_block(ch, s, True, W_std, b_std))
        layers += [_wrn_block(ch, 1, False, W_std, b_std) for _ in range(blocks_per_group - 1)]
    layers += [GlobalAvgPool(), Dense(out_features, W_std, b_std)]
    return serial(*layers)


def fc_net(
    depth: int = 3, W_std: float = SQRT2, b_std: Optional[float] = 0.05, width: int = 512, out_features: int = 1
) -> Net:
    """``[Dense(width, W_std, b_std), Relu()] × depth`` then ``Dense(out_features, 1.0, b_std)``.

    ``W_std = √2`` keeps the ReLU pre-activation variance constant with depth (He initialisation);
    ``width`` matters only for the finite twin. This is the CLI's ``fc3`` (``depth=3``).
    """
    if isinstance(depth, bool) or not (isinstance(depth, numbers.Integral) and depth >= 0):
        raise ValueError(f"depth={depth!r} must be an int >= 0 (number of hidden ReLU layers).")
    layers: list = []
    for _ in range(int(depth)):
        layers += [Dense(width, W_std=W_std, b_std=b_std), Relu()]
    return serial(*layers, Dense(out_features, W_std=1.0, b_std=b_std))
