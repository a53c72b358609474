"""Models that Jacobian contraction handles and structured derivatives used to crash on or get wrong (issue
#16 item 7): each is compared against ``implementation="jacobian"`` (1e-9 relative in float64), and where the
fix is that the layer stays structured, the analysis is checked to use its rule (not a silent fallback).

Root causes covered: rules that read constructor bookkeeping (``in_features``, ``kernel_size``,
``num_embeddings``, a stale ``_reversed_padding_repeated_twice``) instead of what the forward reads (an
``AttributeError`` on a subclass that builds its own weight); hooks that saw positional inputs only (a layer
called as ``lin(input=x)``); the perturbation added after the user's forward hooks (a hook scaling the output,
or reading the weight, gave a wrong kernel); the perturbation's dtype taken from the first parameter (mixed
float64/float32 models crashed); an input modified in place after the call (read back modified).
"""

from __future__ import annotations

import pytest
import torch
from empirical.test_implementations import brute_ntk, rel
from torch import nn

from ntkit.empirical import empirical_ntk
from ntkit.empirical._model import fixed_params, probe, resolve_params
from ntkit.empirical._spec import OutSpec
from ntkit.empirical.structured import Structured

TOL = 1e-9


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def analyse(model: nn.Module, x: torch.Tensor) -> Structured:
    p = resolve_params(model, None)
    f = fixed_params(model, p)
    pr = probe(model, p, x, f)
    return Structured(model, p, OutSpec(pr.out_shape, (-1,), ()), pr, x, f)


class OwnLinear(nn.Linear):
    """A Linear that builds its own weight (no ``in_features``/``out_features``): the stock forward runs."""

    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        nn.Module.__init__(self)
        self.weight, self.bias = nn.Parameter(w), nn.Parameter(b)


class OwnConv(nn.Conv2d):
    """A Conv2d with only the settings its forward reads (no ``kernel_size``, ``out_channels``, reversed padding)."""

    def __init__(self, w: torch.Tensor):
        nn.Module.__init__(self)
        self.weight, self.bias = nn.Parameter(w), None
        self.stride, self.padding, self.dilation, self.groups, self.padding_mode = (1, 1), (1, 1), (1, 1), 1, "zeros"


class KeywordCall(nn.Module):
    """One Linear called positionally and by keyword."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(input=torch.tanh(self.a(input=torch.tanh(self.a(x)))))


def _resized():
    lin = nn.Linear(5, 3)  # in_features/out_features say 5 -> 3; the weight in use is 5 -> 4
    lin.weight, lin.bias = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.randn(4))
    return nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 2))


def _repadded():
    conv = nn.Conv2d(2, 3, 3)  # padding set after construction: _reversed_padding_repeated_twice is stale
    conv.padding = (1, 1)
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 2))


def _int_padded():
    conv = nn.Conv2d(2, 3, 3, stride=2)
    conv.padding, conv.stride = 2, 1  # one int for every axis
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(3 * 64, 2))


def _same_even():  # 'same' with an even kernel and dilation: asymmetric zero padding
    return nn.Sequential(
        nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 3)), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 36, 2)
    )


def _embedding_resized():
    emb = nn.Embedding(5, 4)  # num_embeddings says 5; the table in use has 9 rows
    emb.weight = nn.Parameter(torch.randn(9, 4))
    return nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2))


def _scaled_by_hook():
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    m[0].register_forward_hook(lambda mod, args, out: 2 * out)
    return m


def _weight_read_by_hook():
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    m[0].register_forward_hook(lambda mod, args, out: out + args[0] @ mod.weight.T)
    return m


def _input_changed_by_pre_hook():
    m = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    m[2].register_forward_pre_hook(lambda mod, args: (3 * args[0],))
    return m


# name -> (model, inputs, parameters that must stay structured, parameters that must be generic)
CASES = {
    "own_linear": (
        lambda: nn.Sequential(OwnLinear(torch.randn(4, 5), torch.randn(4)), nn.Tanh(), nn.Linear(4, 2)),
        lambda: _x(3, 5),
        {"0.weight", "0.bias"},
        set(),
    ),
    "own_conv": (
        lambda: nn.Sequential(OwnConv(torch.randn(3, 2, 3, 3)), nn.Flatten(), nn.Linear(3 * 36, 2)),
        lambda: _x(3, 2, 6, 6),
        {"0.weight"},
        set(),
    ),
    "keyword_call": (KeywordCall, lambda: _x(3, 5), {"a.weight", "a.bias", "b.weight"}, set()),
    "resized_linear": (_resized, lambda: _x(3, 5), {"0.weight", "0.bias"}, set()),
    "repadded_conv": (_repadded, lambda: _x(3, 2, 6, 6), {"0.weight"}, set()),
    "int_padding_conv": (_int_padded, lambda: _x(3, 2, 6, 6), {"0.weight"}, set()),
    "same_even_dilated_conv": (_same_even, lambda: _x(3, 2, 6, 6), {"0.weight"}, set()),
    "resized_embedding": (
        _embedding_resized,
        lambda: torch.randint(0, 9, (3, 3), generator=torch.Generator().manual_seed(1)),
        {"0.weight"},
        set(),
    ),
    "hook_scales_output": (_scaled_by_hook, lambda: _x(3, 5), {"0.weight", "0.bias"}, set()),
    "hook_reads_weight": (_weight_read_by_hook, lambda: _x(3, 5), {"0.bias", "2.weight"}, {"0.weight"}),
    "pre_hook_changes_input": (_input_changed_by_pre_hook, lambda: _x(3, 5), {"2.weight"}, set()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_structured_agrees_with_jacobian(name):
    build, inputs, structured, generic = CASES[name]
    torch.manual_seed(0)
    model, x = build().double().eval(), inputs()
    st = analyse(model, x)
    assert structured <= st.structured, (name, st.structured)
    assert generic <= set(st.generic), (name, st.generic)
    ref = empirical_ntk(model, x, implementation="jacobian", trace_axes=())
    for impl in ("structured", "auto"):
        k = empirical_ntk(model, x, implementation=impl, trace_axes=())
        assert rel(k, ref) <= TOL, (name, impl, rel(k, ref))
        k2 = empirical_ntk(model, x, x[:2], implementation=impl)
        assert rel(k2, empirical_ntk(model, x, x[:2], implementation="jacobian")) <= TOL, (name, impl)


def test_jacobian_reference_is_the_autograd_kernel():
    """The reference of the cases above is itself checked against one autograd backward pass per output."""
    for name in ("own_linear", "keyword_call", "hook_scales_output", "resized_embedding"):
        build, inputs, *_ = CASES[name]
        torch.manual_seed(0)
        model, x = build().double().eval(), inputs()
        assert rel(empirical_ntk(model, x, implementation="structured", trace_axes=()), brute_ntk(model, x)) <= TOL


class Mixed(nn.Module):
    """A float64 layer, then float32 layers: the perturbation of each layer's output has that output's dtype."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5).double(), nn.Linear(5, 4).float(), nn.Linear(4, 2).float()

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)).float())))


def test_mixed_precision_model():
    torch.manual_seed(0)
    model, x = Mixed().eval(), _x(3, 5)
    ref = empirical_ntk(model, x, implementation="jacobian", trace_axes=()).double()
    for impl in ("structured", "auto"):
        k = empirical_ntk(model, x, implementation=impl, trace_axes=())
        assert rel(k.double(), ref) < 1e-6  # float32 layers: float32 round-off
    assert {"a.weight", "b.weight", "c.weight"} <= analyse(model, x).structured


class InPlaceInput(nn.Module):
    """``g += lin(g)``: the layer's input is modified after the call. No implementation may read it back."""

    def __init__(self):
        super().__init__()
        self.e, self.lin, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        g = self.e(x) + 0
        g += self.lin(g)
        return self.out(g)


def test_input_modified_in_place_is_not_read_back():
    torch.manual_seed(0)
    model, x = InPlaceInput().double().eval(), _x(3, 5)
    st = analyse(model, x)
    assert {"lin.weight", "lin.bias"} <= set(st.generic) and "out.weight" in st.structured
    # then autograd refuses the model for structured derivatives as it does for the Jacobian (a silently wrong
    # kernel before: the weight's inputs were read after the in-place update)
    for impl in ("jacobian", "structured"):
        with pytest.raises(RuntimeError, match="inplace"):
            empirical_ntk(model, x, implementation=impl)


@pytest.mark.parametrize(
    "build, x, kw",
    [
        (  # outputs with several axes (N, C, H, W): the NTK-vector products reshaped them wrongly
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.Linear(5, 4)),
            lambda: _x(3, 2, 5, 5),
            [{}, {"trace_axes": ()}, {"trace_axes": (1, 2), "diagonal_axes": (3,)}],
        ),
        (  # scalar outputs (N,)
            lambda: nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)),
            lambda: _x(3, 5),
            [{"trace_axes": ()}],
        ),
    ],
)
def test_ntk_vp_on_outputs_that_are_not_vectors(build, x, kw):
    torch.manual_seed(0)
    model, xs = build().double().eval(), x()
    for k in kw:
        ref = empirical_ntk(model, xs, xs[:2], implementation="jacobian", **k)
        for impl in ("ntk_vp", "structured", "auto"):
            assert rel(empirical_ntk(model, xs, xs[:2], implementation=impl, **k), ref) <= TOL, (impl, k)
