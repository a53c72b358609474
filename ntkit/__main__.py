"""``python -m ntkit`` runs the ``ntkit`` command line; with no arguments it is ``ntkit fit``: NTK and NNGP
kernel regression, an NTK-SVM and the finite network trained by gradient descent, on scikit-learn's digits."""

from __future__ import annotations

import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    try:
        from ntkit.cli import main as cli_main
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("typer", "click", "rich", "shellingham", "pydantic"):
            print(
                f"error: the ntkit command line needs {e.name.split('.')[0]}; "
                f"install it with `pip install 'ntkit[cli]'`.",
                file=sys.stderr,
            )
            return 1
        raise
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
