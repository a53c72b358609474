"""The API reference's contract, checked without Sphinx: every public name has documentation.

The site's API pages are written from the same list (``docs/_ext/public_api.py``): ntkit and each of its
public modules (not the deprecated 0.1 shims, not the CLI), every name of their ``__all__``. And every
```python snippet of the Markdown pages runs against the current API.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS / "_ext"))
import public_api

MODULES = public_api.public_modules()


def test_public_modules_are_found_and_shims_are_not():
    for expected in ("ntkit", "ntkit.predict", "ntkit.layers", "ntkit.theory", "ntkit.integrations.estimators"):
        assert expected in MODULES
    assert not public_api.SHIMS & set(MODULES)
    assert not any(m.startswith("ntkit.cli") or m.split(".")[-1].startswith("_") for m in MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_has_a_docstring(module):
    missing = [n for n in public_api.exported(module) if not public_api.docstring(module, n).strip()]
    assert not missing, f"{module}: no docstring (or #: comment for data) for {missing}"


def test_module_docstrings():
    for module in MODULES:
        assert public_api.summary(importlib.import_module(module)), f"{module} has no module docstring"


def test_api_pages_list_every_public_name(tmp_path):
    written = public_api.write_api_pages(tmp_path)
    assert written == MODULES
    index = (tmp_path / "index.rst").read_text()
    for module in MODULES:
        page = (tmp_path / f"{module}.rst").read_text()
        assert f":doc:`{module}`" in index
        for name in public_api.exported(module):
            home = public_api.home(module, name, MODULES)
            if inspect.ismodule(getattr(importlib.import_module(module), name)):
                assert f"<{home}>" in page, (module, name)  # a module: linked to its own page
            elif home == module:
                assert f"\n   {name}\n" in page, (module, name)
            else:  # documented once, where it is defined, and linked from here
                assert f"<{home}.{name}>" in page, (module, name)
                assert f"\n   {name}\n" in (tmp_path / f"{home}.rst").read_text(), (home, name)


def test_data_docs_are_read_from_comments():
    assert "version" in public_api.docstring("ntkit", "__version__")
    assert public_api.docstring("ntkit.kernel", "GETS")


_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
PAGES = sorted(DOCS.glob("*.md")) + sorted(DOCS.glob("guides/*.md"))


@pytest.mark.parametrize("page", [p for p in PAGES if _FENCE.search(p.read_text())], ids=lambda p: p.stem)
def test_the_pages_python_snippets_run(page, tmp_path, monkeypatch):
    # each page's ```python blocks, in order, in one namespace (a reader pastes them one after another), in a
    # scratch directory (a snippet may write a store)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(_FENCE.findall(page.read_text())):
        exec(compile(block, f"{page.relative_to(DOCS)} (python block {i + 1})", "exec"), namespace)
