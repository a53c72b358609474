"""Models whose output for one sample depends on the other samples of the batch (issue #16 item 7): every
implementation evaluates the model one sample at a time, so such a model used to get a silently wrong kernel
(all zero for ``x - x.mean(0)``). The probe refuses it; models that treat samples independently are not
refused (no false positives), and the documented way to get the NTK of the batch as one function is checked
against brute-force autograd on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from empirical.test_implementations import IMPLS, MODELS, brute_jacobian, brute_ntk, make, rel
from torch import nn

from ntkit.empirical import EmpiricalError, empirical_kernel_fn, empirical_ntk, ntk_implementation
from ntkit.empirical._model import check_independent


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Mix(nn.Module):
    """``Linear -> mix -> tanh -> Linear``, ``mix`` a function of the whole batch of hidden states."""

    def __init__(self, mix):
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(5, 6), nn.Linear(6, 3), mix

    def forward(self, x):
        return self.b(torch.tanh(self.mix(self.a(x))))


def _no_grad_centre(h):
    with torch.no_grad():
        m = h.mean(0)
    return h - m


MIXING = {
    "centre": lambda h: h - h.mean(0),
    "centre_detached": lambda h: h - h.mean(0).detach(),
    "centre_no_grad": _no_grad_centre,
    "softmax_over_batch": lambda h: torch.softmax(h, 0),
    "cumsum_over_batch": lambda h: torch.cumsum(h, 0),
    "reverse_cumsum": lambda h: h.flip(0).cumsum(0).flip(0),
    "sort_over_batch": lambda h: h.sort(0).values,
    "roll_over_batch": lambda h: torch.roll(h, 1, 0),
    "batch_size_factor": lambda h: h * h.shape[0],
    "batch_sum_broadcast": lambda h: h.sum(0, keepdim=True).expand_as(h),
    "weak_1e-3": lambda h: h + 1e-3 * h.mean(0),
}
MESSAGE = "depends on the other samples in its batch"


@pytest.mark.parametrize("name", list(MIXING))
def test_mixing_models_are_refused(name):
    torch.manual_seed(0)
    model = Mix(MIXING[name]).double().eval()
    x = _x(4, 5)
    for impl in IMPLS:
        with pytest.raises(EmpiricalError, match=MESSAGE):
            empirical_ntk(model, x, implementation=impl)
    with pytest.raises(EmpiricalError, match=MESSAGE):
        empirical_ntk(model, x[:1], x)  # x2's samples count too
    with pytest.raises(EmpiricalError, match="model.eval()"):  # the message names the fix
        ntk_implementation(model, x)
    with pytest.raises(EmpiricalError, match=MESSAGE):
        empirical_kernel_fn(model)(x)


def test_the_silent_all_zero_kernel_is_refused_in_float32():
    """The symptom of the issue: centring gave an all-zero NTK (each sample alone is its own mean)."""
    torch.manual_seed(0)
    model = Mix(MIXING["centre"]).float().eval()
    with pytest.raises(EmpiricalError, match=MESSAGE):
        empirical_ntk(model, _x(8, 5).float(), implementation="structured")


def test_equal_samples_and_token_ids():
    torch.manual_seed(0)
    model = Mix(MIXING["cumsum_over_batch"]).double().eval()
    with pytest.raises(EmpiricalError, match=MESSAGE):  # every sample equal: [x0, x0, x0] still shows cumsum
        empirical_ntk(model, _x(1, 5).expand(4, 5).clone())

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 2)

        def forward(self, ids):
            h = self.emb(ids).mean(1)
            return self.head(h - h.mean(0))

    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(1))
    with pytest.raises(EmpiricalError, match=MESSAGE):
        empirical_ntk(Tokens().double(), ids)


def test_batch_dependent_shapes_and_layers_over_the_batch():
    class Pool(nn.Module):  # one output row for the whole batch
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x):
            return self.a(x).sum(0, keepdim=True)

    with pytest.raises(EmpiricalError, match="maps a batch of 3 samples to an output of shape"):
        empirical_ntk(Pool().double(), _x(4, 5))

    class OverBatch(nn.Module):  # a layer applied on the transposed batch: takes 4 samples, not one
        def __init__(self):
            super().__init__()
            self.a, self.mix = nn.Linear(5, 3), nn.Linear(4, 4)

        def forward(self, x):
            return self.mix(self.a(x).T).T

    with pytest.raises(EmpiricalError, match="accepts the batch of 4 samples but not one sample"):
        empirical_ntk(OverBatch().double(), _x(4, 5))


def test_random_forward_is_named_as_such():
    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x):
            return F.dropout(self.a(x), 0.5, training=True)

    with pytest.raises(EmpiricalError, match="different outputs for the same input"):
        empirical_ntk(Random().double(), _x(4, 5))


def test_one_sample_batches_are_exact_and_not_refused():
    """With one sample per batch, per-sample evaluation is the batch's own: the kernel is exact."""
    torch.manual_seed(0)
    model = Mix(MIXING["softmax_over_batch"]).double().eval()
    x1, x2 = _x(1, 5), _x(1, 5, seed=2)
    for impl in IMPLS:
        k = empirical_ntk(model, x1, x2, implementation=impl, trace_axes=())
        full = torch.einsum("iap,jbp->ijab", brute_jacobian(model, x1), brute_jacobian(model, x2))
        assert rel(k, full) <= 1e-9


class WholeBatch(nn.Module):
    """The documented way to the NTK of a mixing model as one function of the batch: one sample holding it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, xb):
        return self.model(xb[0])[None]


def test_whole_batch_ntk_of_a_mixing_model_matches_brute_force():
    torch.manual_seed(0)
    model = Mix(MIXING["centre"]).double().eval()
    x = _x(4, 5)
    full = brute_ntk(model, x)  # (N, N, O, O), autograd through model(x) on the whole batch
    assert float(full.abs().max()) > 1e-2  # not the all-zero per-sample kernel
    for impl in IMPLS:
        k = empirical_ntk(WholeBatch(model), x[None], implementation=impl, trace_axes=())
        assert k.shape == (1, 1) + full.shape
        assert rel(k[0, 0], full) <= 1e-9, impl


# ---------------------------------------------------------------------------------------------------
# no false positives
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_models_that_treat_samples_independently_pass(name, dtype):
    """The agreement suite's models (BatchNorm in eval mode, a Transformer with dropout off, weight sharing,
    token ids, ntkit's twins) pass the check itself, in float64 and float32 (its round-off tolerance)."""
    model, x1, x2 = make(name)
    model = model.to(dtype)
    if x1.is_floating_point():
        x1, x2 = x1.to(dtype), x2.to(dtype)
    values = {k: v.detach() for k, v in model.named_parameters()}

    def fn(x):
        return torch.func.functional_call(model, values, (x,))

    with torch.no_grad():
        out0 = fn(x1[:1])
    check_independent(fn, x1, x2, out0)
    check_independent(fn, x1[:1], x2, out0)


def test_no_false_positives_on_special_forwards():
    torch.manual_seed(0)

    class NoGradPart(nn.Module):  # a per-sample torch.no_grad part
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x):
            with torch.no_grad():
                z = self.a(x)
            return self.b(torch.tanh(self.a(x)) + z)

    class OneSampleOnly(nn.Module):  # takes one sample only: it is evaluated one sample at a time anyway
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(5, 3)

        def forward(self, x):
            return self.a(x.view(1, -1))

    class ZeroHead(nn.Module):  # outputs exactly zero
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 2)
            nn.init.zeros_(self.b.weight)
            nn.init.zeros_(self.b.bias)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    bn = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    for model in (NoGradPart(), OneSampleOnly(), ZeroHead(), bn):
        model = model.double().eval()
        x = _x(4, 5)
        ref = empirical_ntk(model, x, implementation="jacobian", trace_axes=())
        k = empirical_ntk(model, x, implementation="structured", trace_axes=())
        torch.testing.assert_close(k, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    x = _x(1, 5).expand(3, 5).clone()  # equal samples
    model = NoGradPart().double()
    assert empirical_ntk(model, x).shape == (3, 3)
