"""Every empirical-NTK implementation agrees with a brute-force NTK built from plain autograd Jacobians
(one ``torch.autograd.grad`` per output entry, independent of ``torch.func``), on MLPs, CNNs with pooling,
a Transformer block, weight sharing and BatchNorm in eval mode; traced and untraced; ``x2=None`` and given.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ntkit
from ntkit.empirical import empirical_ntk

IMPLS = ("jacobian", "ntk_vp", "structured", "auto")
TOL = 1e-9  # relative, float64 (the bar is 1e-6; all implementations are exact)


def brute_jacobian(model: nn.Module, x: torch.Tensor, params=None) -> torch.Tensor:
    """``(N, O, P)``: one autograd backward pass per output entry."""
    ps = list(dict(model.named_parameters()).values()) if params is None else params
    out = model(x)
    flat = out.reshape(out.shape[0], -1)
    rows = []
    for i in range(flat.shape[0]):
        for a in range(flat.shape[1]):
            g = torch.autograd.grad(flat[i, a], ps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for gi, p in zip(g, ps)]))
    return torch.stack(rows).reshape(flat.shape[0], flat.shape[1], -1)


def brute_ntk(model, x1, x2=None, params=None) -> torch.Tensor:
    """Full NTK ``(N1, N2, O, O)``."""
    j1 = brute_jacobian(model, x1, params)
    j2 = j1 if x2 is None else brute_jacobian(model, x2, params)
    return torch.einsum("iap,jbp->ijab", j1, j2)


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------------
class TransformerBlock(nn.Module):
    """Token embedding, one pre-built encoder layer (self-attention, LayerNorm, MLP), mean pool, head."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.1, batch_first=True)
        self.norm = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        return self.head(self.norm(self.layer(self.emb(ids))).mean(1))


class Shared(nn.Module):
    """Weight sharing: one Linear applied twice, and the output layer tied to the embedding."""

    def __init__(self, vocab=10, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.lin(self.emb(ids)))
        h = torch.tanh(self.lin(h))
        return self.out(h.mean(1))


class ReadsWeight(nn.Module):
    """A parent reading a child's weight outside the child's forward (structure must not be assumed)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.relu(self.a(x)) + 0.1 * x @ self.a.weight.T
        return self.b(h) * self.b.weight.norm()


def _randomise_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            with torch.no_grad():
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def _floats(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make(name):
    """(model, x1, x2) in float64, eval mode."""
    torch.manual_seed(0)
    if name == "mlp":
        m = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3))
        x1, x2 = _floats(4, 5, seed=1), _floats(3, 5, seed=2)
    elif name == "cnn_pool_bn":
        m = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular", bias=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        _randomise_bn(m)
        x1, x2 = _floats(3, 2, 8, 8, seed=1), _floats(2, 2, 8, 8, seed=2)
    elif name == "cnn1d_3d":
        m = nn.Sequential(
            nn.Unflatten(1, (4, 9)),
            nn.Conv1d(4, 6, 3, groups=2, dilation=2, padding="same", padding_mode="reflect"),
            nn.GELU(),
            nn.Conv1d(6, 4, 2, stride=2),
            nn.GroupNorm(2, 4),
            nn.Unflatten(1, (1, 2, 2)),
            nn.Conv3d(1, 2, (2, 2, 2)),
            nn.Tanh(),
            nn.Flatten(),
            nn.LazyLinear(2),
        )
        x1, x2 = _floats(3, 36, seed=1), _floats(2, 36, seed=2)
        m(x1.float())  # materialise the lazy layer
    elif name == "transformer":
        m = TransformerBlock()
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randint(0, 11, (3, 5), generator=g), torch.randint(0, 11, (2, 5), generator=g)
    elif name == "shared":
        m = Shared()
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randint(0, 10, (3, 4), generator=g), torch.randint(0, 10, (2, 4), generator=g)
    elif name == "bn_mlp":
        m = _randomise_bn(
            nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 3))
        )
        x1, x2 = _floats(4, 5, seed=1), _floats(3, 5, seed=2)
    elif name == "reads_weight":
        m = ReadsWeight()
        x1, x2 = _floats(4, 5, seed=1), _floats(3, 5, seed=2)
    elif name == "ntkit_twins":  # ntkit's own finite networks: DenseModule and ConvModule
        net = ntkit.serial(
            ntkit.Conv(4, (3, 3), padding="CIRCULAR", b_std=0.2),
            ntkit.Relu(),
            ntkit.Conv(3, (2, 2), strides=(2, 2), parameterization="standard", b_std=0.1),
            ntkit.Flatten(),
            ntkit.Dense(3, b_std=0.3),
        )
        m = net.module((2, 6, 6), seed=0)
        x1, x2 = _floats(3, 2, 6, 6, seed=1), _floats(2, 2, 6, 6, seed=2)
    else:  # pragma: no cover
        raise KeyError(name)
    return m.double().eval(), x1, x2


MODELS = ("mlp", "cnn_pool_bn", "cnn1d_3d", "transformer", "shared", "bn_mlp", "reads_weight", "ntkit_twins")


@pytest.mark.parametrize("name", MODELS)
def test_implementations_agree_with_brute_force(name):
    model, x1, x2 = make(name)
    full12 = brute_ntk(model, x1, x2)
    full11 = brute_ntk(model, x1)
    o = full12.shape[-1]
    for impl in IMPLS:
        k = empirical_ntk(model, x1, x2, implementation=impl, trace_axes=())
        assert k.shape == full12.shape
        assert rel(k, full12) <= TOL, (impl, "untraced, x2")
        k = empirical_ntk(model, x1, None, implementation=impl, trace_axes=())
        assert rel(k, full11) <= TOL, (impl, "untraced, x2=None")
        k = empirical_ntk(model, x1, x2, implementation=impl)
        assert k.shape == full12.shape[:2]
        assert rel(k, torch.einsum("ijaa->ij", full12) / o) <= TOL, (impl, "traced, x2")
        k = empirical_ntk(model, x1, implementation=impl)
        assert rel(k, torch.einsum("ijaa->ij", full11) / o) <= TOL, (impl, "traced, x2=None")


def test_structure_is_used_where_it_is_valid_and_only_there():
    """The structured path must actually be structured on stock modules, and fall back where a weight is
    also read outside its module (else it would be silently wrong; the agreement test checks the values)."""
    from ntkit.empirical._model import fixed_params, probe, resolve_params
    from ntkit.empirical._spec import OutSpec
    from ntkit.empirical.structured import Structured

    def analyse(name):
        model, x1, _ = make(name)
        p = resolve_params(model, None)
        f = fixed_params(model, p)
        return Structured(model, p, OutSpec(probe(model, p, x1, f).out_shape, (-1,), ()), probe(model, p, x1, f), x1, f)

    st = analyse("transformer")
    assert {"emb.weight", "layer.linear1.weight", "layer.norm1.weight", "head.weight"} <= st.structured
    assert "layer.self_attn.in_proj_weight" in st.generic and "layer.self_attn.out_proj.weight" in st.generic
    st = analyse("reads_weight")
    assert "a.weight" in st.generic and "b.weight" in st.generic and "a.bias" in st.structured
    st = analyse("shared")  # the tied weight is used by an Embedding and a Linear: materialised, still structured
    assert "emb.weight" in st.structured and st.mode["emb.weight"] == "materialise"


@pytest.mark.parametrize("impl", IMPLS)
def test_diagonal_axes_blocks_and_subsets(impl):
    model, x1, x2 = make("mlp")
    full = empirical_ntk(model, x1, None, implementation="jacobian", trace_axes=())
    # per-sample kernels (batch axis diagonal), and per-output diagonal
    d = empirical_ntk(model, x1, None, implementation=impl, trace_axes=(), diagonal_axes=(0,))
    torch.testing.assert_close(d, torch.einsum("iiab->iab", full), rtol=1e-10, atol=0)
    d = empirical_ntk(model, x1, x2, implementation=impl, trace_axes=(), diagonal_axes=(-1,))
    torch.testing.assert_close(d, torch.einsum("ijaa->ija", brute_ntk(model, x1, x2)), rtol=1e-10, atol=0)
    # blocks (explicit, and forced by a tiny memory budget) do not change the result
    b = empirical_ntk(model, x1, None, implementation=impl, trace_axes=(), block_size=(3, 2))
    torch.testing.assert_close(b, full, rtol=1e-10, atol=0)
    b = empirical_ntk(model, x1, x2, implementation=impl, memory_budget_bytes=1)
    torch.testing.assert_close(b, empirical_ntk(model, x1, x2, implementation="jacobian"), rtol=1e-10, atol=0)
    # a subset of parameters: the last layer only (its NTK is the feature kernel, times the identity)
    last = list(model[4].parameters())
    k = empirical_ntk(model, x1, x2, params=last, implementation=impl, trace_axes=())
    torch.testing.assert_close(k, brute_ntk(model, x1, x2, params=last), rtol=1e-10, atol=0)
    k = empirical_ntk(model, x1, x2, params=["4.weight"], implementation=impl)
    with torch.no_grad():
        h = model[:4]
        torch.testing.assert_close(k, h(x1) @ h(x2).T, rtol=1e-10, atol=0)


def test_params_mapping_evaluates_at_given_values():
    model, x1, x2 = make("mlp")
    other, _, _ = make("mlp")
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.7).add_(0.1)
    values = dict(other.named_parameters())
    for impl in IMPLS:
        k = empirical_ntk(model, x1, x2, params=values, implementation=impl)
        torch.testing.assert_close(k, empirical_ntk(other, x1, x2, implementation="jacobian"), rtol=1e-10, atol=0)
    # the model itself is untouched
    torch.testing.assert_close(empirical_ntk(model, x1, x2), empirical_ntk(make("mlp")[0], x1, x2))


def test_float32_and_dtype_follows_output():
    model, x1, x2 = make("cnn_pool_bn")
    m32 = model.float()
    k32 = empirical_ntk(m32, x1.float(), x2.float())
    assert k32.dtype == torch.float32
    k64 = empirical_ntk(model.double(), x1, x2)
    assert rel(k32.double(), k64) < 1e-4
