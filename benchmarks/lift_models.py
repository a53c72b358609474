"""lift of torch models with numerical rules (issue 15): time of lift + NNGP kernel, and the error against a
Monte-Carlo estimate from wide default-initialised instances of the same torch model (more instances than the
tests in tests/lift/ afford; the models are those tests' own).

    python benchmarks/lift_models.py [--cases resnet,attn,enc] [--size 8] [--samples 4] [--instances 300]
                                     [--width 256] [--threads 2]

One JSON line per case: ``seconds`` (lift + NNGP), ``rel_err`` (max |MC − lift| / max lift), ``mc_se`` (the MC
estimate's largest standard error, same scale) and, for the ResNet, ``gaussian_sum_rel_err``: the answer when the
residual sum is treated as Gaussian (the rule ntkit had before ``Kernel.law``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "tests", "lift")]
from _common import emit, machine  # noqa: E402
from helpers import rel_err  # noqa: E402

import ntkit  # noqa: E402
from ntkit.layers import residual_law  # noqa: E402


def resnet(args: argparse.Namespace) -> None:
    import test_lift_resnet as T

    x = T._x(args.samples, 3, args.size, args.size)
    t = time.perf_counter()
    k = ntkit.lift(T.SmallResNet().eval()).kernel_fn(x, None, "nngp")
    seconds = time.perf_counter() - t
    rule = residual_law.law_kernel
    try:  # the old answer: the sum taken as Gaussian (its covariance into the plain ReLU rule)
        residual_law.law_kernel = lambda layer, kk, ab: layer.kernel(kk.replace(is_gaussian=True, law=None))
        kg = ntkit.lift(T.SmallResNet().eval()).kernel_fn(x, None, "nngp")
    finally:
        residual_law.law_kernel = rule
    mc, se = T._mc_nngp(lambda: T.SmallResNet(w=args.width, classes=64), x, args.instances)
    emit(
        bench="lift_resnet_basicblock",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="resnet,attn,enc")
    ap.add_argument("--size", type=int, default=8, help="ResNet image side")
    ap.add_argument("--samples", type=int, default=4, help="ResNet inputs")
    ap.add_argument("--instances", type=int, default=300, help="wide torch instances for the Monte Carlo")
    ap.add_argument("--width", type=int, default=256, help="width of the wide instances")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for case in args.cases.split(","):
        if case == "resnet":
            resnet(args)
        elif case in ("attn", "enc"):
            attention(case, args)
        else:
            raise SystemExit(f"unknown case {case!r}: choose resnet, attn, enc")


if __name__ == "__main__":
    main()
