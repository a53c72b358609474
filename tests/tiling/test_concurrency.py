"""Kernel stores under concurrency and damage (issue #16, item 9).

* independent writer processes started at the same instant on one new store: creation is atomic (one creates,
  the others join), the tiles are shared through claims (each computed once), every writer returns the complete
  store, it equals an in-memory run bit for bit, and no ``claims/`` or build folder is left behind;
* a claim of a dead process is taken over at once, a live one is respected, an old one times out;
* a truncated chunk, a flipped byte, a broken marker, a broken or missing manifest, broken zarr metadata: a clear
  error naming the fix when read, repaired on resume (only the damaged tiles recomputed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

import ntkit
from ntkit.tiling import CorruptTileError, KernelStore, StoreMismatchError, kernel_matrix
from ntkit.tiling.store import Claims, CorruptStoreError

pytest.importorskip("zarr")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")

SETUP = r"""
import torch
import ntkit
g = torch.Generator().manual_seed(3)
x = torch.randn(130, 4, generator=g, dtype=torch.float64)
net = ntkit.serial(ntkit.Dense(64, 1.3, 0.2), ntkit.Erf(), ntkit.Dense(1, 1.3, 0.2))
"""

WRITER = (
    SETUP
    + r"""
import json, os, sys, time
from ntkit.tiling import kernel_matrix
torch.set_num_threads(1)
store, out, gate = sys.argv[1], sys.argv[2], sys.argv[3]
if gate != "-":  # every writer starts at the same instant: say ready, wait for the gate to open
    open(out + ".ready", "w").close()
    while not os.path.exists(gate):
        time.sleep(0.0005)
done = []

def kfn(a, b, get):
    if a.shape[0] > 1:
        time.sleep(0.01)  # a slow kernel, so the writers overlap
    return net.kernel_fn(a, b, get)

ks = kernel_matrix(kfn, x, None, ("nngp", "ntk"), tile_size=13, store=store, description="concurrency-test",
                   on_tile=lambda t: done.append(t.key))
json.dump({"done": done, "complete": ks.is_complete}, open(out, "w"))
"""
)


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def _reference():
    ns: dict = {}
    exec(SETUP, ns)
    return kernel_matrix(ns["net"].kernel_fn, ns["x"], None, ("nngp", "ntk"), tile_size=13)


def test_concurrent_writers_share_one_store(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    ref = _reference()
    for trial, writers in enumerate((2, 3)):
        store, gate = tmp_path / f"store{trial}", tmp_path / f"go{trial}"
        outs = [tmp_path / f"out{trial}_{i}.json" for i in range(writers)]
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(store), str(out), str(gate)], env=_env(), stderr=subprocess.PIPE
            )
            for out in outs
        ]
        t0 = time.time()
        while not all(Path(f"{out}.ready").exists() for out in outs):  # every interpreter has imported ntkit
            assert time.time() - t0 < 180 and all(p.poll() is None for p in procs)
            time.sleep(0.01)
        gate.touch()
        errs = [p.communicate(timeout=240)[1].decode() for p in procs]
        assert all(p.returncode == 0 for p in procs), errs  # no "exists and is not empty"
        results = [json.loads((tmp_path / f"out{trial}_{i}.json").read_text()) for i in range(writers)]
        assert all(r["complete"] for r in results)  # every writer returns the complete store
        counts = Counter(k for r in results for k in r["done"])
        ks = KernelStore(store)
        assert len(counts) == len(ks.plan) == 55  # every tile of the 10 x 10 upper triangle ...
        assert set(counts.values()) == {1}  # ... computed exactly once, by one of the writers
        assert sum(len(r["done"]) > 0 for r in results) >= 2  # the work was shared
        for name in ("nngp", "ntk"):
            assert torch.equal(ks.to_tensor(name), ref[name])
        assert sorted(os.listdir(store)) == ["manifest.json", "nngp", "ntk", "tiles", "zarr.json"]  # no claims/
        assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no build folders left


def test_claims_of_dead_live_and_silent_processes(tmp_path):
    folder = tmp_path / "claims"
    mine = Claims(folder, run="a")
    assert mine.take("0_0") and not Claims(folder, run="b").take("0_0")  # a live claim is respected
    assert mine.owns("0_0")
    mine.release("0_0")
    assert not (folder / "0_0").exists()
    # a claim of a process that has exited (same host): taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert Claims(folder).take("0_1")
    rec = json.loads((folder / "0_1").read_text())
    rec["pid"] = dead.pid
    (folder / "0_1").write_text(json.dumps(rec))
    other = Claims(folder, run="c")
    assert other.take("0_1") and json.loads((folder / "0_1").read_text())["pid"] == os.getpid()
    # a live process on another host: respected while its heartbeat is fresh, taken over once it is older than
    # the timeout
    (folder / "1_1").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "time": time.time()}))
    assert not Claims(folder, timeout=60).take("1_1")
    old = time.time() - 120
    os.utime(folder / "1_1", (old, old))
    assert Claims(folder, timeout=60).take("1_1")
    # the heartbeat keeps one's own claims fresh
    hb = Claims(folder)
    assert hb.take("2_2")
    os.utime(folder / "2_2", (old, old))
    hb.heartbeat()
    assert time.time() - (folder / "2_2").stat().st_mtime < 30


def test_a_writer_killed_holding_claims_does_not_block_the_next(tmp_path):
    """SIGKILL leaves claims behind; the next writer takes them over without waiting for a timeout."""
    import signal

    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    store = tmp_path / "s"
    p = subprocess.Popen([sys.executable, str(script), str(store), str(tmp_path / "o.json"), "-"], env=_env())
    t0 = time.time()
    while not (store / "claims").is_dir() or not any((store / "tiles").iterdir()):
        assert time.time() - t0 < 120 and p.poll() is None
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    left = [n for n in os.listdir(store / "claims") if not n.startswith(".")]
    t1 = time.time()
    r = subprocess.run(
        [sys.executable, str(script), str(store), str(tmp_path / "o2.json"), "-"], env=_env(), timeout=240
    )
    assert r.returncode == 0
    assert time.time() - t1 < 60  # nothing waited for CLAIM_TIMEOUT (120 s)
    assert not (store / "claims").exists()
    ks = KernelStore(store)
    assert torch.equal(ks.to_tensor("ntk"), _reference()["ntk"])
    assert len(left) <= 1  # the one tile in flight at the kill


# ---------------------------------------------------------------------------------------------------------------
# damage
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def filled(tmp_path):
    net = ntkit.serial(ntkit.Dense(32, 1.2, 0.1), ntkit.Relu(), ntkit.Dense(1, 1.2, 0.1))
    x = torch.randn(70, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    path = tmp_path / "k"
    ks = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), tile_size=25, store=path)
    return net, x, path, {n: ks.to_tensor(n) for n in ("nngp", "ntk")}


def _resume(net, x, path):
    redo = []
    ks = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), store=path, on_tile=redo.append)
    return ks, sorted(t.key for t in redo)


def test_truncated_chunk(filled):
    net, x, path, good = filled
    ks = KernelStore(path)
    chunk = ks._chunk_path("ntk", ks.plan.tile(0, 1))
    with open(chunk, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CorruptTileError, match=r"tile 0_1 \(ntk\).*damaged.*Resume the job"):
        KernelStore(path).to_tensor("ntk")
    assert [t.key for t in KernelStore(path).verify()] == ["0_1"]
    ks, redo = _resume(net, x, path)
    assert redo == ["0_1"] and torch.equal(ks.to_tensor("ntk"), good["ntk"])


def test_broken_marker(filled):
    net, x, path, good = filled
    (path / "tiles" / "1_2.json").write_text('{"rows": [25, 50], "crc')
    with pytest.raises(CorruptTileError, match="marker of tile 1_2.*damaged.*recompute"):
        KernelStore(path).to_tensor("nngp")
    (path / "tiles" / "0_0.json").write_text('{"rows": [0, 25]}')  # valid JSON, no checksums
    with pytest.raises(CorruptTileError, match="marker of tile 0_0"):
        KernelStore(path).read_tile(KernelStore(path).plan.tile(0, 0), "ntk")
    ks, redo = _resume(net, x, path)
    assert redo == ["0_0", "1_2"]
    for n in ("nngp", "ntk"):
        assert torch.equal(ks.to_tensor(n), good[n])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing", "not-an-object"])
def test_broken_manifest_is_reported_and_rebuilt(filled, damage):
    net, x, path, good = filled
    mf = path / "manifest.json"
    text = mf.read_text()
    if damage == "garbage":
        mf.write_bytes(b"\x00\xff not json")
    elif damage == "truncated":
        mf.write_text(text[: len(text) // 2])
    elif damage == "missing":
        mf.unlink()
    else:
        mf.write_text("[1, 2]")
    err = FileNotFoundError if damage == "missing" else CorruptStoreError
    with pytest.raises(err, match="damaged"):
        KernelStore(path)
    ks, redo = _resume(net, x, path)  # the tiles' job digests agree with this job: nothing recomputed
    assert redo == [] and ks.manifest.get("repaired") is True
    for n in ("nngp", "ntk"):
        assert torch.equal(ks.to_tensor(n), good[n])


def test_broken_manifest_with_another_job_is_refused(filled):
    net, x, path, _ = filled
    (path / "manifest.json").write_text("{")
    other = ntkit.serial(ntkit.Dense(32, 1.2, 0.1), ntkit.Erf(), ntkit.Dense(1, 1.2, 0.1))
    with pytest.raises(StoreMismatchError, match="manifest of the store .* is damaged and its tiles were made for"):
        kernel_matrix(other.kernel_fn, x, None, ("nngp", "ntk"), store=path)
    with pytest.raises(StoreMismatchError, match="another job"):
        kernel_matrix(net.kernel_fn, x + 1, None, ("nngp", "ntk"), store=path)


def test_broken_zarr_metadata_is_reported_and_rebuilt(filled):
    net, x, path, good = filled
    (path / "ntk" / "zarr.json").write_text("{ broken")
    (path / "zarr.json").write_text("")
    with pytest.raises(CorruptStoreError, match="zarr metadata of 'ntk'.*damaged.*Resume the job"):
        KernelStore(path).to_tensor("ntk")
    ks, redo = _resume(net, x, path)
    assert redo == []  # chunks untouched, their checksums still hold
    for n in ("nngp", "ntk"):
        assert torch.equal(ks.to_tensor(n), good[n])


def test_leftovers_of_killed_writers_are_cleaned_on_resume(filled):
    net, x, path, good = filled
    ks = KernelStore(path)
    t = ks.plan.tile(1, 1)
    ks.invalidate(t)
    chunk = ks._chunk_path("ntk", t)
    partial = chunk.with_name(chunk.name + ".0123abcd.partial")
    partial.write_bytes(b"half")
    marker_tmp = path / "tiles" / ".1_1.json.99999.abc.tmp"
    marker_tmp.write_text("{")
    (path / "claims").mkdir()
    (path / "claims" / "1_1").write_text(json.dumps({"host": "gone", "pid": 1, "token": "x", "time": 0}))
    old = time.time() - 3600
    os.utime(path / "claims" / "1_1", (old, old))
    ks, redo = _resume(net, x, path)
    assert redo == ["1_1"] and not partial.exists() and not marker_tmp.exists()
    assert not (path / "claims").exists()
    assert torch.equal(ks.to_tensor("ntk"), good["ntk"])


def test_a_store_of_format_1_is_read_but_not_resumed(filled):
    net, x, path, good = filled
    m = json.loads((path / "manifest.json").read_text())
    m["format"] = "ntkit-kernel-store/1"
    m["kernel"] = "ntkit:" + repr(net)
    (path / "manifest.json").write_text(json.dumps(m))
    assert torch.equal(KernelStore(path).to_tensor("ntk"), good["ntk"])
    with pytest.raises(StoreMismatchError, match="cannot be resumed safely"):
        kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), store=path)
