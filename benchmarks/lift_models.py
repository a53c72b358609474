"""lift of torch models with numerical rules (issue 15): time of lift + NNGP kernel, and the error against a
Monte-Carlo estimate from wide default-initialised instances of the same torch model (more instances than the
tests in tests/lift/ afford; the models are those tests' own).

    python benchmarks/lift_models.py [--cases mlp,resnet,stage,attn,enc,rule] [--blocks 2] [--size 8] [--samples 4]
                                     [--instances 300] [--width 256] [--threads 2]

``mlp`` is the residual MLP of tests/layers/test_residual_law.py (``--blocks`` post-activation blocks; its NNGP
and NTK against wide ntkit twins, and the NTK by the mean rule ntkit had before the path weights). ``stage`` is
ResNet-18's first stage (tests/lift/test_lift_resnet.py's ResNet18Stage: two identity BasicBlocks
in a row). ``rule`` is the residual-law rule alone on ``--samples`` × 100 random covariances per program (two
levels with ReLU and LeakyReLU, three with ReLU) against its own ``(32, 48)`` rung.
One JSON line per case: ``seconds`` (lift + NNGP), ``rel_err`` (max |MC − lift| / max lift),
``mc_se`` (the MC estimate's largest standard error, same scale) and, for the ResNets, ``gaussian_sum_rel_err``:
the answer when the residual sum is treated as Gaussian (the rule ntkit had before ``Kernel.law``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE] + [os.path.join(HERE, "..", "tests", *sub) for sub in ((), ("lift",), ("layers",))]
from _common import emit, machine  # noqa: E402
from helpers import rel_err  # noqa: E402

import ntkit  # noqa: E402
from ntkit.layers import residual_law  # noqa: E402


def resnet(args: argparse.Namespace, stage: bool = False) -> None:
    """``stage``: ResNet-18's first stage (two identity blocks in a row), else the tests' SmallResNet."""
    import test_lift_resnet as T

    model = T.ResNet18Stage if stage else T.SmallResNet
    x = T._x(args.samples, 3, args.size, args.size)
    t = time.perf_counter()
    k = ntkit.lift(model().eval()).kernel_fn(x, None, "nngp")
    seconds = time.perf_counter() - t
    rule = residual_law.law_kernel
    try:  # the old answer: the sum taken as Gaussian (its covariance into the plain ReLU rule)
        residual_law.law_kernel = lambda layer, kk, ab: layer.kernel(kk.replace(is_gaussian=True, law=None))
        kg = ntkit.lift(model().eval()).kernel_fn(x, None, "nngp")
    finally:
        residual_law.law_kernel = rule
    mc, se = T._mc_nngp(lambda: model(w=args.width, classes=64), x, args.instances)
    emit(
        bench="lift_resnet18_stage" if stage else "lift_resnet_basicblock",
        image=f"{args.size}x{args.size}",
        samples=args.samples,
        seconds=round(seconds, 3),
        instances=args.instances,
        width=args.width,
        rel_err=round(rel_err(mc, k), 5),
        mc_se=round(float(se.max() / k.abs().max()), 5),
        gaussian_sum_rel_err=round(rel_err(mc, kg), 5),
        machine=machine(),
    )


def _mean_ntk_rule(rule):
    """The NTK rule ntkit had before the path weights: ``E[φ'(h)φ'(h')]`` times the mean NTK of the sum. It is
    ``P_{L−1}`` (the rule with the last summand's NTK set to 1 and the others' to 0) times the record's NTK."""

    def mean_rule(layer, k, ab):
        out = rule(layer, k, ab)
        if k.ntk is None:
            return out
        steps = list(k.law.steps)
        gauss = [i for i, st in enumerate(steps) if isinstance(st, residual_law.Gauss)]
        for i in gauss:
            r = steps[i].rec
            fill = torch.ones_like if i == gauss[-1] else torch.zeros_like
            steps[i] = residual_law.Gauss(r.replace(ntk=fill(r.ntk)))
        p_last = rule(layer, k.replace(law=residual_law.ResidualLaw(tuple(steps))), ab).ntk
        return out.replace(ntk=p_last * k.ntk)

    return mean_rule


def residual_mlp(args: argparse.Namespace) -> None:
    """NNGP and NTK of the post-activation residual MLP of tests/layers/test_residual_law.py with ``--blocks``
    blocks, against Monte Carlo of wide finite twins (``ntkit.monte_carlo_kernel_fn``), and the NTK by the mean
    rule (``_mean_ntk_rule``) for comparison."""
    import test_residual_law as TR

    def block(w: float):
        branch = ntkit.serial(ntkit.Dense(64, w, 0.0), ntkit.Relu(), ntkit.Dense(64, 1.3, 0.0))
        return [ntkit.FanOut(2), ntkit.parallel(branch, ntkit.Identity()), ntkit.FanInSum(), ntkit.Relu()]

    layers = [lay for i in range(args.blocks) for lay in block(1.4 - 0.2 * i)]
    net = ntkit.serial(ntkit.Dense(64, 1.5, 0.1), ntkit.Relu(), *layers, ntkit.Dense(128, 1.0, 0.0))
    x = TR._x(5, 3)
    t = time.perf_counter()
    k = net.kernel_fn(x, None, ("nngp", "ntk"))
    seconds = time.perf_counter() - t
    rule = residual_law.law_kernel
    try:
        residual_law.law_kernel = _mean_ntk_rule(rule)
        k_mean = net.kernel_fn(x, None, "ntk")
    finally:
        residual_law.law_kernel = rule
    per = ntkit.monte_carlo_kernel_fn(net, args.instances, args.width, seed=0).samples(x, None, ("nngp", "ntk"))
    out = {}
    for g, kk in (("nngp", k.nngp), ("ntk", k.ntk)):
        m = per[g].mean(0)
        out[g] = rel_err(m, kk)
        out[g + "_mc_se"] = float((per[g].std(0) / math.sqrt(args.instances)).max() / m.abs().max())
    emit(
        bench="residual_mlp_ntk",
        blocks=args.blocks,
        seconds=round(seconds, 3),
        instances=args.instances,
        width=args.width,
        nngp_rel_err=round(out["nngp"], 5),
        ntk_rel_err=round(out["ntk"], 5),
        mc_se=round(max(out["nngp_mc_se"], out["ntk_mc_se"]), 5),
        mean_rule_ntk_rel_err=round(rel_err(per["ntk"].mean(0), k_mean), 5),
        machine=machine(),
    )


def attention(name: str, args: argparse.Namespace) -> None:
    import test_lift_attention as A

    if name == "attn":
        model, wide, x = A.AttnModel, dict(E=args.width, H=16, outs=1024), A._x(3, 4, 3) * 1.5
    else:
        model, wide, x = A.EncoderModel, dict(E=args.width, H=16, outs=1024), A._x(4, 3, 3, seed=1) * 1.5
    t = time.perf_counter()
    k = ntkit.lift(model().eval()).kernel_fn(x, None, "nngp").double()
    seconds = time.perf_counter() - t
    torch.manual_seed(123)
    per = []
    with torch.no_grad():
        for _ in range(args.instances):
            f = model(**wide, dtype=torch.float64).eval()(x)
            per.append(f @ f.T / f.shape[1])
    stack = torch.stack(per)
    mc, se = stack.mean(0), stack.std(0) / math.sqrt(args.instances)
    scale = k.abs().max()
    emit(
        bench=f"lift_{name}",
        inputs=list(x.shape),
        seconds=round(seconds, 3),
        instances=args.instances,
        width=args.width,
        heads=16,
        rel_err=round(float((mc - k).abs().max() / scale), 5),
        mc_se=round(float(se.max() / scale), 5),
        machine=machine(),
    )


def _random_levels(n: int, levels: int, g: torch.Generator) -> tuple:
    """Random ``(q12, q11, q22)`` per level: the first (the skip's ``z``) with variances in [0.5, 2], the later
    (Gaussian branches) in [0.01, 4] (log-uniform; the two sides within a factor e^±0.7), 30 % of the
    correlations within 1e-6 to 1e-1 of 1, the others uniform in (−0.99, 0.99)."""
    out = []
    for lv in range(levels):
        lo, hi = (0.5, 2.0) if lv == 0 else (0.01, 4.0)
        v1 = torch.empty(n, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g).exp()
        v2 = v1 * torch.empty(n, dtype=torch.float64).uniform_(-0.7, 0.7, generator=g).exp()
        near = torch.rand(n, generator=g, dtype=torch.float64) < 0.3
        gap = 10 ** torch.empty(n, dtype=torch.float64).uniform_(-6, -1, generator=g)
        rho = torch.where(near, 1 - gap, torch.empty(n, dtype=torch.float64).uniform_(-0.99, 0.99, generator=g))
        out.append((rho * torch.sqrt(v1 * v2), v1, v2))
    return tuple(out)


def rule_stress(args: argparse.Namespace) -> None:
    """The residual-law rule's NNGP (``pair_expectations``, with its error control) on ``--samples`` × 100 random
    covariances per program against its ``(32, 48)`` rung: how many entries come back above the tolerance, and
    how many of those with an error estimate below it (silently). Entries the rule refuses are counted apart."""
    g = torch.Generator().manual_seed(7)
    n = 100 * args.samples
    for levels, act in ((2, ntkit.Relu()), (2, ntkit.LeakyRelu(0.1)), (3, ntkit.Relu())):
        lvs = _random_levels(n, levels, g)
        prefixes = ((residual_law.Apply(act),),) * (levels - 1)
        errs, refused = [], 0
        for s0 in range(0, n, 20):  # in blocks, so that an entry the rule refuses costs only its block
            part = tuple(tuple(t[s0 : s0 + 20] for t in lv) for lv in lvs)
            try:
                got, _ = residual_law.pair_expectations(part, prefixes, (0.0, 1.0), False)
            except ntkit.layers.base.LayerError:
                refused += 1
                continue
            ref = residual_law._rules_fn(part, prefixes, (0.0, 1.0), ((32, 48),), False)[0][0]
            errs.append((got - ref).abs() / residual_law._pair_scale(part, prefixes, (0.0, 1.0)))
        err = torch.cat(errs)
        emit(
            bench="residual_law_random_covariances",
            levels=levels,
            prefix=repr(act),
            entries=int(err.numel()),
            refused_blocks_of_20=refused,
            max_err=float(err.max()),
            above_tol=int((err > residual_law.TOL).sum()),
            tol=residual_law.TOL,
            machine=machine(),
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet,attn,enc")
    ap.add_argument("--size", type=int, default=8, help="ResNet image side")
    ap.add_argument("--samples", type=int, default=4, help="ResNet inputs")
    ap.add_argument("--instances", type=int, default=300, help="wide torch instances for the Monte Carlo")
    ap.add_argument("--width", type=int, default=256, help="width of the wide instances")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2, help="post-activation blocks of the residual MLP (1 or 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        if case == "mlp":
            residual_mlp(args)
        elif case in ("resnet", "stage"):
            resnet(args, stage=case == "stage")
        elif case in ("attn", "enc"):
            attention(case, args)
        elif case == "rule":
            rule_stress(args)
        else:
            raise SystemExit(f"unknown case {case!r}: choose mlp, resnet, stage, attn, enc, rule")


if __name__ == "__main__":
    main()
