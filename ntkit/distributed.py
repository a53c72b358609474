"""torch.distributed plumbing for tiled kernels and distributed solvers.

A job launched with ``torchrun --nproc-per-node=P script.py`` (or across nodes) runs the same script in P
processes. :func:`context` joins the process group the launcher describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``... in the environment): NCCL and ``cuda:LOCAL_RANK`` when CUDA is present, gloo on the CPU
otherwise. Without a launcher everything runs as a single process (rank 0 of 1) and no group is made.

Only three collectives are used: a barrier, ``all_reduce`` (sum) of a tensor, and a broadcast of a small
Python object (the run id). Reductions of tensors in which every entry is written by exactly one rank (the rest
holding zeros) are exact, so results do not depend on the number of processes.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DistContext", "context", "all_reduce_", "barrier", "broadcast_object"]


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, computing on ``device``."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def context(device: Optional[torch.device | str] = None, init: bool = True) -> DistContext:
    """The distributed context of this process, joining the launcher's process group on first use.

    ``device=None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU. ``init=False`` never
    creates a process group (a group made elsewhere is still used).
    """
    if init and not dist.is_initialized() and _launched():
        use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # the group ntkit made is ntkit's to close: a gloo/nccl group still alive at interpreter exit can
        # abort the process ("terminate called without an active exception") after the work succeeded
        atexit.register(_destroy_group)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device is None:
        if torch.cuda.is_available() and world > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        elif torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            device = torch.device("cpu")
    return DistContext(rank=rank, world_size=world, device=torch.device(device))


def _destroy_group() -> None:
    """Destroy the process group at exit (best effort; no barrier, so a crashed peer cannot hang this exit)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks, in place (no-op for a single process). Returns ``t``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    dev = _comm_device()
    if t.device == dev:
        dist.all_reduce(t)
        return t
    buf = t.to(dev)
    dist.all_reduce(buf)
    t.copy_(buf)
    return t


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (the object itself for a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
