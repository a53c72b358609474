"""Fixtures of the layer tests."""

from __future__ import annotations

import pytest

from ntkit import _compile


@pytest.fixture
def count(monkeypatch):
    """The compiled functions called inside ``ntkit.compiled()``, by name, with ``_ntk`` appended where their
    second argument (``Θ``) was passed; the calls go through to the compiled functions."""
    calls = []
    real = _compile.fused

    def counting(fn, *args, **kw):
        calls.append(fn.__name__ + ("" if args[1] is None else "_ntk"))
        return real(fn, *args, **kw)

    monkeypatch.setattr(_compile, "fused", counting)
    return calls
