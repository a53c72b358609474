"""The one version source (read by pyproject.toml through hatch and exported as ``ntkit.__version__``)."""

__version__ = "0.2.0"
