"""Deprecated: ``ntkit.tiling.distributed`` is :mod:`ntkit.distributed` since 0.2."""

from ntkit._deprecation import moved

moved("ntkit.tiling.distributed", "ntkit.distributed")

from ntkit.distributed import DistContext, all_reduce_, barrier, broadcast_object, context  # noqa: E402

__all__ = ["DistContext", "context", "all_reduce_", "barrier", "broadcast_object"]
