"""Architecture names the CLI understands (``--arch``), mapped to ntkit networks.

========================  ================================================================================
name                      network
========================  ================================================================================
``fc<L>`` (default fc3)   ``[Dense(512, W_std=√2, b_std=0.05), Relu()] × L, Dense(K, 1.0, 0.05)`` (fc_net)
``myrtle5|7|10``          Myrtle CNN of Shankar et al. 2020 (needs image data)
``cntk-gap<L>``           CNTK-GAP of Arora et al. 2019 with L conv layers (needs image data)
``cntk-v<L>``             CNTK-V (Flatten readout) with L conv layers (needs image data)
``wrn``                   Wide-ResNet-style residual CNN (needs image data)
``path/to/spec.py``       a Python file defining ``make_net(n_outputs)`` or a ``net``
========================  ================================================================================

``K`` is the number of classes (it only matters for the finite twin: the kernel is traced over outputs).
"""

from __future__ import annotations

import re
import runpy
from dataclasses import dataclass
from pathlib import Path

from ntkit import architectures as A
from ntkit.architectures import fc_net
from ntkit.nets import Net

__all__ = ["Arch", "ArchError", "resolve_arch", "ARCH_HELP"]

ARCH_HELP = "fc<depth> (fc3), myrtle5|myrtle7|myrtle10, cntk-gap<depth>, cntk-v<depth>, wrn, or a .py spec file"


class ArchError(ValueError):
    """An unknown architecture name or a spec file that does not define a network."""


@dataclass
class Arch:
    name: str
    net: Net
    images: bool  # expects (N, C, H, W) inputs


def _from_file(path: Path, n_outputs: int) -> Arch:
    if not path.is_file():
        raise ArchError(f"architecture spec file {path} not found.")
    ns = runpy.run_path(str(path))
    if callable(ns.get("make_net")):
        net = ns["make_net"](n_outputs)
    elif "net" in ns:
        net = ns["net"]
    else:
        raise ArchError(
            f"{path} defines neither make_net(n_outputs) nor net; add e.g. "
            f"`net = ntkit.serial(ntkit.Dense(512), ntkit.Relu(), ntkit.Dense(1))`."
        )
    if not isinstance(net, Net):
        raise ArchError(f"{path}: the network must be an ntkit network (ntkit.serial(...)), got {type(net).__name__}.")
    images = bool(ns.get("IMAGES", net.input_rank() not in (None, 2)))
    return Arch(path.stem, net, images)


def resolve_arch(name: str, n_outputs: int) -> Arch:
    """The network for an ``--arch`` value; raises :class:`ArchError` with the list of choices."""
    key = name.strip().lower()
    if key.endswith(".py"):
        return _from_file(Path(name).expanduser(), n_outputs)
    m = re.fullmatch(r"fc(\d+)", key)
    if m:
        depth = int(m.group(1))
        if depth > 100:
            raise ArchError(f"fc{depth}: depth above 100 is not supported (the kernel degenerates).")
        return Arch(key, fc_net(depth, out_features=n_outputs), False)
    m = re.fullmatch(r"myrtle(\d+)", key)
    if m and int(m.group(1)) in A.MYRTLE_DEPTHS:
        return Arch(key, A.myrtle(int(m.group(1)), out_features=n_outputs), True)
    m = re.fullmatch(r"cntk-(gap|v)(\d+)", key)
    if m and int(m.group(2)) >= 1:
        pooling = "gap" if m.group(1) == "gap" else "flatten"
        return Arch(key, A.cntk(int(m.group(2)), pooling=pooling, out_features=n_outputs), True)
    if key == "wrn":
        return Arch(key, A.wide_resnet(out_features=n_outputs), True)
    raise ArchError(f"unknown architecture {name!r}; use {ARCH_HELP}.")
