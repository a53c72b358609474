"""An out-of-core, resumable kernel matrix: one zarr chunk per tile, one marker file per finished tile.

Layout of a store directory::

    manifest.json        what the matrix is: format, the kernel's identity (the fingerprint of the resolved net:
                         every layer, hyper-parameter and user function's code), get, dtype, shape, tile size,
                         symmetric, SHA-256 of the inputs, and ``job``, a digest of all of these. Written once.
    zarr.json, <name>/   a zarr v3 group with one uncompressed array per kernel ("nngp", "ntk"), chunked
                         (tile, tile): every tile is exactly one chunk file.
    tiles/<bi>_<bj>.json the manifest of finished tiles: one small marker per tile with the CRC-32 of its
                         values and the job digest, written (temp file + fsync + rename) only after the chunk is
                         durable.
    claims/<bi>_<bj>     while a tile is computed: which process computes it (host, pid, time); removed when
                         the tile is finished, and the folder when the matrix is complete.

Creation is atomic: a store is built in a hidden sibling folder and renamed into place, so a store folder
always has its manifest; of several processes creating one store at once, one creates it and the others join it.

Crash safety. A tile is *finished* iff its marker exists, and a marker is only ever written after the chunk
files are on disk (fsync). A process killed at any moment therefore loses at most the tiles it was computing:
their chunk may be absent, stale or half written, but they have no marker and are recomputed on resume. Readers
verify each tile's CRC against its marker, so a chunk damaged later (disk error, truncation, a foreign write) or
a broken marker raises :class:`CorruptTileError` instead of being read as valid; resuming (``verify=True``)
recomputes such tiles. Damaged metadata (``manifest.json``, zarr's ``zarr.json``) raises
:class:`CorruptStoreError` and is rebuilt on resume from the job (the tiles' job digests must agree with it).

Cooperation. Processes filling one store (torchrun ranks, or independent processes started by hand) take tiles
through ``claims/``: a claim is created atomically, kept fresh by a heartbeat, and taken over when its owner is
gone (a dead pid on the same host, or no heartbeat for :data:`CLAIM_TIMEOUT` seconds).

A store made for other inputs, another kernel, dtype or tile size is refused (:class:`StoreMismatchError`, both
descriptions in full).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import threading
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

__all__ = [
    "KernelStore",
    "StoredMatrix",
    "StoreMismatchError",
    "CorruptTileError",
    "CorruptStoreError",
    "FORMAT",
    "CLAIM_TIMEOUT",
    "job_digest",
]

FORMAT = "ntkit-kernel-store/2"
#: formats this version can read (format 1: ntkit 0.1/0.2 before kernel fingerprints; read-only)
READ_FORMATS = ("ntkit-kernel-store/1", FORMAT)
# fields whose disagreement makes a store unusable for a job
IDENTITY = ("format", "kernel", "get", "dtype", "n1", "n2", "symmetric", "tile_size", "trailing", "x1", "x2")
#: a claim whose heartbeat is older than this many seconds is taken over (its owner is presumed gone)
CLAIM_TIMEOUT = 120.0
#: how often a writer refreshes the claims it holds
HEARTBEAT = 5.0


class StoreMismatchError(ValueError):
    """The store on disk was made for a different job (inputs, kernel, dtype, tiling)."""


class CorruptTileError(RuntimeError):
    """A finished tile's values or marker no longer match what was written (checksum, truncation, bad JSON)."""


class CorruptStoreError(RuntimeError):
    """A store's metadata (``manifest.json``, zarr metadata) is damaged; resuming the job repairs it."""


def _zarr():
    try:
        import zarr
    except ImportError as e:  # pragma: no cover - optional dependency
        raise ImportError("kernel stores need zarr>=3: pip install 'ntkit[scale]' (or pip install 'zarr>=3').") from e
    if int(zarr.__version__.split(".")[0]) < 3:  # pragma: no cover
        raise ImportError(f"kernel stores need zarr>=3 (found {zarr.__version__}): pip install -U 'zarr>=3'.")
    return zarr


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def _host_id() -> str:
    """This machine and pid namespace: a pid is only meaningful within one (hostname, boot, pid namespace)."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid").strip("pid:[]"))
    except OSError:
        pass
    return "/".join(parts)


_HOST = _host_id()
_HOST_TAG = hashlib.sha256(_HOST.encode()).hexdigest()[:8]


def _tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` that names its writer (so a cleaner can tell a dead writer's leftovers)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    tmp = _tmp_name(path)
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


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def job_digest(manifest: dict) -> str:
    """SHA-256 (32 hex digits) of a manifest's identity fields: what every tile marker records of its job."""
    ident = {k: manifest.get(k) for k in IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


_TORCH_TO_NP = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: None}


def _np_dtype(manifest: dict) -> str:
    np_dtype = _TORCH_TO_NP.get(getattr(torch, str(manifest["dtype"]), None))  # type: ignore[arg-type]
    if np_dtype is None:
        raise TypeError(f"cannot store dtype {manifest['dtype']}; store float64, float32 or float16.")
    return np_dtype


def _make_arrays(path: Path, manifest: dict) -> None:
    """The zarr group and its (empty) arrays for ``manifest`` in ``path`` (cleared first)."""
    zarr = _zarr()
    np_dtype = _np_dtype(manifest)
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


def _read_manifest(path: Path) -> dict:
    """``manifest.json`` of the store at ``path``, or :class:`CorruptStoreError` saying it is damaged."""
    mf = path / "manifest.json"
    try:
        m = json.loads(mf.read_text())
        if not isinstance(m, dict):
            raise ValueError(f"a JSON {type(m).__name__}, not an object")
        for k in ("format", "get", "n1", "n2", "symmetric", "trailing", "tile_size", "dtype"):
            if k not in m:
                raise ValueError(f"no field {k!r}")
        if m["format"] in READ_FORMATS:
            TilePlan(int(m["n1"]), int(m["n2"]), int(m["tile_size"]), bool(m["symmetric"]))
            getattr(torch, str(m["dtype"]))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CorruptStoreError(
            f"the manifest of the kernel store at {path} is damaged ({type(e).__name__}: {e}). Resume the job "
            f"(the same kernel_matrix call or ntkit kernel command) to rebuild it from the job, or delete the "
            f"store to recompute."
        ) from None
    return m


class KernelStore:
    """A kernel matrix (one or several kernels) stored tile by tile on disk. Open an existing one with
    ``KernelStore(path)``; :func:`ntkit.tiling.kernel_matrix` makes and fills them.

    Attributes: ``path``, ``manifest`` (dict), ``names`` (kernels held), ``shape`` ``(n1, n2)``,
    ``symmetric`` (only the upper block triangle is stored), ``plan`` (its :class:`TilePlan`).
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        try:
            m = _read_manifest(self.path)
        except FileNotFoundError:
            what = (
                "is a damaged kernel store (its manifest.json is missing)"
                if (self.path / "tiles").is_dir()
                else ("is not a kernel store (no manifest.json)")
            )
            raise FileNotFoundError(
                f"{self.path} {what}; make one with ntkit.tiling.kernel_matrix(..., store='{self.path}')."
            ) from None
        if m.get("format") not in READ_FORMATS:
            raise StoreMismatchError(
                f"{self.path} has format {m.get('format')!r}; this ntkit reads {', '.join(READ_FORMATS)}. Upgrade "
                f"ntkit to read it, or recompute into a new store."
            )
        self.manifest = m
        self.names: tuple[str, ...] = tuple(m["get"])
        self.shape = (int(m["n1"]), int(m["n2"]))
        self.symmetric = bool(m["symmetric"])
        self.trailing = tuple(m["trailing"])
        self.plan = TilePlan(self.shape[0], self.shape[1], int(m["tile_size"]), self.symmetric)
        self.dtype = getattr(torch, m["dtype"])
        self.job = m.get("job") or job_digest(m)
        self._arrays: dict[str, Any] = {}

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Union[str, os.PathLike], manifest: dict) -> KernelStore:
        """Make an empty store for ``manifest``, atomically: it is built in a hidden sibling folder and renamed
        to ``path``. Raises ``FileExistsError`` if ``path`` exists and is not empty (see :meth:`open_or_create`
        for joining a store another process creates at the same time)."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(f"{path} exists and is not empty; choose a new path for the store.")
        if not cls._build_and_rename(path, manifest):
            raise FileExistsError(f"{path} was created by another process meanwhile; open it with KernelStore(path).")
        return cls(path)

    @classmethod
    def open_or_create(cls, path: Union[str, os.PathLike], manifest: dict) -> KernelStore:
        """The store at ``path`` for the job ``manifest``: created if absent (atomically: of several processes
        doing this at once, one creates it and the others open it), else opened and checked
        (:meth:`check_identity`). A damaged manifest or zarr metadata is repaired (:meth:`repair`)."""
        path = Path(path)
        for _ in range(3):
            if (path / "manifest.json").exists() or (path / "tiles").is_dir():
                try:
                    ks = cls(path)
                except (CorruptStoreError, FileNotFoundError):
                    if not (path / "tiles").is_dir():
                        raise
                    cls.repair_manifest(path, manifest)
                    ks = cls(path)
                ks.check_identity(manifest)
                ks.repair()
                return ks
            if path.exists() and (not path.is_dir() or any(path.iterdir())):
                if (path / "manifest.json").exists():
                    continue
                raise FileExistsError(
                    f"{path} exists, is not empty and is not a kernel store; choose a new path for the store."
                )
            if cls._build_and_rename(path, manifest):
                return cls(path)
        raise FileExistsError(f"could not create or open the store at {path}; check the folder and retry.")

    @staticmethod
    def _build_and_rename(path: Path, manifest: dict) -> bool:
        """Build the store in a hidden sibling and rename it to ``path``; ``False`` if another process's store
        got there first (the sibling is removed)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_builds(path)
        tmp = path.with_name(f".{path.name}.creating.{_HOST_TAG}.{os.getpid()}.{uuid.uuid4().hex[:12]}")
        try:
            _make_arrays(tmp, manifest)
            (tmp / "tiles").mkdir()  # after zarr: mode="w" clears the directory
            manifest = dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%S"), job=job_digest(manifest))
            _atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
            _fsync_path(tmp)
            try:
                os.rename(tmp, path)  # atomic; replaces an empty directory, fails on a non-empty one
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    return False
                raise
            _fsync_path(path.parent)
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def check_identity(self, manifest: dict) -> None:
        """Refuse a job whose identity differs from this store's; the error lists every differing field with
        both values in full (and where long ones first differ)."""
        if self.manifest.get("format") != FORMAT and _norm(manifest.get("format")) == FORMAT:
            raise StoreMismatchError(
                f"the store at {self.path} has format {self.manifest.get('format')!r}, made before kernels were "
                f"fingerprinted (its kernel is named only by {_show(self.manifest.get('kernel'))}, which cannot "
                f"tell two kernels apart), so it cannot be resumed safely. It can still be read "
                f"(KernelStore(path)); to finish the job, compute it into a new store path."
            )
        diff = [k for k in IDENTITY if _norm(self.manifest.get(k)) != _norm(manifest.get(k))]
        if diff:
            detail = "\n".join(_difference(k, self.manifest.get(k), manifest.get(k)) for k in diff)
            raise StoreMismatchError(
                f"the store at {self.path} was made for a different job; it differs in "
                f"{', '.join(diff)}:\n{detail}\nUse a new store path, or delete this one to recompute."
            )

    # -- repairs ------------------------------------------------------------------------------------
    @classmethod
    def repair_manifest(cls, path: Union[str, os.PathLike], manifest: dict) -> None:
        """Rebuild a damaged ``manifest.json`` from the job ``manifest``, if every readable tile marker was
        written for this job (their job digests agree); else refuse (:class:`StoreMismatchError`)."""
        path = Path(path)
        want = job_digest(manifest)
        others = set()
        unattributed = 0
        for rec in _markers(path / "tiles"):
            job = rec.get("job") if isinstance(rec, dict) else None
            if job is None:
                unattributed += 1
            elif job != want:
                others.add(job)
        if others or unattributed:
            why = (
                f"its tiles were made for another job (job digest {sorted(others)[0]}, this job's is {want})"
                if others
                else f"{unattributed} of its tiles carry no job digest (an older store), so they cannot be "
                f"attributed to this job"
            )
            raise StoreMismatchError(
                f"the manifest of the store at {path} is damaged and {why}. Use a new store path, or delete "
                f"this one to recompute."
            )
        rebuilt = dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%S"), job=want, repaired=True)
        _atomic_write_text(path / "manifest.json", json.dumps(rebuilt, indent=1, sort_keys=True))

    def repair(self) -> list[str]:
        """Rebuild damaged zarr metadata (the group's and each array's ``zarr.json``) from the manifest, and
        make the ``tiles/`` folder if it is missing; returns what was repaired. Chunks are never touched: the
        tiles' checksums decide which are still valid (:meth:`verify`)."""
        zarr = _zarr()
        fixed = []
        (self.path / "tiles").mkdir(exist_ok=True)
        expect_dtype = _np_dtype(self.manifest)
        t = self.plan.tile_size
        bad = []
        try:
            zarr.open_group(str(self.path), mode="r")
        except Exception:
            bad.append("zarr.json")
        for name in self.names:
            try:
                a = zarr.open_array(str(self.path / name), mode="r")
                ok = (
                    tuple(a.shape) == self.shape + self.trailing
                    and tuple(a.chunks) == (t, t) + self.trailing
                    and str(a.dtype) == expect_dtype
                    and a.metadata.codecs is not None
                    and len(a.metadata.codecs) == 1
                )
            except Exception:
                ok = False
            if not ok:
                bad.append(f"{name}/zarr.json")
        if bad:
            ref = self.path.with_name(f".{self.path.name}.repair.{os.getpid()}.{uuid.uuid4().hex[:12]}")
            try:
                _make_arrays(ref, self.manifest)
                for rel in bad:
                    (self.path / rel).parent.mkdir(parents=True, exist_ok=True)
                    _atomic_write_text(self.path / rel, (ref / rel).read_text())
                    fixed.append(rel)
            finally:
                shutil.rmtree(ref, ignore_errors=True)
            self._arrays.clear()
        return fixed

    # -- zarr ------------------------------------------------------------------------------------
    def _array(self, name: str):
        if name not in self._arrays:
            zarr = _zarr()
            try:
                self._arrays[name] = zarr.open_array(str(self.path / name), mode="r+")
            except Exception as e:
                raise CorruptStoreError(
                    f"the zarr metadata of {name!r} in the store at {self.path} is damaged ({type(e).__name__}: "
                    f"{e}). Resume the job (the same kernel_matrix call) to rebuild it; finished tiles are kept."
                ) from None
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
        try:
            names = os.listdir(self.path / "tiles")
        except FileNotFoundError:
            return set()
        return {p[:-5] for p in names if p.endswith(".json") and not p.startswith(".")}

    def is_finished(self, tile: Tile) -> bool:
        return self._marker(tile).exists()

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
        rec = {"rows": [tile.r0, tile.r1], "cols": [tile.c0, tile.c1], "crc32": crcs, "job": self.job, **info}
        _atomic_write_text(self._marker(tile), json.dumps(rec))

    def invalidate(self, tile: Tile) -> None:
        """Forget a finished tile (it will be recomputed)."""
        self._marker(tile).unlink(missing_ok=True)

    def _record(self, tile: Tile) -> dict:
        try:
            text = self._marker(tile).read_text()
        except FileNotFoundError:
            raise KeyError(f"tile {tile.key} of {self.path} is not finished; resume the job that fills it.") from None
        try:
            rec = json.loads(text)
            crcs = rec["crc32"]
            if not all(isinstance(crcs[n], int) for n in self.names):
                raise TypeError("checksums are not integers")
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptTileError(
                f"the marker of tile {tile.key} in {self.path} is damaged ({type(e).__name__}: {e}); resume the "
                f"job (verify=True, the default) to recompute the tile."
            ) from None
        return rec

    def read_tile(self, tile: Tile, name: Optional[str] = None, verify: bool = True) -> Tensor:
        """One finished tile as a tensor (CRC-checked unless ``verify=False``)."""
        name = self._name(name)
        rec = self._record(tile)
        arr = self._array(name)
        try:
            v = arr[tile.r0 : tile.r1, tile.c0 : tile.c1]
        except Exception as e:  # a truncated or unreadable chunk file
            raise CorruptTileError(
                f"tile {tile.key} ({name}) of {self.path} cannot be read: its chunk file is damaged "
                f"({type(e).__name__}: {e}). Resume the job (verify=True, the default) to recompute it."
            ) from None
        if verify and _crc(v) != rec["crc32"][name]:
            raise CorruptTileError(
                f"tile {tile.key} ({name}) of {self.path} does not match its checksum: the chunk was damaged "
                f"after it was written. Resume the job (verify=True, the default) to recompute it."
            )
        return torch.from_numpy(np.ascontiguousarray(v))

    def verify(self, tiles: Optional[Iterable[Tile]] = None) -> list[Tile]:
        """Finished tiles (all by default) whose marker is damaged or whose values fail their checksum."""
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
                except KeyError:  # invalidated meanwhile by another process
                    break
        return bad

    def clean_partials(self) -> None:
        """Remove temporary files left by killed writers: those of tiles no live process claims (a writer
        claims a tile before it writes any file of it, so this is safe while others write), and other
        temporary files older than ten minutes."""
        claims = Claims(self.path / "claims")
        now = time.time()
        for root, _dirs, files in os.walk(self.path):
            rel = Path(root).relative_to(self.path)
            if rel.parts[:1] == ("claims",):
                continue
            for f in files:
                if not (f.endswith(".partial") or (f.startswith(".") and f.endswith(".tmp"))):
                    continue
                p = Path(root) / f
                key = _tile_key_of_temp(rel, f)
                try:
                    if key is not None and claims.held_by_live(key):
                        continue
                    if key is None and now - p.stat().st_mtime < 600:
                        continue
                    p.unlink()
                except FileNotFoundError:
                    pass

    def finish(self) -> None:
        """After completion: remove claims of dead processes and the ``claims/`` folder when it is empty."""
        Claims(self.path / "claims").remove_if_done()

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


# ---------------------------------------------------------------------------------------------------
# claims: which process computes which tile
# ---------------------------------------------------------------------------------------------------
class Claims:
    """The ``claims/`` folder of a store: one file per tile being computed, naming its owner.

    :meth:`take` creates a claim atomically (a complete file is hard-linked into place, so no reader sees
    half a claim; it fails if the tile is claimed). A claim is *stale* when its owner is gone: a pid that no
    longer runs on this host (same machine and pid namespace), or a heartbeat (the file's mtime, refreshed by
    :meth:`heartbeat`) older than ``timeout`` seconds; a stale claim is taken over.
    """

    def __init__(self, folder: Path, run: str = "", timeout: float = CLAIM_TIMEOUT):
        self.folder = folder
        self.run = run
        self.timeout = timeout
        self.held: dict[str, str] = {}  # key -> token of the claims this object holds
        self._lock = threading.Lock()

    def _path(self, key: str) -> Path:
        return self.folder / key

    @staticmethod
    def _read(path: Path) -> Optional[dict]:
        try:
            rec = json.loads(path.read_text())
            return rec if isinstance(rec, dict) else None
        except (OSError, ValueError):
            return None

    def _stale(self, path: Path, rec: Optional[dict]) -> bool:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > self.timeout:
            return True
        if rec is None:  # unreadable (damaged): only its age can tell
            return False
        if rec.get("host") == _HOST and isinstance(rec.get("pid"), int):
            return not _pid_alive(rec["pid"]) and rec["pid"] != os.getpid()
        return False

    def held_by_live(self, key: str) -> bool:
        """Whether a live process claims tile ``key``."""
        p = self._path(key)
        return p.exists() and not self._stale(p, self._read(p))

    def any_live(self) -> bool:
        try:
            names = [n for n in os.listdir(self.folder) if not n.startswith(".")]
        except FileNotFoundError:
            return False
        return any(self.held_by_live(n) for n in names)

    def take(self, key: str) -> bool:
        """Claim tile ``key`` for this process; ``False`` if a live process holds it."""
        path = self._path(key)
        token = uuid.uuid4().hex
        rec = {"host": _HOST, "pid": os.getpid(), "run": self.run, "token": token, "time": time.time()}
        for _ in range(4):
            tmp = self.folder / f".{key}.{os.getpid()}.{token[:12]}.tmp"
            try:
                tmp.write_text(json.dumps(rec))
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            try:
                os.link(tmp, path)
                with self._lock:
                    self.held[key] = token
                return True
            except FileExistsError:
                pass
            except FileNotFoundError:  # the folder was removed meanwhile
                continue
            finally:
                tmp.unlink(missing_ok=True)
            old = self._read(path)
            if not self._stale(path, old):
                return False
            # take over a stale claim: move it aside (only one process can), check it is the one judged stale
            tomb = self.folder / f".{key}.stale.{token[:12]}"
            try:
                os.rename(path, tomb)
            except FileNotFoundError:
                continue
            moved = self._read(tomb)
            if moved != old and moved is not None and not self._stale(tomb, moved):
                try:  # a fresh claim was moved by mistake: put it back
                    os.link(tomb, path)
                except FileExistsError:
                    pass
                tomb.unlink(missing_ok=True)
                return False
            tomb.unlink(missing_ok=True)
        return False

    def owns(self, key: str) -> bool:
        """Whether this object's claim on ``key`` is still in place."""
        rec = self._read(self._path(key))
        return rec is not None and rec.get("token") == self.held.get(key)

    def release(self, key: str) -> None:
        """Drop this process's claim on ``key`` (if it still holds it)."""
        with self._lock:
            token = self.held.pop(key, None)
        rec = self._read(self._path(key))
        if token is not None and rec is not None and rec.get("token") == token:
            self._path(key).unlink(missing_ok=True)

    def heartbeat(self) -> None:
        """Refresh the mtime of every claim this object holds."""
        with self._lock:
            keys = list(self.held)
        for k in keys:
            try:
                os.utime(self._path(k))
            except OSError:
                pass

    def remove_if_done(self) -> None:
        """Remove stale claims and the folder itself if nothing else is left in it."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        for n in names:
            p = self.folder / n
            if p.is_dir():  # per-run folders of older versions
                shutil.rmtree(p, ignore_errors=True)
            elif n.startswith("."):
                try:
                    if time.time() - p.stat().st_mtime > 60:
                        p.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
            elif self._stale(p, self._read(p)):
                p.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:
            pass


class Heartbeat:
    """A daemon thread refreshing ``claims`` every :data:`HEARTBEAT` seconds while the ``with`` block runs."""

    def __init__(self, claims: Claims, every: float = HEARTBEAT):
        self.claims, self.every = claims, every
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.claims.heartbeat()

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name="ntkit-claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _markers(folder: Path) -> Iterable[Any]:
    """The parsed tile markers in ``folder`` (damaged ones skipped)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".json") and not n.startswith("."):
            try:
                yield json.loads((folder / n).read_text())
            except (OSError, ValueError):
                continue


def _tile_key_of_temp(rel: Path, name: str) -> Optional[str]:
    """The tile a temporary file belongs to: ``tiles/.<bi>_<bj>.json.<...>.tmp`` or a zarr chunk's
    ``<array>/c/<bi>/<bj>[/...].<uuid>.partial``; ``None`` for other files."""
    if rel == Path("tiles") and name.startswith("."):
        key = name[1:].split(".json", 1)[0]
        return key if "_" in key else None
    parts = rel.parts
    if len(parts) >= 3 and parts[1] == "c" and name.endswith(".partial"):
        rest = list(parts[2:]) + [name.split(".", 1)[0]]
        if len(rest) >= 2:
            return f"{rest[0]}_{rest[1]}"
    return None


def _remove_dead_builds(path: Path) -> None:
    """Hidden build folders of ``path`` (``.<name>.creating.<host>.<pid>.<id>``) of this host whose process is
    gone."""
    prefix = f".{path.name}.creating.{_HOST_TAG}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for n in names:
        if not n.startswith(prefix):
            continue
        pid = n[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path.parent / n, ignore_errors=True)


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


def _show(v: Any) -> str:
    """A manifest value in full (strings as they are, the rest as JSON)."""
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)


def _difference(field: str, have: Any, want: Any) -> str:
    """One differing field: both values in full, and for long ones where they first differ."""
    a, b = _show(have), _show(want)
    out = f"  {field}:\n    store has: {a}\n    job has:   {b}"
    if len(a) > 60 or len(b) > 60:
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lo = max(0, i - 40)
        out += f"\n    first difference at character {i}: store ...{a[lo : i + 40]}... vs job ...{b[lo : i + 40]}..."
    return out
