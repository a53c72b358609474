"""The identity of a kernel store (issue #16, item 2): the fingerprint of the resolved net, never a repr or a
command line. Two nets that differ anywhere — a hyper-parameter, the code of an ``Elementwise`` lambda, a value
its closure reads — are refused on resume with both descriptions in full; the same net rebuilt (in this process
or another one, under another hash seed) is accepted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ntkit
from ntkit.tiling import KernelStore, StoreMismatchError, kernel_matrix
from ntkit.tiling.fingerprint import FingerprintError
from ntkit.tiling.plan import describe_kernel_fn

pytest.importorskip("zarr")

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _x(n=60, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _net(fn):
    return ntkit.serial(ntkit.Dense(16, 1.3, 0.1), ntkit.Elementwise(fn), ntkit.Dense(1, 1.3, 0.1))


def _crash_after(k):
    class Crash(Exception):
        pass

    count = [0]

    def on_tile(t):
        count[0] += 1
        if count[0] == k:
            raise Crash

    return Crash, on_tile


def test_lambdas_with_one_repr_are_refused_not_mixed(tmp_path):
    """The reported defect: a store half filled by one net, resumed with another whose repr is the same."""
    a, b = _net(lambda x: torch.tanh(x)), _net(lambda x: torch.sin(x))
    assert repr(a) == repr(b)  # what the store used to compare
    x, path = _x(), tmp_path / "k"
    crash, on_tile = _crash_after(3)
    with pytest.raises(crash):
        kernel_matrix(a.kernel_fn, x, None, "ntk", tile_size=20, store=path, on_tile=on_tile)
    with pytest.raises(StoreMismatchError) as err:
        kernel_matrix(b.kernel_fn, x, None, "ntk", tile_size=20, store=path)
    msg = str(err.value)
    stored = KernelStore(path).manifest["kernel"]
    assert describe_kernel_fn(a.kernel_fn) == stored
    # both descriptions in full (not cut at 120 characters), and where they first differ
    assert stored in msg and describe_kernel_fn(b.kernel_fn) in msg and len(stored) > 200
    assert "first difference at character" in msg and "kernel" in msg
    # the right net resumes it, and the result is that net's kernel alone
    ks = kernel_matrix(a.kernel_fn, x, None, "ntk", tile_size=20, store=path)
    torch.testing.assert_close(ks.to_tensor(), a.kernel_fn(x, None, "ntk"), rtol=1e-12, atol=1e-12)


def test_every_part_of_the_net_is_in_the_identity():
    def scaled(s):
        return _net(lambda x: s * torch.tanh(x))

    base = describe_kernel_fn(scaled(2.0).kernel_fn)
    assert describe_kernel_fn(scaled(2.0).kernel_fn) == base  # rebuilt: same identity
    assert describe_kernel_fn(scaled(2.5).kernel_fn) != base  # the closure's value
    w = ntkit.serial(ntkit.Dense(16, 1.3, 0.1), ntkit.Relu(), ntkit.Dense(1, 1.3, 0.1))
    w2 = ntkit.serial(ntkit.Dense(16, 1.3 + 1e-12, 0.1), ntkit.Relu(), ntkit.Dense(1, 1.3, 0.1))
    assert describe_kernel_fn(w.kernel_fn) != describe_kernel_fn(w2.kernel_fn)  # exact floats
    e1 = ntkit.serial(ntkit.Dense(4), ntkit.Elementwise(torch.tanh, deg=25), ntkit.Dense(1))
    e2 = ntkit.serial(ntkit.Dense(4), ntkit.Elementwise(torch.tanh, deg=30), ntkit.Dense(1))
    e3 = ntkit.serial(ntkit.Dense(4), ntkit.Elementwise(torch.sin, name="tanh"), ntkit.Dense(1))
    ids = {describe_kernel_fn(n.kernel_fn) for n in (e1, e2, e3)}
    assert len(ids) == 3 and "torch.tanh" in describe_kernel_fn(e1.kernel_fn)
    # tensor-valued hyper-parameters (Net.with_hyperparameters copies) by value
    t1 = w.with_hyperparameters({"0.W_std": torch.tensor(1.5, dtype=torch.float64)})
    t2 = w.with_hyperparameters({"0.W_std": torch.tensor(1.6, dtype=torch.float64)})
    assert describe_kernel_fn(t1.kernel_fn) != describe_kernel_fn(t2.kernel_fn)


def test_globals_and_defaults_read_by_user_functions():
    ns: dict = {}
    code = "import torch\nSCALE = 2.0\ndef act(x, p=1.0):\n    return SCALE * torch.tanh(p * x)\n"
    exec(code, ns)
    a = describe_kernel_fn(_net(ns["act"]).kernel_fn)
    ns["SCALE"] = 3.0
    b = describe_kernel_fn(_net(ns["act"]).kernel_fn)
    ns["SCALE"], ns["act"].__defaults__ = 2.0, (1.5,)
    c = describe_kernel_fn(_net(ns["act"]).kernel_fn)
    assert len({a, b, c}) == 3 and "SCALE=2.0" in a


def test_unfingerprintable_objects_are_refused_or_named_by_description(tmp_path):
    opaque = object()
    net = _net(lambda x: torch.tanh(x) if opaque is not None else x)
    with pytest.raises(FingerprintError, match="description="):
        kernel_matrix(net.kernel_fn, _x(), None, "ntk", store=tmp_path / "a")
    assert isinstance(FingerprintError("x"), ValueError)
    ident = describe_kernel_fn(net.kernel_fn, description="tanh net v1")
    assert ident.startswith("tanh net v1 | ntkit:") and "<unfingerprinted object>" in ident
    # a fully fingerprintable net ignores the description: the identity is the net's
    ok = _net(torch.tanh)
    assert describe_kernel_fn(ok.kernel_fn, description="anything") == describe_kernel_fn(ok.kernel_fn)


def test_plain_functions_and_closures(tmp_path):
    net = _net(torch.tanh)
    other = _net(torch.sin)
    x = _x()
    # a closure over a net is fingerprinted through it (no description needed any more)
    k1 = describe_kernel_fn(lambda a, b, g: net.kernel_fn(a, b, g))
    k2 = describe_kernel_fn(lambda a, b, g: other.kernel_fn(a, b, g))
    assert k1 != k2
    kernel_matrix(lambda a, b, g: net.kernel_fn(a, b, g), x, None, "nngp", tile_size=30, store=tmp_path / "c")
    with pytest.raises(StoreMismatchError, match="kernel"):
        kernel_matrix(lambda a, b, g: other.kernel_fn(a, b, g), x, None, "nngp", store=tmp_path / "c")
    # with a description, a plain function is its description plus the digest of its own code
    d1 = describe_kernel_fn(lambda a, b, g: net.kernel_fn(a, b, g), description="v1")
    d2 = describe_kernel_fn(lambda a, b, g: 2 * net.kernel_fn(a, b, g), description="v1")
    assert d1.startswith("v1 | code sha256:") and d1 != d2


SPEC_ID = r"""
import json, runpy, sys
from ntkit.tiling.plan import describe_kernel_fn
ns = runpy.run_path(sys.argv[1])
print(json.dumps(describe_kernel_fn(ns["make_net"](10).kernel_fn)))
"""

SPEC = """import torch
import ntkit as nt
GAIN = {gain}
def make_net(n_outputs):
    return nt.serial(nt.Dense(64, W_std=1.4), nt.Elementwise(lambda x: GAIN * torch.tanh(x), deg=20),
                     nt.Dense(n_outputs))
"""


def test_identity_is_stable_across_processes_and_hash_seeds(tmp_path):
    """A store is resumed by a new process: the fingerprint may depend on nothing that varies between runs."""
    spec = tmp_path / "spec.py"
    spec.write_text(SPEC.format(gain=1.5))
    script = tmp_path / "ident.py"
    script.write_text(SPEC_ID)

    def ident(seed):
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONHASHSEED=str(seed))
        r = subprocess.run(
            [sys.executable, str(script), str(spec)], env=env, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    a, b = ident(1), ident(2)
    assert a == b and "code sha256:" in a and "GAIN=1.5" in a
    spec.write_text("# a comment moves the code down a line\n" + SPEC.format(gain=1.5))
    assert ident(3) == a  # line numbers are not part of the identity
    spec.write_text(SPEC.format(gain=1.25))
    assert ident(1) != a
