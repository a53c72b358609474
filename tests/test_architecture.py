"""The package's layering, checked on its source (an AST scan of every import in ntkit/).

* every module belongs to a unit (a top-level module or package) with a rank; a unit may import only units of
  lower rank (and itself); units of equal rank are independent;
* no import cycle between modules, counting function-local imports too;
* no function-local ntkit import outside the short documented list below (lazy imports that keep an optional
  dependency optional);
* deprecated shims (old import paths, kept one release) sit on top and may import anything.

ARCHITECTURE.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ntkit"

#: units from the bottom up; a unit may import the units of lower rows only (ARCHITECTURE.md)
LAYERS: list[list[str]] = [
    ["ntkit._version", "ntkit._inputs", "ntkit._memory", "ntkit._deprecation", "ntkit.distributed", "ntkit._compile"],
    ["ntkit._tiles", "ntkit.memory", "ntkit.kernel", "ntkit.theory"],
    ["ntkit.linalg", "ntkit.layers"],
    ["ntkit.nets", "ntkit.tiling", "ntkit.empirical", "ntkit.predict"],
    ["ntkit.lift_attention"],
    ["ntkit.architectures", "ntkit.lift", "ntkit.random_features", "ntkit.monte_carlo"],
    ["ntkit.stax", "ntkit.feature_learning", "ntkit.datasets", "ntkit.plots"],
    ["ntkit.nt", "ntkit.integrations"],
    ["ntkit.cli"],
    ["ntkit.__main__"],
    ["ntkit._compat"],
    ["ntkit"],
]

#: old import paths of 0.1 (one release): on top, like the package itself
SHIMS = {"ntkit.solvers", "ntkit.sklearn", "ntkit.gpytorch", "ntkit.tiling.operator", "ntkit.tiling.distributed"}

#: function-local ntkit imports that are allowed, and why
LAZY = {
    ("ntkit.cli", "ntkit.cli.fit"): "`ntkit fit` needs scikit-learn and matplotlib; `ntkit --help` must not",
    ("ntkit.cli", "ntkit.cli.uci"): "`ntkit bench-uci` needs scikit-learn and joblib",
    ("ntkit.__main__", "ntkit.cli"): "the CLI needs typer/rich ([cli] extra); a clear message when absent",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported ntkit module, function-local?, line)]."""
    out: dict[str, list[tuple[str, bool, int]]] = {}
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        found: list[tuple[str, bool, int]] = []

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    found.extend((a.name, local, child.lineno) for a in child.names if a.name.startswith("ntkit"))
                elif isinstance(child, ast.ImportFrom):
                    target = _resolve(mod, path.name == "__init__.py", child)
                    if target.startswith("ntkit"):
                        # `from ntkit import predict` imports the submodule ntkit.predict (a package's
                        # __init__ runs before any of its submodules anyway: it is not counted as a use)
                        subs = [f"{target}.{a.name}" for a in child.names]
                        subs = [
                            s
                            for s in subs
                            if (PKG.parent / (s.replace(".", "/") + ".py")).exists()
                            or (PKG.parent / s.replace(".", "/")).is_dir()
                        ]
                        found.extend((s, local, child.lineno) for s in subs)
                        if len(subs) < len(child.names):
                            found.append((target, local, child.lineno))
                visit(child, inner)

        visit(tree, False)
        out[mod] = found
    return out


IMPORTS = _imports()
RANK = {unit: r for r, row in enumerate(LAYERS) for unit in row}


def _unit(mod: str) -> str:
    if any(mod == s or mod.startswith(s + ".") for s in SHIMS):
        return "<shim>"
    best = max((u for u in RANK if mod == u or mod.startswith(u + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(
            f"module {mod} is in no layer of tests/test_architecture.py (add it, and to ARCHITECTURE.md)"
        )
    return best


def test_every_module_has_a_layer():
    for mod in IMPORTS:
        _unit(mod)


def test_no_upward_or_sideways_import():
    bad = []
    for mod, imps in IMPORTS.items():
        u = _unit(mod)
        if u == "<shim>":
            continue
        for target, _, line in imps:
            t = _unit(target)
            if t == u:
                continue
            if t == "<shim>" or RANK[t] >= RANK[u]:
                bad.append(f"{mod}:{line} imports {target} ({t}, rank {RANK.get(t)} >= {u}, rank {RANK[u]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_function_local_ntkit_import_outside_the_documented_list():
    bad = [
        f"{mod}:{line} imports {target} inside a function"
        for mod, imps in IMPORTS.items()
        if _unit(mod) != "<shim>"
        for target, local, line in imps
        if local and (mod, target) not in LAZY
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in imps if t in IMPORTS and t != m} for m, imps in IMPORTS.items()}
    # a package's __init__ importing its own submodules is how packages work: not a cycle through the package
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cyc = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cyc))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)


def test_the_lazy_list_is_not_stale():
    used = {(m, t) for m, imps in IMPORTS.items() for t, local, _ in imps if local}
    assert set(LAZY) <= used, f"documented lazy imports no longer present: {set(LAZY) - used}"
