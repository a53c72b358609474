"""A small ResNet with torchvision's post-activation BasicBlock, lifted with ntkit.lift: the ReLU after the
residual sum of an identity block needs the residual-stream rule (ntkit.layers.residual_law); its NNGP against
Monte Carlo from wide default-initialised instances of the very torch model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import rel_err
from torch import nn

import ntkit as nt


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=1, bias=False, dilation=1)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock as torchvision writes it (post-activation)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class SmallResNet(nn.Module):
    """Stem Conv(3, w, 3, pad 1) + BN + ReLU, an identity BasicBlock, a stride-2 BasicBlock with a 1×1 conv + BN
    downsample, global average pooling, Linear."""

    def __init__(self, w: int = 16, classes: int = 10, block=BasicBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = block(w, w)
        self.layer2 = block(w, w, 2, nn.Sequential(conv1x1(w, w, 2), nn.BatchNorm2d(w)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ResNet18Stage(nn.Module):
    """ResNet-18's first stage (two identity BasicBlocks in a row: two non-Gaussian levels in the residual
    stream) on the stem Conv + BN + ReLU, then global average pooling and Linear."""

    def __init__(self, w: int = 16, classes: int = 10, block=BasicBlock):
        super().__init__()
        self.conv1 = nn.Conv2d(3, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(block(w, w), block(w, w))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w, classes)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mc_nngp(make, x, n_models, seed=0):
    """E[f(x) f(x')] over fresh default-initialised eval-mode models (outputs averaged) and its standard error."""
    torch.manual_seed(seed)
    per = []
    with torch.no_grad():
        for _ in range(n_models):
            m = make().double().eval()
            # the limit's hidden biases vanish (variance 1/(3·fan_in) -> 0; ntkit.lift's docstring): the one hidden
            # bias, fc's, is 1/(3·256) at this width, several % of this small kernel, so it is zeroed here
            m.fc.bias.zero_()
            f = m(x)
            per.append(f @ f.T / f.shape[1])
    t = torch.stack(per)
    return t.mean(0), t.std(0) / math.sqrt(n_models)


def _check(block, model=SmallResNet):
    x = _x(3, 3, 4, 4)
    k = nt.lift(model(block=block).eval()).kernel_fn(x, None, "nngp")
    mc, se = _mc_nngp(lambda: model(w=256, classes=64, block=block), x, 120)
    err, tol = rel_err(mc, k), 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"ResNet NNGP: MC error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol


def test_small_resnet_against_monte_carlo():
    _check(BasicBlock)


def test_torchvision_basic_block():
    tv = pytest.importorskip("torchvision.models.resnet", reason="torchvision is not installed")
    _check(tv.BasicBlock)


def test_two_identity_blocks_in_a_row():
    """ResNet-18's stage of two identity BasicBlocks: the second block's ReLU sees a sum whose skip is itself a
    ReLU of a non-Gaussian sum (the three-level rule of ntkit.layers.residual_law)."""
    _check(BasicBlock, ResNet18Stage)
