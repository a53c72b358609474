"""Deprecated names of 0.1 that live on in modules that still exist, kept for one release (removed in 0.3).

``ntkit.nets.myrtle`` / ``cntk`` / ``wide_resnet`` (now :mod:`ntkit.architectures`): ``ntkit.nets`` sits below
``ntkit.architectures`` and may not import it, so the package's top (which imports both) installs a module
``__getattr__`` on ``ntkit.nets`` that answers those names with a ``DeprecationWarning``. Moved *modules*
(``ntkit.solvers``, ``ntkit.sklearn``, ...) are small shim modules instead (:mod:`ntkit._deprecation`).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import ntkit.architectures as _architectures
import ntkit.nets as _nets
from ntkit._deprecation import REMOVED_IN

__all__ = ["install"]

_NETS_MOVED = ("myrtle", "cntk", "wide_resnet", "MYRTLE_DEPTHS")


def _nets_getattr(name: str) -> Any:
    if name in _NETS_MOVED:
        warnings.warn(
            f"ntkit.nets.{name} moved to ntkit.architectures.{name} in ntkit 0.2 (the old name is "
            f"removed in {REMOVED_IN}).",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_architectures, name)
    raise AttributeError(f"module 'ntkit.nets' has no attribute {name!r}")


def install() -> None:
    """Answer the deprecated names (idempotent)."""
    # a PEP 562 module __getattr__; typeshed declares ModuleType.__getattr__ as a method
    sys.modules[_nets.__name__].__getattr__ = _nets_getattr  # type: ignore[method-assign]
