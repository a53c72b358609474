"""Old import paths of 0.1, kept for one release (removed in 0.3): each shim module calls :func:`moved`."""

from __future__ import annotations

import warnings

__all__ = ["moved", "REMOVED_IN"]

REMOVED_IN = "0.3"


def moved(old: str, new: str) -> None:
    """Warn that module ``old`` is now ``new`` (a ``DeprecationWarning`` pointing at the importer)."""
    warnings.warn(
        f"{old} moved to {new} in ntkit 0.2; import it from there (the old path is removed in {REMOVED_IN}).",
        DeprecationWarning,
        stacklevel=3,
    )
