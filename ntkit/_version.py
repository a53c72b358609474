"""The one version source (read by pyproject.toml through hatch and exported as ``ntkit.__version__``)."""

#: the package version (PEP 440), e.g. ``"0.2.0"``
__version__ = "0.2.0"
