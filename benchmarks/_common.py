"""Helpers shared by the benchmarks: machine description, timing, and running NT in its own venv."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Optional

import torch

import ntkit.memory

NT_PYTHON = os.environ.get("NTKIT_NT_PYTHON", "/tmp/ntenv/bin/python")


def tuning_flag(parser: argparse.ArgumentParser) -> None:
    """``--no-tune-allocator``: measure without ntkit's opt-in allocator tuning (on by default here, as a long
    kernel job would use it; see ntkit.memory.tune_allocator and BENCHMARKS.md)."""
    parser.add_argument(
        "--no-tune-allocator",
        dest="tune_allocator",
        action="store_false",
        help="do not call ntkit.memory.tune_allocator() (glibc thresholds, huge pages)",
    )


_TUNING = {"malloc": False, "huge_pages": False}


def apply_tuning(args: argparse.Namespace) -> dict:
    """Call the opt-in tuning unless ``--no-tune-allocator``; returns what is in effect (also in :func:`machine`)."""
    if getattr(args, "tune_allocator", True):
        _TUNING.update(ntkit.memory.tune_allocator())
    return dict(_TUNING)


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "ntkit_allocator_tuning": dict(_TUNING),
    }


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def run_nt(script: str, *args: str, timeout: float = 3600) -> Optional[list[dict]]:
    """Run ``script`` (Python source using neural_tangents) in NT's venv; parse its JSON lines.

    Returns None when NT's venv is absent (the benchmark then reports ntkit alone).
    """
    if not os.path.exists(NT_PYTHON):
        return None
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([NT_PYTHON, "-c", script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        print(json.dumps({"nt_error": proc.stderr.strip().splitlines()[-1:] or proc.returncode}), file=sys.stderr)
        return None
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def round_summary(prefix: str, ratios: list[float]) -> dict:
    """``{prefix}_median``, ``_min`` and ``_max`` of the per-round ratios of a ``--rounds`` run (3 decimals)."""
    ordered = sorted(ratios)
    mid = len(ordered) // 2
    median = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0
    return {
        f"{prefix}_median": round(median, 3),
        f"{prefix}_min": round(ordered[0], 3),
        f"{prefix}_max": round(ordered[-1], 3),
    }
