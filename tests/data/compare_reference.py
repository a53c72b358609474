"""Compare two folders of NT reference cases (``<case>.npz`` + ``cases.json``), array by array.

    python tests/data/compare_reference.py NEW_DIR REF_DIR [--tol 1e-12] [--verbose] [--partial]

Needs only NumPy (runs in the project's venv or in the NT one). For every case present in either folder it checks
that both have it, with the same array names, shapes and dtypes; inputs (``x*``, ``y_train``, ``fx_*_0``,
``param_*``) must be bit-identical, outputs must have the same NaN pattern and agree to ``--tol`` relative error,
measured as in the tests: max |new - ref| / max |ref| over the finite entries. It also checks that the two
``cases.json`` (in the folder or next to it) list the same arrays and shapes (descriptions may be worded
differently). Prints the largest differences per family and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

INPUT_ARRAYS = {"x1", "x2", "x1_nhwc", "x2_nhwc", "x1_nwc", "x_train", "x_test", "y_train", "fx_train_0", "fx_test_0"}
#: name prefix -> family (first match wins)
FAMILIES = (
    ("fc_hermite_", "hermite"),
    ("fc_", "fc"),
    ("branch_", "branch"),
    ("conv", "conv"),
    ("predict_", "predict"),
    ("empirical_", "empirical"),
)


def is_input(array_name: str) -> bool:
    return array_name in INPUT_ARRAYS or array_name.startswith("param_")


def family_of(case_name: str) -> str:
    return next((fam for prefix, fam in FAMILIES if case_name.startswith(prefix)), "other")


@dataclass
class FamilyStats:
    cases: int = 0
    arrays: int = 0
    identical: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""
    nan_arrays: list[str] = field(default_factory=list)


def diff(new: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max abs, max abs / max |ref|) over the entries finite in both."""
    finite = np.isfinite(new) & np.isfinite(ref)
    if not finite.any():
        return 0.0, 0.0
    abs_err = float(np.abs(new[finite] - ref[finite]).max())
    scale = float(np.abs(ref[finite]).max())
    return abs_err, abs_err / scale if scale else abs_err


def compare_case(name: str, new_dir: Path, ref_dir: Path, tol: float, stats: FamilyStats, verbose: bool) -> list[str]:
    """Problems found in one case (empty if it matches); updates ``stats``."""
    paths = new_dir / f"{name}.npz", ref_dir / f"{name}.npz"
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        return [f"{name}: missing {', '.join(missing)}"]
    problems = []
    with np.load(paths[0]) as zn, np.load(paths[1]) as zr:
        if set(zn.files) != set(zr.files):
            problems.append(
                f"{name}: arrays differ: only new {sorted(set(zn.files) - set(zr.files))}, "
                f"only ref {sorted(set(zr.files) - set(zn.files))}"
            )
        stats.cases += 1
        for key in sorted(set(zn.files) & set(zr.files)):
            new, ref = zn[key], zr[key]
            label = f"{name}/{key}"
            if new.shape != ref.shape or new.dtype != ref.dtype:
                problems.append(f"{label}: {new.dtype}{new.shape} vs ref {ref.dtype}{ref.shape}")
                continue
            stats.arrays += 1
            identical = np.array_equal(new, ref, equal_nan=True)
            stats.identical += identical
            if np.isnan(ref).any():
                stats.nan_arrays.append(label)
            if identical:
                continue
            abs_err, rel_err = diff(new, ref)
            if verbose:
                print(f"  {label}: max abs {abs_err:.3e}, rel {rel_err:.3e}")
            if rel_err > stats.max_rel or (rel_err == stats.max_rel and abs_err > stats.max_abs):
                stats.worst = label
            stats.max_abs, stats.max_rel = max(stats.max_abs, abs_err), max(stats.max_rel, rel_err)
            if is_input(key):
                problems.append(f"{label}: input not bit-identical (max abs {abs_err:.3e})")
            elif not np.array_equal(np.isnan(new), np.isnan(ref)):
                problems.append(f"{label}: NaN pattern differs")
            elif rel_err > tol:
                problems.append(f"{label}: rel err {rel_err:.3e} > {tol:g} (max abs {abs_err:.3e})")
    return problems


def find_index(folder: Path) -> Path | None:
    """``cases.json`` in the folder, else next to it (the shared copy keeps it beside ``cases/``)."""
    return next((p for p in (folder / "cases.json", folder.parent / "cases.json") if p.exists()), None)


def compare_index(new_dir: Path, ref_dir: Path, names: Iterable[str]) -> list[str]:
    paths = find_index(new_dir), find_index(ref_dir)
    missing = [str(d) for d, p in zip((new_dir, ref_dir), paths, strict=True) if p is None]
    if missing:
        return [f"no cases.json in or next to {', '.join(missing)}"]
    new, ref = (json.loads(p.read_text()) for p in paths)
    problems = []
    for name in names:
        arrays_new, arrays_ref = (idx.get(name, {}).get("arrays") for idx in (new, ref))
        if arrays_new != arrays_ref:
            problems.append(f"cases.json/{name}: arrays {arrays_new} vs ref {arrays_ref}")
        if name in new and not new[name].get("description"):
            problems.append(f"cases.json/{name}: no description")
    return problems


def compare(
    new_dir: Path,
    ref_dir: Path,
    names: Iterable[str] | None = None,
    tol: float = 1e-12,
    verbose: bool = False,
    partial: bool = False,
) -> int:
    """Compare the cases ``names`` (default: every case in either folder, or only those in ``new_dir`` if
    ``partial``); 0 if all match, else 1."""
    new_dir, ref_dir = Path(new_dir), Path(ref_dir)
    if names is None:
        names = {p.stem for d in ((new_dir,) if partial else (new_dir, ref_dir)) for p in d.glob("*.npz")}
    names = sorted(names)
    stats: dict[str, FamilyStats] = {}
    problems: list[str] = []
    for name in names:
        problems += compare_case(name, new_dir, ref_dir, tol, stats.setdefault(family_of(name), FamilyStats()), verbose)
    problems += compare_index(new_dir, ref_dir, names)

    print(f"\n{new_dir}  vs  {ref_dir}: {len(names)} case(s); index {find_index(new_dir)} vs {find_index(ref_dir)}")
    print(f"{'family':10s} {'cases':>5s} {'arrays':>6s} {'identical':>9s} {'max abs':>10s} {'max rel':>10s}  worst")
    for fam, s in sorted(stats.items()):
        print(f"{fam:10s} {s.cases:5d} {s.arrays:6d} {s.identical:9d} {s.max_abs:10.3e} {s.max_rel:10.3e}  {s.worst}")
    total = sum(s.arrays for s in stats.values()), sum(s.identical for s in stats.values())
    print(f"{'all':10s} {sum(s.cases for s in stats.values()):5d} {total[0]:6d} {total[1]:9d}")
    nan_arrays = [a for s in stats.values() for a in s.nan_arrays]
    if nan_arrays:
        print(f"arrays containing NaN in the reference (NaN patterns compared): {', '.join(nan_arrays)}")
    if problems:
        print(f"\n{len(problems)} problem(s):")
        for p in problems:
            print("  " + p)
        return 1
    print(f"all match (inputs bit-identical, outputs within rel {tol:g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new_dir", type=Path)
    parser.add_argument("ref_dir", type=Path)
    parser.add_argument("--tol", type=float, default=1e-12, help="relative tolerance for outputs (default 1e-12)")
    parser.add_argument("--verbose", action="store_true", help="print every array that is not bit-identical")
    parser.add_argument("--partial", action="store_true", help="compare only the cases present in NEW_DIR")
    args = parser.parse_args(argv)
    return compare(args.new_dir, args.ref_dir, tol=args.tol, verbose=args.verbose, partial=args.partial)


if __name__ == "__main__":
    sys.exit(main())
