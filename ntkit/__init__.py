"""ntkit: infinite-width neural networks and neural tangent kernels, native to PyTorch.

Describe a network once with ``serial``/``parallel`` and the layers; ``net.kernel_fn`` gives its exact
NNGP and NTK, ``net.module`` the finite torch network they are the limit of. See ARCHITECTURE.md for where
each concern lives.
"""

from ntkit import _compat, architectures, empirical, linalg, memory, predict, random_features, tiling  # noqa: F401
from ntkit._compile import CompileError, compiled
from ntkit._version import __version__
from ntkit.kernel import Kernel
from ntkit.layers import *  # noqa: F403
from ntkit.layers import __all__ as _layers_all
from ntkit.lift import lift
from ntkit.monte_carlo import monte_carlo_kernel_fn
from ntkit.nets import Net, parallel, repeat, serial

_compat.install()


def __getattr__(name: str):
    """``ntkit.solvers`` / ``ntkit.sklearn`` / ``ntkit.gpytorch`` were attributes of the package in 0.1; they
    are deprecated shim modules now, imported (with their DeprecationWarning) on first access."""
    if name in ("solvers", "sklearn", "gpytorch"):
        import importlib

        return importlib.import_module(f"ntkit.{name}")
    raise AttributeError(f"module 'ntkit' has no attribute {name!r}")


__all__ = [
    "Kernel",
    "Net",
    "serial",
    "parallel",
    "repeat",
    "lift",
    "compiled",
    "CompileError",
    "monte_carlo_kernel_fn",
    "__version__",
    *_layers_all,
]
