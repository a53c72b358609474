"""Linear-algebra back ends of ``ntkit.predict``: safe dense solves with PSD kernel matrices."""
from ntkit.solvers.linalg import (NumericalWarning, PSDMatrix, add_diagonal_regularizer, as_kernel_matrix,
                                  check_memory)

__all__ = ["NumericalWarning", "PSDMatrix", "add_diagonal_regularizer", "as_kernel_matrix", "check_memory"]
