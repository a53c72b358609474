"""The identity of a kernel: a deterministic text naming everything that determines its values.

A kernel store is resumed only by the job that made it, so the store must know *what* it holds. Neither a command
line nor ``repr(net)`` says that: a spec file can change between runs, and two ``Elementwise(lambda ...)`` have
the same repr. :func:`fingerprint` walks the object generically instead:

* ntkit layers (:class:`ntkit.layers.base.Layer`): the class and *every* attribute in ``vars(layer)``
  (hyper-parameters, private ones such as ``Elementwise._fn`` included), recursing into sub-layers
  (``serial``/``parallel`` hold them in ``layers``; any others ``sublayers()`` returns are added);
* functions: library functions (ntkit, torch, numpy, scipy, the standard library) by module and qualified
  name; user functions (lambdas, local functions, functions of a spec file) by a SHA-256 of their code
  object (bytecode, constants recursively, names; not line numbers), plus the values of their closure cells,
  their defaults and the globals their code reads — so different lambdas, or the same lambda closing over
  different values, give different fingerprints;
* user classes (a ``Layer`` or ``nn.Module`` subclass defined outside the libraries) by the code of their
  methods; user modules a function reads by the SHA-256 of their source file;
* tensors and arrays by shape, dtype and values (small ones in full, others by SHA-256); ``nn.Module`` by its
  class, plain attributes, parameters and buffers; numbers and strings exactly (``repr``); containers
  element-wise; other objects by their attributes, or by a ``repr`` that carries no memory address.

An object that cannot be named this way (a ``repr`` such as ``<Foo object at 0x7f..>`` and no attributes) raises
:class:`FingerprintError`, naming where it was found; ``description=`` then stands for it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from ntkit.layers.base import Layer

__all__ = ["fingerprint", "FingerprintError", "code_digest", "describe_callable_code", "LIBRARIES"]

#: top-level packages whose functions and classes are named, not hashed (their code is versioned elsewhere)
LIBRARIES = frozenset(
    {
        "ntkit",
        "torch",
        "numpy",
        "scipy",
        "builtins",
        "math",
        "cmath",
        "operator",
        "_operator",
        "functools",
        "itertools",
        "collections",
        "typing",
        "abc",
        "copy",
        "numbers",
        "random",
        "re",
        "enum",
        "dataclasses",
        "types",
        "sklearn",
    }
)
_SMALL = 16  # tensors with at most this many entries are written out in full
_MAX_DEPTH = 40
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PY = f"py{sys.version_info.major}.{sys.version_info.minor}"


class FingerprintError(ValueError):
    """An object inside a kernel cannot be named deterministically (no code, attributes or stable repr)."""


def _is_library(module: Optional[str]) -> bool:
    return bool(module) and module.split(".")[0] in LIBRARIES  # type: ignore[union-attr]


def _short(h: hashlib._Hash) -> str:
    return h.hexdigest()[:16]


def _update_code(h: hashlib._Hash, code: types.CodeType) -> None:
    h.update(code.co_code)
    h.update(repr((code.co_argcount, code.co_kwonlyargcount, code.co_posonlyargcount, code.co_flags)).encode())
    h.update(repr((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            h.update(b"<code>")
            _update_code(h, c)
        else:
            h.update(_const_repr(c).encode())
            h.update(b"\x00")


def _const_repr(c: Any) -> str:
    """A constant's repr independent of hash randomisation (frozensets sorted)."""
    if isinstance(c, frozenset):
        return "frozenset(" + repr(sorted(map(_const_repr, c))) + ")"
    if isinstance(c, tuple):
        return "(" + ", ".join(map(_const_repr, c)) + ",)"
    return repr(c)


def code_digest(code: types.CodeType) -> str:
    """SHA-256 (16 hex digits) of a code object: bytecode, constants (nested code recursively), names and
    argument layout; not the file name or line numbers, so moving a function within its file keeps it."""
    h = hashlib.sha256()
    _update_code(h, code)
    return _short(h)


def _global_names(code: types.CodeType) -> list[str]:
    names = list(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.extend(_global_names(c))
    return list(dict.fromkeys(names))


def _qualname(obj: Any) -> str:
    mod = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    if mod in ("torch", "builtins") or "._C" in mod or mod.startswith("torch._C"):
        name = getattr(obj, "__name__", name)  # torch.tanh, not torch._VariableFunctionsClass.tanh
    return f"{mod}.{name}" if mod else name


def _tensor(t: Tensor) -> str:
    t = t.detach()
    dtype = str(t.dtype).replace("torch.", "")
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.to("cpu").contiguous()
    if t.numel() <= _SMALL:
        return f"tensor({t.tolist()!r}, {dtype})"
    h = hashlib.sha256()
    flat = t.reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else flat.numpy().tobytes())
    return f"tensor(shape={list(t.shape)}, {dtype}, sha256:{_short(h)})"


def _array(a: np.ndarray) -> str:
    if a.dtype == object:
        raise TypeError("object array")
    a = np.ascontiguousarray(a)
    if a.size <= _SMALL:
        return f"array({a.tolist()!r}, {a.dtype})"
    return f"array(shape={list(a.shape)}, {a.dtype}, sha256:{hashlib.sha256(a.tobytes()).hexdigest()[:16]})"


class _Walker:
    """One fingerprint: the text of an object, with a stack against cycles and the list of parts that could
    not be named (``lenient``: replaced by a placeholder instead of raising)."""

    def __init__(self, lenient: bool):
        self.lenient = lenient
        self.unnamed: list[str] = []
        self._active: set[int] = set()

    # -- entry ---------------------------------------------------------------------------------------
    def text(self, obj: Any, where: str, depth: int = 0) -> str:
        if depth > _MAX_DEPTH:
            return self._fail(obj, where, "nested too deeply")
        if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
            return repr(obj)
        if isinstance(obj, (enum.Enum, torch.dtype, torch.device, type(Ellipsis), slice, range)):
            return repr(obj)
        if isinstance(obj, Tensor):
            return _tensor(obj)
        if isinstance(obj, np.ndarray):
            try:
                return _array(obj)
            except TypeError:
                return self._fail(obj, where, "a numpy array of Python objects")
        if isinstance(obj, np.generic):
            return repr(obj.item()) + f":{obj.dtype}"
        key = id(obj)
        if key in self._active:
            return f"<recursive {type(obj).__name__}>"
        self._active.add(key)
        try:
            return self._compound(obj, where, depth + 1)
        finally:
            self._active.discard(key)

    def _fail(self, obj: Any, where: str, why: str) -> str:
        msg = f"{where}: {type(obj).__module__}.{type(obj).__qualname__} ({why})"
        if not self.lenient:
            raise FingerprintError(
                f"cannot fingerprint {msg}, so a kernel store could not tell this kernel from another one; "
                f"give the object a stable identity (attributes, or a repr without a memory address), or pass "
                f"description='...' to kernel_matrix naming what it is (the description then stands for it)."
            )
        self.unnamed.append(msg)
        return f"<unfingerprinted {type(obj).__qualname__}>"

    # -- compound objects -------------------------------------------------------------------------------
    def _compound(self, obj: Any, where: str, depth: int) -> str:
        if isinstance(obj, Layer):
            return self._layer(obj, where, depth)
        if isinstance(obj, nn.Module):
            return self._module(obj, where, depth)
        if isinstance(obj, (list, tuple)):
            items = [self.text(v, f"{where}[{i}]", depth) for i, v in enumerate(obj)]
            if isinstance(obj, list):
                return "[" + ", ".join(items) + "]"
            head = "" if type(obj) is tuple else type(obj).__qualname__
            return head + "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        if isinstance(obj, dict):
            pairs = sorted(
                (self.text(k, f"{where} key", depth), self.text(v, f"{where}[{k!r}]", depth)) for k, v in obj.items()
            )
            return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"
        if isinstance(obj, (set, frozenset)):
            return type(obj).__name__ + "(" + ", ".join(sorted(self.text(v, where, depth) for v in obj)) + ")"
        if isinstance(obj, functools.partial):
            f = self.text(obj.func, f"{where}.func", depth)
            a = self.text(tuple(obj.args), f"{where}.args", depth)
            k = self.text(dict(obj.keywords), f"{where}.keywords", depth)
            return f"partial({f}, {a}, {k})"
        if isinstance(obj, types.MethodType):
            owner = self.text(obj.__self__, f"{where}.__self__", depth)
            return f"{owner}.{self.text(obj.__func__, f'{where}.__func__', depth)}"
        if isinstance(obj, types.FunctionType):
            return self._function(obj, where, depth)
        if isinstance(obj, types.ModuleType):
            return self._pymodule(obj)
        if isinstance(obj, type):
            return self._class(obj, where, depth)
        if isinstance(obj, torch.Generator):
            h = hashlib.sha256(obj.get_state().numpy().tobytes())
            return f"Generator({obj.device}, state sha256:{_short(h)})"
        if callable(obj) and isinstance(
            obj, (types.BuiltinFunctionType, types.BuiltinMethodType, np.ufunc, types.MethodWrapperType)
        ):
            bound = getattr(obj, "__self__", None)
            if bound is not None and not isinstance(bound, types.ModuleType) and not isinstance(bound, type):
                return f"{self.text(bound, f'{where}.__self__', depth)}.{obj.__name__}"
            return _qualname(obj)
        if isinstance(obj, (types.MethodDescriptorType, types.WrapperDescriptorType, types.GetSetDescriptorType)):
            return f"{_qualname(obj.__objclass__)}.{obj.__name__}"
        if dataclasses.is_dataclass(obj):
            fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
            return self._object(obj, fields, where, depth)
        if hasattr(obj, "__dict__") and vars(obj):
            return self._object(obj, vars(obj), where, depth)
        slots = [s for c in type(obj).__mro__ for s in getattr(c, "__slots__", ()) if hasattr(obj, s)]
        if slots:
            return self._object(obj, {s: getattr(obj, s) for s in slots}, where, depth)
        r = repr(obj)
        if _ADDRESS.search(r) or not r:
            return self._fail(obj, where, "its repr carries only a memory address")
        return f"{_qualname(type(obj))}:{r}"

    def _object(self, obj: Any, attrs: dict[str, Any], where: str, depth: int) -> str:
        head = self._class(type(obj), where, depth)
        body = ", ".join(f"{k}={self.text(v, f'{where}.{k}', depth)}" for k, v in attrs.items())
        return f"{head}({body})"

    def _layer(self, layer: Layer, where: str, depth: int) -> str:
        attrs = vars(layer)
        parts = [f"{k}={self.text(v, f'{where}.{k}', depth)}" for k, v in attrs.items()]
        held = {id(v) for v in attrs.values()} | {
            id(x) for v in attrs.values() if isinstance(v, (list, tuple)) for x in v
        }
        extra = [s for s in layer.sublayers() if id(s) not in held]
        if extra:
            parts.append(f"sublayers={self.text(list(extra), f'{where}.sublayers()', depth)}")
        return f"{self._class(type(layer), where, depth)}({', '.join(parts)})"

    def _module(self, m: nn.Module, where: str, depth: int) -> str:
        parts = [f"{k}={self.text(v, f'{where}.{k}', depth)}" for k, v in vars(m).items() if not k.startswith("_")]
        for kind in ("_parameters", "_buffers", "_modules"):
            for k, v in getattr(m, kind, {}).items():
                parts.append(f"{k}={self.text(v, f'{where}.{k}', depth)}")
        return f"{self._class(type(m), where, depth)}({', '.join(parts)})"

    def _pymodule(self, mod: types.ModuleType) -> str:
        name = mod.__name__
        if _is_library(name):
            return f"module {name}"
        file = getattr(mod, "__file__", None)
        try:
            data = Path(file).read_bytes() if file else None
        except OSError:
            data = None
        if data is None:
            return f"module {name}"
        return f"module {name} (source sha256:{hashlib.sha256(data).hexdigest()[:16]})"

    def _class(self, cls: type, where: str, depth: int) -> str:
        if _is_library(cls.__module__):
            return cls.__qualname__ if cls.__module__.startswith("ntkit.") else _qualname(cls)
        h = hashlib.sha256()
        for klass in cls.__mro__:
            if _is_library(klass.__module__):
                h.update(f"<base {_qualname(klass)}>".encode())
                continue
            for name, member in sorted(vars(klass).items()):
                fn = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                if isinstance(fn, property):
                    fn = fn.fget
                code = getattr(fn, "__code__", None)
                if isinstance(code, types.CodeType):
                    h.update(f"{klass.__qualname__}.{name}".encode())
                    _update_code(h, code)
                elif not (name.startswith("__") and name.endswith("__")):
                    h.update(f"{klass.__qualname__}.{name}={self.text(member, f'{where}.{name}', depth)}".encode())
        return f"{_qualname(cls)}[class code sha256:{_short(h)} {_PY}]"

    def _function(self, fn: types.FunctionType, where: str, depth: int) -> str:
        name = _qualname(fn)
        code = fn.__code__
        parts: list[str] = []
        if not _is_library(fn.__module__):
            parts.append(f"code sha256:{code_digest(code)} {_PY}")
        for i, var in enumerate(code.co_freevars):
            cell = fn.__closure__[i] if fn.__closure__ else None
            try:
                value = cell.cell_contents if cell is not None else None
            except ValueError:
                parts.append(f"{var}=<empty cell>")
                continue
            parts.append(f"{var}={self.text(value, f'{where} (closure variable {var!r} of {name})', depth)}")
        if fn.__defaults__:
            parts.append(f"defaults={self.text(fn.__defaults__, f'{where} (defaults of {name})', depth)}")
        if fn.__kwdefaults__:
            parts.append(f"kwdefaults={self.text(fn.__kwdefaults__, f'{where} (defaults of {name})', depth)}")
        if not _is_library(fn.__module__):
            g = fn.__globals__
            builtins = g.get("__builtins__", {})
            for var in _global_names(code):
                if var in g and not var.startswith("__"):
                    parts.append(f"global {var}={self.text(g[var], f'{where} (global {var!r} of {name})', depth)}")
                elif var in (builtins if isinstance(builtins, dict) else vars(builtins)):
                    continue
        return f"{name}[{'; '.join(parts)}]" if parts else name


def fingerprint(obj: Any, lenient: bool = False) -> tuple[str, list[str]]:
    """The deterministic text of ``obj`` (see the module docstring) and the parts that could not be named.

    With ``lenient=False`` an unnameable part raises :class:`FingerprintError` (naming where it is); with
    ``lenient=True`` it is written as ``<unfingerprinted Type>`` and listed in the second result.
    """
    w = _Walker(lenient)
    where = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return w.text(obj, where), w.unnamed


def describe_callable_code(fn: Callable) -> Optional[str]:
    """The code digest of a Python function (or a bound method's function), else ``None``."""
    f = getattr(fn, "__func__", fn)
    code = getattr(f, "__code__", None)
    return code_digest(code) if isinstance(code, types.CodeType) else None
