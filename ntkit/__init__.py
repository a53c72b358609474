"""ntkit: infinite-width neural networks and neural tangent kernels, native to PyTorch.

Describe a network once with ``serial``/``parallel`` and the layers; ``net.kernel_fn`` gives its exact
NNGP and NTK, ``net.module`` the finite torch network they are the limit of.
"""
from ntkit.kernel import Kernel
from ntkit.layers import *  # noqa: F401,F403
from ntkit.layers import __all__ as _layers_all
from ntkit.lift import lift
from ntkit.monte_carlo import monte_carlo_kernel_fn
from ntkit.nets import Net, parallel, serial
from ntkit import predict, solvers  # noqa: E402  (after the core: predict builds on it)

__version__ = "0.1.0"
__all__ = ["Kernel", "Net", "serial", "parallel", "lift", "monte_carlo_kernel_fn", *_layers_all]
