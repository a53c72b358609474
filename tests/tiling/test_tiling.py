"""Tiled kernels (ntkit.tiling): tiled == untiled with ragged tiles, the resumable store, lazy operators."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import rel_err

import ntkit
from ntkit.linalg import as_operator
from ntkit.tiling import (
    CorruptTileError,
    KernelFnOperator,
    KernelStore,
    StoreMismatchError,
    TilePlan,
    kernel_matrix,
)

pytest.importorskip("zarr")


pytestmark = pytest.mark.usefixtures("one_thread")


def fc_net(depth=2, b_std=0.1):
    layers = []
    for _ in range(depth):
        layers += [ntkit.Dense(512, 1.5, b_std), ntkit.Relu()]
    return ntkit.serial(*layers, ntkit.Dense(1, 1.5, b_std))


@pytest.fixture(scope="module")
def fc_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1037, 6, generator=g, dtype=torch.float64)
    net = fc_net()
    full = net.kernel_fn(x, None, ("nngp", "ntk"))
    return net, x, full


def test_plan_ragged_and_triangle():
    p = TilePlan(1037, 1037, 100, symmetric=True)
    tiles = list(p)
    assert len(tiles) == len(p) == 11 * 12 // 2
    assert tiles[-1].r1 == 1037 and tiles[-1].r1 - tiles[-1].r0 == 37
    assert all(t.bi <= t.bj for t in tiles)
    q = TilePlan(1037, 333, 77, symmetric=False)
    cover = np.zeros((1037, 333), int)
    for t in q:
        cover[t.r0 : t.r1, t.c0 : t.c1] += 1
    assert (cover == 1).all()


def test_tiled_equals_untiled_fc(fc_data):
    net, x, full = fc_data
    calls = []
    out = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), tile_size=100, on_tile=calls.append)
    assert len(calls) == 66  # upper block triangle of an 11 x 11 grid only
    for name in ("nngp", "ntk"):
        assert rel_err(out[name], getattr(full, name)) < 1e-13
        assert torch.equal(out[name], out[name].T)
    x2 = x[:333] * 0.7 + 0.1
    rect = kernel_matrix(net.kernel_fn, x, x2, "ntk", tile_size=100)
    assert rel_err(rect, net.kernel_fn(x, x2, "ntk")) < 1e-13


def test_tiled_equals_untiled_cnn():
    g = torch.Generator().manual_seed(1)
    # diagonal-spatial CNN (no pooling) at n = 1037 with tiles of 100
    x = torch.randn(1037, 2, 4, 4, generator=g, dtype=torch.float64)
    net = ntkit.serial(
        ntkit.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        ntkit.Relu(),
        ntkit.Flatten(),
        ntkit.Dense(1, 1.4, 0.1),
    )
    tiled = kernel_matrix(net.kernel_fn, x, None, "ntk", tile_size=100)
    assert rel_err(tiled, net.kernel_fn(x, None, "ntk")) < 1e-12
    # a pooling CNN (full pixel-pixel covariance) with a ragged tile
    xs = x[:57, :, :3, :3]
    pool = ntkit.serial(ntkit.Conv(8, (2, 2), padding="SAME"), ntkit.Relu(), ntkit.GlobalAvgPool(), ntkit.Dense(1))
    tiled = kernel_matrix(pool.kernel_fn, xs, None, ("nngp", "ntk"), tile_size=10)
    ref = pool.kernel_fn(xs, None, ("nngp", "ntk"))
    assert rel_err(tiled["ntk"], ref.ntk) < 1e-12 and rel_err(tiled["nngp"], ref.nngp) < 1e-12


def test_store_roundtrip_resume_and_operator(fc_data, tmp_path):
    net, x, full = fc_data
    path = tmp_path / "k"
    calls = []
    ks = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), tile_size=100, store=path, on_tile=calls.append)
    assert isinstance(ks, KernelStore) and ks.is_complete and len(calls) == 66
    assert rel_err(ks.to_tensor("ntk"), full.ntk) < 1e-13
    # resume: nothing recomputed; tile size adopted from the store when not given
    again = []
    ks2 = kernel_matrix(net.kernel_fn, x, None, ("nngp", "ntk"), store=path, on_tile=again.append)
    assert again == [] and ks2.plan.tile_size == 100
    # the lazy matrix: products, columns and diagonal without loading it whole
    m = ks.matrix("ntk")
    v = torch.randn(1037, 3, dtype=torch.float64)
    assert rel_err(m @ v, full.ntk @ v) < 1e-12
    idx = [0, 99, 100, 555, 1036]
    assert rel_err(m.columns(idx), full.ntk[:, idx]) < 1e-13
    assert rel_err(m.diagonal(), torch.diagonal(full.ntk)) < 1e-13
    assert rel_err(as_operator(KernelStore(path)["nngp"]) @ v[:, 0], full.nngp @ v[:, 0]) < 1e-12
    with pytest.raises(ValueError, match="say which one"):
        ks.to_tensor()


def test_store_refuses_other_jobs(fc_data, tmp_path):
    net, x, _ = fc_data
    xs = x[:150]
    path = tmp_path / "k"
    kernel_matrix(net.kernel_fn, xs, None, "nngp", tile_size=64, store=path)
    with pytest.raises(StoreMismatchError, match="x1"):
        kernel_matrix(net.kernel_fn, xs + 1e-9, None, "nngp", store=path)
    with pytest.raises(StoreMismatchError, match="kernel"):
        kernel_matrix(fc_net(depth=3).kernel_fn, xs, None, "nngp", store=path)
    with pytest.raises(StoreMismatchError, match="get"):
        kernel_matrix(net.kernel_fn, xs, None, "ntk", store=path)
    with pytest.raises(StoreMismatchError, match="tile_size"):
        kernel_matrix(net.kernel_fn, xs, None, "nngp", tile_size=50, store=path)
    opaque = object()  # a closure over something without a stable identity: refused, naming description=
    with pytest.raises(ValueError, match="description"):
        kernel_matrix(lambda a, b, get: (opaque, net.kernel_fn(a, b, get))[1], xs, None, "nngp", store=tmp_path / "l")
    with pytest.raises(ValueError, match="tile_size"):
        kernel_matrix(net.kernel_fn, xs, None, "nngp", tile_size=0)


def test_corrupt_tile_is_detected_and_recomputed(fc_data, tmp_path):
    net, x, _ = fc_data
    xs = x[:150]
    path = tmp_path / "k"
    ks = kernel_matrix(net.kernel_fn, xs, None, "nngp", tile_size=64, store=path)
    good = ks.to_tensor()
    t = ks.plan.tile(0, 1)
    chunk = ks._chunk_path("nngp", t)
    raw = bytearray(chunk.read_bytes())
    raw[80] ^= 0xFF  # one flipped byte
    chunk.write_bytes(bytes(raw))
    with pytest.raises(CorruptTileError, match="checksum"):
        KernelStore(path).to_tensor()
    assert [b.key for b in KernelStore(path).verify()] == ["0_1"]
    redo = []
    ks = kernel_matrix(net.kernel_fn, xs, None, "nngp", store=path, on_tile=redo.append)
    assert [r.key for r in redo] == ["0_1"]
    assert torch.equal(ks.to_tensor(), good)
    # a finished marker without its chunk data (never written durably) is also caught
    rec = json.loads((path / "tiles" / "1_2.json").read_text())
    assert set(rec) >= {"rows", "cols", "crc32"}


def test_store_dtype_and_rectangular(fc_data, tmp_path):
    net, x, full = fc_data
    xs, x2 = x[:200], x[500:590]
    ks = kernel_matrix(net.kernel_fn, xs, x2, "nngp", tile_size=64, store=tmp_path / "r", dtype=torch.float32)
    assert ks.dtype == torch.float32 and not ks.symmetric
    ref = net.kernel_fn(xs, x2, "nngp")
    assert rel_err(ks.to_tensor(), ref) < 1e-6
    v = torch.randn(90, 2, dtype=torch.float64)
    assert rel_err(ks.matrix() @ v, ref @ v) < 1e-6
    assert rel_err(ks.matrix().columns([3, 70, 89]), ref[:, [3, 70, 89]]) < 1e-6


def test_kernel_fn_operator_matrix_free(fc_data):
    net, x, full = fc_data
    op = KernelFnOperator(net.kernel_fn, x, get="ntk", tile_size=128)
    v = torch.randn(1037, 2, dtype=torch.float64)
    assert rel_err(op @ v, full.ntk @ v) < 1e-12
    assert rel_err(op.diagonal(), torch.diagonal(full.ntk)) < 1e-13
    assert rel_err(op.columns([5, 1000]), full.ntk[:, [5, 1000]]) < 1e-12
    with pytest.raises(ValueError, match="one matrix"):
        KernelFnOperator(net.kernel_fn, x, get=("nngp", "ntk"))


def test_auto_tile_size_and_memory_errors(fc_data):
    net, x, full = fc_data
    xs = x[:300]
    out = kernel_matrix(net.kernel_fn, xs, None, "nngp", memory_budget=50 * 300 * 8 * 12)
    assert rel_err(out, full.nngp[:300, :300]) < 1e-13
    with pytest.raises(MemoryError, match="budget"):
        kernel_matrix(net.kernel_fn, xs, None, "nngp", memory_budget=10)


def test_progress_bar_runs(fc_data, capsys):
    net, x, full = fc_data
    out = kernel_matrix(net.kernel_fn, x[:120], None, "nngp", tile_size=50, progress=True)
    assert rel_err(out, full.nngp[:120, :120]) < 1e-13
