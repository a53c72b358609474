"""An out-of-core, resumable kernel matrix: one zarr chunk per tile, one marker file per finished tile.

Layout of a store directory::

    manifest.json        what the matrix is: format, kernel description, get, dtype, shape, tile size,
                         symmetric, SHA-256 of the inputs. Written once, atomically, when the store is made.
    zarr.json, <name>/   a zarr v3 group with one uncompressed array per kernel ("nngp", "ntk"), chunked
                         (tile, tile): every tile is exactly one chunk file.
    tiles/<bi>_<bj>.json the manifest of finished tiles: one small marker per tile with the CRC-32 of its
                         values, written (temp file + fsync + rename) only after the chunk is durable.

Crash safety. A tile is *finished* iff its marker exists, and a marker is only ever written after the chunk
files are on disk (fsync). A process killed at any moment therefore loses at most the tiles it was computing:
their chunk may be absent, stale or half written, but they have no marker and are recomputed on resume. Readers
verify each tile's CRC against its marker, so a chunk damaged later (disk error, a foreign write) raises
:class:`CorruptTileError` instead of being read as valid; resuming with ``verify=True`` recomputes such tiles.

A store made for other inputs, another kernel, dtype or tile size is refused (:class:`StoreMismatchError`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor

from ntkit._tiles import Tile, TilePlan
from ntkit.linalg.operators import TiledOperator

__all__ = ["KernelStore", "StoredMatrix", "StoreMismatchError", "CorruptTileError", "FORMAT"]

FORMAT = "ntkit-kernel-store/1"
# fields whose disagreement makes a store unusable for a job
IDENTITY = ("format", "kernel", "get", "dtype", "n1", "n2", "symmetric", "tile_size", "trailing", "x1", "x2")


class StoreMismatchError(ValueError):
    """The store on disk was made for a different job (inputs, kernel, dtype, tiling)."""


class CorruptTileError(RuntimeError):
    """A finished tile's values no longer match the checksum recorded when it was written."""


def _zarr():
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("kernel stores need zarr>=3: pip install 'ntkit[scale]' (or pip install 'zarr>=3').") from e
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"kernel stores need zarr>=3 (found {zarr.__version__}): pip install -U 'zarr>=3'.")
    return zarr


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data) & 0xFFFFFFFF


_TORCH_TO_NP = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: None}


class KernelStore:
    """A kernel matrix (one or several kernels) stored tile by tile on disk. Open an existing one with
    ``KernelStore(path)``; :func:`ntkit.tiling.kernel_matrix` makes and fills them.

    Attributes: ``path``, ``manifest`` (dict), ``names`` (kernels held), ``shape`` ``(n1, n2)``,
    ``symmetric`` (only the upper block triangle is stored), ``plan`` (its :class:`TilePlan`).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(
                f"{self.path} is not a kernel store (no manifest.json); make one with "
                f"ntkit.tiling.kernel_matrix(..., store='{self.path}')."
            )
        self.manifest = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise StoreMismatchError(f"{self.path} has format {self.manifest.get('format')!r}, expected {FORMAT!r}.")
        m = self.manifest
        self.names: tuple[str, ...] = tuple(m["get"])
        self.shape = (int(m["n1"]), int(m["n2"]))
        self.symmetric = bool(m["symmetric"])
        self.trailing = tuple(m["trailing"])
        self.plan = TilePlan(self.shape[0], self.shape[1], int(m["tile_size"]), self.symmetric)
        self.dtype = getattr(torch, m["dtype"])
        self._arrays: dict[str, Any] = {}

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Union[str, os.PathLike], manifest: dict) -> KernelStore:
        """Make an empty store for ``manifest`` (an existing directory must be empty)."""
        zarr = _zarr()
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not empty; choose a new path for the store.")
        path.mkdir(parents=True, exist_ok=True)
        np_dtype = _TORCH_TO_NP.get(getattr(torch, manifest["dtype"]))
        if np_dtype is None:
            raise TypeError(f"cannot store dtype {manifest['dtype']}; store float64, float32 or float16.")
        g = zarr.open_group(str(path), mode="w")
        t = int(manifest["tile_size"])
        trailing = tuple(manifest["trailing"])
        for name in manifest["get"]:
            g.create_array(
                name,
                shape=(manifest["n1"], manifest["n2"]) + trailing,
                chunks=(t, t) + trailing,
                dtype=np_dtype,
                compressors=None,
                fill_value=0.0,
                config={"write_empty_chunks": True},
            )
        (path / "tiles").mkdir()  # after zarr: mode="w" clears the directory
        manifest = dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        _atomic_write_text(path / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
        return cls(path)

    def check_identity(self, manifest: dict) -> None:
        """Refuse a job whose identity differs from this store's (lists every differing field)."""
        diff = [k for k in IDENTITY if _norm(self.manifest.get(k)) != _norm(manifest.get(k))]
        if diff:
            detail = "; ".join(
                f"{k}: store has {_short(self.manifest.get(k))}, job has {_short(manifest.get(k))}" for k in diff
            )
            raise StoreMismatchError(
                f"the store at {self.path} was made for a different job ({detail}). Use a new store path, "
                f"or delete this one to recompute."
            )

    # -- zarr ------------------------------------------------------------------------------------
    def _array(self, name: str):
        if name not in self._arrays:
            zarr = _zarr()
            self._arrays[name] = zarr.open_array(str(self.path / name), mode="r+")
        return self._arrays[name]

    def _chunk_path(self, name: str, tile: Tile) -> Path:
        key = self._array(name).metadata.encode_chunk_key((tile.bi, tile.bj) + (0,) * len(self.trailing))
        return self.path / name / key

    def _name(self, name: Optional[str]) -> str:
        if name is None:
            if len(self.names) != 1:
                raise ValueError(f"this store holds {self.names}; say which one (name='nngp' or 'ntk').")
            return self.names[0]
        if name not in self.names:
            raise KeyError(f"this store holds {self.names}, not {name!r}.")
        return name

    # -- finished tiles ------------------------------------------------------------------------------
    def _marker(self, tile: Tile) -> Path:
        return self.path / "tiles" / f"{tile.key}.json"

    def finished(self) -> set[str]:
        """Keys ``"bi_bj"`` of the finished tiles."""
        return {p[:-5] for p in os.listdir(self.path / "tiles") if p.endswith(".json") and not p.startswith(".")}

    def missing_tiles(self) -> list[Tile]:
        done = self.finished()
        return [t for t in self.plan if t.key not in done]

    @property
    def is_complete(self) -> bool:
        return len(self.finished()) == len(self.plan)

    def write_tile(self, tile: Tile, values: dict[str, Tensor], **info: Any) -> None:
        """Write one computed tile: chunks first (atomic replace + fsync), the marker last."""
        crcs = {}
        for name in self.names:
            v = values[name].detach().to("cpu", self.dtype).numpy()
            want = (tile.r1 - tile.r0, tile.c1 - tile.c0) + self.trailing
            if v.shape != want:
                raise ValueError(f"tile {tile.key} of {name} has shape {v.shape}, expected {want}.")
            self._array(name)[tile.r0 : tile.r1, tile.c0 : tile.c1] = v
            _fsync_path(self._chunk_path(name, tile))
            crcs[name] = _crc(v)
        rec = {"rows": [tile.r0, tile.r1], "cols": [tile.c0, tile.c1], "crc32": crcs, **info}
        _atomic_write_text(self._marker(tile), json.dumps(rec))

    def invalidate(self, tile: Tile) -> None:
        """Forget a finished tile (it will be recomputed)."""
        self._marker(tile).unlink(missing_ok=True)

    def read_tile(self, tile: Tile, name: Optional[str] = None, verify: bool = True) -> Tensor:
        """One finished tile as a tensor (CRC-checked unless ``verify=False``)."""
        name = self._name(name)
        try:
            rec = json.loads(self._marker(tile).read_text())
        except FileNotFoundError:
            raise KeyError(f"tile {tile.key} of {self.path} is not finished; resume the job that fills it.") from None
        v = self._array(name)[tile.r0 : tile.r1, tile.c0 : tile.c1]
        if verify and _crc(v) != rec["crc32"][name]:
            raise CorruptTileError(
                f"tile {tile.key} ({name}) of {self.path} does not match its checksum: the chunk was damaged "
                f"after it was written. Resume the job with verify=True to recompute it."
            )
        return torch.from_numpy(np.ascontiguousarray(v))

    def verify(self, tiles: Optional[Iterable[Tile]] = None) -> list[Tile]:
        """Finished tiles (all by default) whose values fail their checksum."""
        done = self.finished()
        bad = []
        for t in self.plan if tiles is None else tiles:
            if t.key not in done:
                continue
            for name in self.names:
                try:
                    self.read_tile(t, name)
                except (CorruptTileError, ValueError, OSError):
                    bad.append(t)
                    break
        return bad

    def clean_partials(self) -> None:
        """Remove temporary files left by killed writers (call only while no writer runs)."""
        for root, _, files in os.walk(self.path):
            for f in files:
                if f.endswith(".partial") or (f.startswith(".") and f.endswith(".tmp")):
                    try:
                        os.unlink(os.path.join(root, f))
                    except FileNotFoundError:
                        pass

    # -- reading ---------------------------------------------------------------------------------------
    def matrix(
        self, name: Optional[str] = None, dtype: torch.dtype = torch.float64, verify: bool = True
    ) -> StoredMatrix:
        """The stored kernel ``name`` as a lazy matrix for the solvers (block matvecs, nothing loaded whole)."""
        return StoredMatrix(self, self._name(name), dtype=dtype, verify=verify)

    def __getitem__(self, name: str) -> StoredMatrix:
        return self.matrix(name)

    def to_tensor(self, name: Optional[str] = None, verify: bool = True) -> Tensor:
        """The whole matrix in memory, in the stored dtype (the lower triangle mirrored if symmetric)."""
        name = self._name(name)
        self._require_complete()
        out = torch.empty(self.shape + self.trailing, dtype=self.dtype)
        for t in self.plan:
            v = self.read_tile(t, name, verify)
            out[t.r0 : t.r1, t.c0 : t.c1] = v
            if self.symmetric and not t.diagonal:
                out[t.c0 : t.c1, t.r0 : t.r1] = v.transpose(0, 1)
        return out

    def matmat(self, v: Tensor, name: Optional[str] = None) -> Tensor:
        """``K @ v`` streamed tile by tile (float64)."""
        return self.matrix(name).matmat(v)

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matrix() @ v

    def _require_complete(self) -> None:
        missing = len(self.plan) - len(self.finished())
        if missing:
            raise RuntimeError(
                f"the store at {self.path} is missing {missing} of {len(self.plan)} tiles; "
                f"resume the job (same kernel_matrix call) to finish it."
            )

    def remove(self) -> None:
        """Delete the store from disk."""
        shutil.rmtree(self.path)

    def __repr__(self) -> str:
        return (
            f"KernelStore({str(self.path)!r}, {self.names}, shape={self.shape}, tiles "
            f"{len(self.finished())}/{len(self.plan)}, tile_size={self.plan.tile_size})"
        )


class StoredMatrix(TiledOperator):
    """One kernel of a :class:`KernelStore` as a lazy matrix: products stream the tiles from disk.

    Each tile is CRC-checked the first time this object reads it (``verify=True``). Products are computed in
    ``dtype`` (float64 by default; float32 halves the arithmetic for float32 stores). Under ``torchrun``
    each rank reads its share of the tiles and the partial products are summed with ``all_reduce``.
    """

    def __init__(self, store: KernelStore, name: str, dtype: torch.dtype = torch.float64, verify: bool = True):
        if store.trailing:
            raise ValueError(
                f"the stored kernel has trailing axes {store.trailing}; solvers need a 2-D (N1, N2) kernel."
            )
        store._require_complete()
        self.store, self.name = store, name
        self.plan = store.plan
        self.shape = store.shape
        self.dtype = dtype
        self.device = torch.device("cpu")
        self.verify = verify
        self._checked: set[str] = set()

    def _tile(self, t: Tile) -> Tensor:
        v = self.store.read_tile(t, self.name, verify=self.verify and t.key not in self._checked)
        self._checked.add(t.key)
        return v.to(self.dtype)

    def columns(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        out = torch.empty(self.shape[0], len(idx), dtype=self.dtype)
        plan = self.store.plan
        ts = plan.tile_size
        blocks = torch.unique(idx // ts).tolist()
        g1 = plan.grid[0]
        for bj in blocks:
            sel = (idx // ts == bj).nonzero()[:, 0]
            local = idx[sel] - bj * ts
            for bi in range(g1):
                if self.store.symmetric and bi > bj:
                    t = plan.tile(bj, bi)
                    out[t.c0 : t.c1, sel] = self._tile(t)[local].T
                else:
                    t = plan.tile(bi, bj)
                    out[t.r0 : t.r1, sel] = self._tile(t)[:, local]
        return out

    def diagonal(self):
        self._need_square("diagonal")
        out = torch.empty(self.shape[0], dtype=self.dtype)
        g1, g2 = self.store.plan.grid
        for b in range(min(g1, g2)):
            t = self.store.plan.tile(b, b)
            out[t.r0 : t.r1] = torch.diagonal(self._tile(t))
        return out

    def to_tensor(self):
        return self.store.to_tensor(self.name, verify=self.verify).to(self.dtype)


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v)) if v is not None else None


def _short(v: Any) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 120 else s[:117] + "..."
