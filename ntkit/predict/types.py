"""The records predictions come back in."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from torch import Tensor

__all__ = ["Gaussian", "StudentT", "ODEState"]


class Gaussian(NamedTuple):
    """``mean`` (shaped like the outputs) and ``covariance`` (shaped like the kernel) of a Gaussian."""

    mean: Tensor
    covariance: Tensor


class StudentT(NamedTuple):
    """Multivariate Student-t ``t_df(mean, scale)``; ``covariance = df/(df-2)·scale`` (``df > 2``)."""

    mean: Tensor
    scale: Optional[Tensor]
    df: float

    @property
    def covariance(self) -> Optional[Tensor]:
        if self.scale is None:
            return None
        if self.df <= 2:
            raise ValueError(f"a Student-t with df={self.df:g} <= 2 has no finite covariance; use .scale.")
        return self.scale * (self.df / (self.df - 2))


@dataclasses.dataclass
class ODEState:
    """Full state of the function-space ODE: outputs and (for momentum) their velocities ``q = df/dt``."""

    fx_train: Optional[Tensor] = None
    fx_test: Optional[Tensor] = None
    qx_train: Optional[Tensor] = None
    qx_test: Optional[Tensor] = None
