"""Crash safety of the kernel store: a job SIGKILLed at random moments, then resumed.

The job writes every tile start (before computing) and finish (after the tile is durable) to a log; the test
kills it three times after random delays (fixed seed), checks after each kill that no tile on disk fails its
checksum, resumes to completion, and compares with an uninterrupted in-memory run bit for bit. A tile is
computed again only as often as it was in flight at a kill.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("zarr")

REPO = Path(__file__).resolve().parents[1]

# the job's data and net; also run in the test process for the uninterrupted reference
SETUP = r"""
import torch
import ntkit
n = 301
x = torch.linspace(-1, 1, n * 3, dtype=torch.float64).reshape(n, 3).sin()
x[:, 0] = torch.arange(n, dtype=torch.float64)  # the first feature names the sample
net = ntkit.serial(ntkit.Dense(64, 1.3, 0.2), ntkit.Relu(), ntkit.Dense(1, 1.3, 0.2))
"""

JOB = (
    SETUP
    + r"""
import os, sys, time
from ntkit.tiling import kernel_matrix

store, log = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

def kfn(a, b, get):
    if a.shape[0] == 1:  # the store's one-pair probe of the kernel's dtype and shape
        return net.kernel_fn(a, b, get)
    os.write(fd, f"start {int(a[0, 0])} {int((a if b is None else b)[0, 0])}\n".encode())
    time.sleep(0.03)  # a slow kernel: kills land mid-computation
    return net.kernel_fn(a, b, get)

def done(t):
    os.write(fd, f"done {t.r0} {t.c0}\n".encode())

os.write(fd, b"ready\n")
kernel_matrix(kfn, x, None, "ntk", tile_size=23, store=store, description="kill-test", on_tile=done)
os.write(fd, b"complete\n")
"""
)


def _wait_ready(log: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if log.exists() and log.read_text().count("ready") > _wait_ready.seen:
            _wait_ready.seen += 1
            return
        if proc.poll() is not None:
            raise RuntimeError(f"job exited early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    raise TimeoutError("job did not start")


_wait_ready.seen = 0


def test_sigkill_three_times_then_resume(tmp_path):
    from ntkit.tiling import KernelStore, kernel_matrix

    script = tmp_path / "job.py"
    script.write_text(JOB)
    store, log = tmp_path / "store", tmp_path / "log.txt"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    rng = random.Random(1234)
    _wait_ready.seen = 0
    runs = []  # per run: the log lines it wrote
    for _kill in range(3):
        before = log.read_text().splitlines() if log.exists() else []
        proc = subprocess.Popen([sys.executable, str(script), str(store), str(log)], env=env, stderr=subprocess.PIPE)
        _wait_ready(log, proc)
        time.sleep(rng.uniform(0.3, 1.2))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        runs.append(log.read_text().splitlines()[len(before) :])
        if (store / "manifest.json").exists():
            assert KernelStore(store).verify() == []  # nothing on disk is read as valid unless it is
    before = log.read_text().splitlines()
    res = subprocess.run([sys.executable, str(script), str(store), str(log)], env=env, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    runs.append(log.read_text().splitlines()[len(before) :])
    assert runs[-1][-1] == "complete"
    assert all("complete" not in r for r in runs[:-1]), "a kill came too late to interrupt the job"

    # recomputed tiles: only those in flight (started, not finished) when a kill landed, once per such kill (a
    # tile can be in flight at two kills in a row: it is the first one the next run takes up again)
    starts = Counter(l for r in runs for l in r if l.startswith("start"))
    in_flight: Counter = Counter()
    for r in runs[:-1]:
        started = [l[6:] for l in r if l.startswith("start")]
        finished = {l[5:] for l in r if l.startswith("done")}
        if started and started[-1] not in finished:
            in_flight["start " + started[-1]] += 1
    for tile, count in starts.items():
        assert count - 1 <= in_flight[tile], (tile, count, in_flight[tile])
    assert sum(in_flight.values()) <= 3
    assert len(starts) == 14 * 15 // 2  # every tile of the 14 x 14 upper triangle computed

    # same matrix as an uninterrupted run, bit for bit (same code and one thread: deterministic)
    ns = {}
    exec(SETUP, ns)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = kernel_matrix(ns["net"].kernel_fn, ns["x"], None, "ntk", tile_size=23)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(KernelStore(store).to_tensor(), ref)
