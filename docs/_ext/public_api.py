"""What the API reference documents: ntkit's public modules and the names in their ``__all__``.

Shared by ``docs/conf.py`` (which writes ``docs/api/*.rst`` from it on every build, so a new public module or
name appears without editing the docs) and ``tests/test_docs_api.py`` (every documented name has a docstring).
It needs nothing but the standard library and ntkit: no Sphinx.

* public modules: the package ``ntkit`` and each of its top-level modules and packages whose name does not
  start with an underscore, except the deprecated shims of 0.1 (they warn on import) and the command line
  (documented by ``ntkit --help``); a folder without ``__init__.py`` (``ntkit.integrations``) contributes its
  modules instead;
* each name in a public module's ``__all__`` is documented once, on the page of its *home*: the public module
  that defines it (``ntkit.Dense`` is documented as ``ntkit.layers.Dense``), else the module that exports it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import ntkit

PKG = Path(ntkit.__file__).resolve().parent

#: old import paths of 0.1, kept one release with a DeprecationWarning: never documented as API
SHIMS = frozenset(
    {"ntkit.solvers", "ntkit.sklearn", "ntkit.gpytorch", "ntkit.tiling.operator", "ntkit.tiling.distributed"}
)
#: not library API
EXCLUDED = frozenset({"ntkit.cli", "ntkit.__main__"})


def public_modules() -> list[str]:
    """``ntkit`` first, then the public modules in alphabetical order."""
    out = []
    for info in pkgutil.iter_modules([str(PKG)]):
        name = f"ntkit.{info.name}"
        if info.name.startswith("_") or name in SHIMS or name in EXCLUDED:
            continue
        path = PKG / info.name
        if path.is_dir() and not (path / "__init__.py").exists():
            continue  # a namespace folder: pkgutil does not list these, handled below
        out.append(name)
    for sub in sorted(p for p in PKG.iterdir() if p.is_dir() and not (p / "__init__.py").exists()):
        if sub.name.startswith(("_", ".")) or not any(sub.glob("*.py")):
            continue
        for info in pkgutil.iter_modules([str(sub)]):
            name = f"ntkit.{sub.name}.{info.name}"
            if not info.name.startswith("_") and name not in SHIMS:
                out.append(name)
    return ["ntkit", *sorted(out)]


@functools.cache
def _all(module: str) -> tuple[str, ...]:
    names = getattr(importlib.import_module(module), "__all__", None)
    if names is None:
        raise AssertionError(f"public module {module} has no __all__: list its public names there")
    return tuple(names)


def exported(module: str) -> list[str]:
    """The module's ``__all__`` (every public module must have one)."""
    return list(_all(module))


def is_data(obj: Any) -> bool:
    """Constants and other instances, which carry their documentation in a ``#:`` comment, not a docstring."""
    return not (inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj) or callable(obj))


def home(module: str, name: str, modules: Optional[list[str]] = None) -> str:
    """The public module whose page documents ``module.name``."""
    obj = getattr(importlib.import_module(module), name)
    if inspect.ismodule(obj):
        return obj.__name__  # a module exported by name (``ntkit.nt.predict``): its own page, if public
    if is_data(obj):
        return module
    defined = getattr(obj, "__module__", None) or ""
    homes = [
        other
        for other in (modules or public_modules())
        if other != "ntkit"
        and (defined == other or defined.startswith(other + "."))
        and name in exported(other)
        and getattr(importlib.import_module(other), name, None) is obj
    ]
    return max(homes, key=len) if homes else module


def _comment_doc(path: Path, name: str) -> Optional[str]:
    """A ``#:`` comment above ``name = ...`` at module level, or a string literal right after it."""
    try:
        source = path.read_text()
    except OSError:
        return None
    tree = ast.parse(source)
    lines = source.splitlines()
    for i, node in enumerate(tree.body):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        doc, j = [], node.lineno - 2
        while j >= 0 and lines[j].strip().startswith("#:"):
            doc.insert(0, lines[j].strip()[2:].strip())
            j -= 1
        if doc:
            return " ".join(doc)
        nxt = tree.body[i + 1] if i + 1 < len(tree.body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            return nxt.value.value
    return None


def _source_of(module: str, name: str) -> Optional[Path]:
    """The file that assigns ``name`` for ``module``: the module itself, or where ``from X import name`` goes."""
    mod = importlib.import_module(module)
    path = Path(mod.__file__ or "")
    try:
        tree = ast.parse(path.read_text())
    except OSError:
        return None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            base = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
            parts = base.split(".")[: len(base.split(".")) - max(node.level - 1, 0)]
            target = node.module if node.level == 0 else ".".join(parts + ([node.module] if node.module else []))
            try:
                return Path(importlib.import_module(target or "").__file__ or "")
            except ImportError:
                return None
    return path


def docstring(module: str, name: str) -> str:
    """The documentation of ``module.name``: its docstring, or for data the ``#:`` comment where it is set."""
    obj = getattr(importlib.import_module(module), name)
    if is_data(obj):
        path = _source_of(module, name)
        return (_comment_doc(path, name) if path else None) or ""
    return inspect.getdoc(obj) or ""


def summary(module: ModuleType) -> str:
    """The first sentence of a module's docstring."""
    doc = inspect.getdoc(module) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ")


def _title(text: str, char: str = "=") -> str:
    return f"{text}\n{char * len(text)}\n"


def module_page(module: str, modules: list[str]) -> str:
    """The reST of one module's API page: its docstring, an autosummary of the names it is home to (one page
    each), and links to the names it re-exports from other public modules."""
    own, elsewhere = [], []
    for name in exported(module):
        (own if home(module, name, modules) == module else elsewhere).append(name)
    out = [_title(f"``{module}``"), f".. automodule:: {module}\n   :no-members:\n", f".. currentmodule:: {module}\n"]
    if own:
        out.append(
            ".. autosummary::\n   :toctree: generated\n   :nosignatures:\n\n" + "".join(f"   {n}\n" for n in own)
        )
    if elsewhere:
        links = ", ".join(_link(module, n, modules) for n in elsewhere)
        out.append(_title("Also available here", "-") + f"\nDocumented where they are defined: {links}.\n")
    return "\n".join(out)


def _link(module: str, name: str, modules: list[str]) -> str:
    obj = getattr(importlib.import_module(module), name)
    if inspect.ismodule(obj):
        return f":py:mod:`{name} <{obj.__name__}>`"
    return f":py:obj:`{name} <{home(module, name, modules)}.{name}>`"


def write_api_pages(folder: Path) -> list[str]:
    """Write ``index.rst`` and one page per public module into ``folder`` (only files whose text changed,
    so incremental builds stay incremental); returns the module names."""
    folder.mkdir(parents=True, exist_ok=True)
    modules = public_modules()
    rows = []
    for m in modules:
        text = summary(importlib.import_module(m)).replace("|", "\\|")
        rows.append(f"   * - :doc:`{m}`\n     - {text}\n")
    index = (
        _title("API reference")
        + "\nEvery public name of ntkit, one page each, generated from the docstrings. The pages are written from\n"
        "each public module's ``__all__`` when the site is built, so a new public name appears here by itself.\n"
        "The deprecated import paths of 0.1 (``ntkit.solvers``, ``ntkit.sklearn``, ``ntkit.gpytorch``,\n"
        "``ntkit.tiling.operator``, ``ntkit.tiling.distributed``) are not listed: see the changelog.\n\n"
        ".. list-table::\n   :header-rows: 1\n   :widths: 25 75\n\n   * - module\n     - what\n"
        + "".join(rows)
        + "\n.. toctree::\n   :hidden:\n\n"
        + "".join(f"   {m}\n" for m in modules)
    )
    pages = {"index.rst": index, **{f"{m}.rst": module_page(m, modules) for m in modules}}
    for old in folder.glob("*.rst"):
        if old.name not in pages:
            old.unlink()
    for fname, text in pages.items():
        path = folder / fname
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return modules
