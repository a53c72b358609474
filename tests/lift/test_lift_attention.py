"""lift of sequence models: nn.MultiheadAttention, nn.TransformerEncoderLayer/Encoder (post-norm and norm_first),
nn.Embedding, inputs in the model's own layout; Monte Carlo against wide default-initialised torch instances of the
very models (many heads: the lift is the limit in which the heads grow too; see ntkit.lift_attention)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import rel_err
from torch import nn

from ntkit.layers.base import LayerError
from ntkit.lift import LiftError, lift
from ntkit.lift_attention import SequenceInputNet


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _mc(make, x, n_models, seed=0):
    """E[f(x)·f(x')]/O over fresh default-initialised models (eval mode, float64), and its standard error (one
    thread: these small products run faster without it)."""
    torch.manual_seed(seed)
    per = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for _ in range(n_models):
                f = make().eval()(x)
                per.append(f @ f.T / f.shape[1])
    finally:
        torch.set_num_threads(threads)
    per = torch.stack(per)
    return per.mean(0), per.std(0) / math.sqrt(n_models)


def _check(k, mc, se, what):
    err, tol = rel_err(mc, k), 0.03 + 3 * float(se.max() / k.abs().max())
    print(f"{what}: MC error {err:.4f} (tolerance {tol:.4f})")
    assert err < tol


class AttnModel(nn.Module):
    """Linear -> self-attention with a residual -> ReLU -> mean over tokens -> Linear (batch_first)."""

    def __init__(self, E=16, H=2, outs=4, batch_first=True, d_in=3, dtype=None):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(d_in, E, dtype=dtype)
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first, dtype=dtype)
        self.fc = nn.Linear(E, outs, dtype=dtype)

    def forward(self, x):
        h = self.inp(x)
        a = self.attn(h, h, h, need_weights=False)[0]
        h = torch.relu(a + h)
        return self.fc(h.mean(1 if self.batch_first else 0))


class EncoderModel(nn.Module):
    """Linear -> nn.TransformerEncoder (batch_first=False: (L, N, E) inputs) -> mean over tokens -> Linear."""

    def __init__(
        self, E=16, H=2, outs=4, norm_first=False, num_layers=1, final_norm=False, activation="relu", dtype=None
    ):
        super().__init__()
        self.inp = nn.Linear(3, E, dtype=dtype)
        layer = nn.TransformerEncoderLayer(
            E, H, E, dropout=0.1, activation=activation, norm_first=norm_first, dtype=dtype
        )
        norm = nn.LayerNorm(E, dtype=dtype) if final_norm else None
        self.enc = nn.TransformerEncoder(layer, num_layers, norm=norm, enable_nested_tensor=False)
        for lay in self.enc.layers:  # independent layers (TransformerEncoder clones its layer: identical weights)
            lay.self_attn._reset_parameters()
            lay.linear1.reset_parameters()
            lay.linear2.reset_parameters()
        self.fc = nn.Linear(E, outs, dtype=dtype)

    def forward(self, x):
        return self.fc(self.enc(self.inp(x)).mean(0))


def test_multihead_attention_model_matches_monte_carlo():
    x = _x(3, 4, 3) * 1.5  # (N, L, E_in)
    t = time.perf_counter()
    net = lift(AttnModel().eval())
    k = net.kernel_fn(x, None, "nngp")
    print(f"lift + kernel: {time.perf_counter() - t:.2f} s")
    assert isinstance(net, SequenceInputNet) and k.shape == (3, 3)
    mc, se = _mc(lambda: AttnModel(E=256, H=16, outs=1024, dtype=torch.float64), x, 150)
    _check(k, mc, se, "MultiheadAttention model")


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_matches_monte_carlo(norm_first):
    x = _x(4, 3, 3, seed=1) * 1.5  # (L, N, E_in): batch_first=False
    t = time.perf_counter()
    net = lift(EncoderModel(norm_first=norm_first, final_norm=norm_first).eval())
    k = net.kernel_fn(x, None, "nngp")
    print(f"lift + kernel: {time.perf_counter() - t:.2f} s")
    make = lambda: EncoderModel(
        E=256, H=16, outs=1024, norm_first=norm_first, final_norm=norm_first, dtype=torch.float64
    )
    mc, se = _mc(make, x, 150)
    _check(k, mc, se, f"TransformerEncoder(norm_first={norm_first})")


def test_two_layer_gelu_encoder_matches_monte_carlo():
    x = _x(3, 2, 3, seed=2) * 1.5
    net = lift(EncoderModel(num_layers=2, activation="gelu").eval())
    k = net.kernel_fn(x, None, "nngp")
    make = lambda: EncoderModel(E=256, H=16, outs=1024, num_layers=2, activation="gelu", dtype=torch.float64)
    mc, se = _mc(make, x, 100)
    _check(k, mc, se, "2-layer GELU TransformerEncoder")


class EmbedMLP(nn.Module):
    def __init__(self, V=7, L=4, E=8, width=16, outs=4, padding_idx=None, dtype=None):
        super().__init__()
        self.emb = nn.Embedding(V, E, padding_idx=padding_idx, dtype=dtype)
        self.fc1, self.fc2 = nn.Linear(L * E, width, dtype=dtype), nn.Linear(width, outs, dtype=dtype)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).flatten(1))))


def test_embedding_mlp_matches_monte_carlo_and_closed_form():
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 5, 6], [4, 4, 4, 4], [6, 5, 3, 0]])
    net = lift(EmbedMLP())
    k = net.kernel_fn(ids, None, "nngp")
    # closed form: Flatten averages δ(id, id') over positions; Dense(W²=1/3, hidden bias → 0); ReLU arc-cosine
    agree = (ids[:, None, :] == ids[None, :, :]).double().mean(-1)  # (N, N): shared tokens per position
    q = agree / 3
    rho = (q / torch.sqrt(torch.diagonal(q)[:, None] * torch.diagonal(q)[None, :])).clamp(-1, 1)
    th = torch.arccos(rho)
    relu = (
        torch.sqrt(torch.diagonal(q)[:, None] * torch.diagonal(q)[None, :])
        * (torch.sin(th) + (math.pi - th) * torch.cos(th))
        / (2 * math.pi)
    )
    assert k.dtype == torch.get_default_dtype()  # ids carry no dtype: the one-hot vectors are in the default one
    assert torch.allclose(k.double(), relu / 3, rtol=1e-5, atol=1e-7)
    mc, se = _mc(lambda: EmbedMLP(E=256, width=1024, outs=1024, dtype=torch.float64), ids, 150)
    _check(k, mc, se, "Embedding + MLP")


def test_embedding_padding_and_id_checks():
    net = lift(EmbedMLP(padding_idx=0))
    ids = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4]])
    k = net.kernel_fn(ids, None, "nngp")
    assert float(k[0, 0]) == 0.0 and float(k[0, 1]) == 0.0  # the padding token embeds to zero
    with pytest.raises(LayerError, match="integer token ids"):
        net.kernel_fn(ids.double())
    with pytest.raises(LayerError, match=r"in \[0, 7\)"):
        net.kernel_fn(ids + 5)


def test_layouts_and_sequence_outputs():
    """batch_first=False on (L, N, E) gives the kernel of batch_first=True on (N, L, E); a per-token output has an
    (N, N, L, L) kernel."""
    x = _x(2, 3, 3)
    a = lift(AttnModel().eval()).kernel_fn(x, None, "nngp")
    b = lift(AttnModel(batch_first=False).eval()).kernel_fn(x.transpose(0, 1), None, "nngp")
    assert torch.equal(a, b)

    class PerToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(3, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(self.attn(h, h, h)[0])

    k = lift(PerToken().eval()).kernel_fn(x, None, "nngp")
    assert k.shape == (2, 2, 3, 3)
    with pytest.raises(LayerError, match=r"\(N, L, E\)"):
        lift(PerToken().eval()).kernel_fn(x[:, 0])


def test_token_selection_is_an_index_of_the_sequence_kernel():
    """x[:, 0] (a CLS token) and x[:, 1:] on (N, L, E): the entries of the per-token kernel."""

    class Tokens(nn.Module):
        def __init__(self, pick):
            super().__init__()
            self.pick = pick
            self.inp, self.attn = nn.Linear(3, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            h = self.inp(x)
            h = self.attn(h, h, h)[0]
            return self.out(h[:, 0] if self.pick == "cls" else (h[:, 1:] if self.pick == "tail" else h))

    x = _x(2, 3, 3)
    full = lift(Tokens("all").eval()).kernel_fn(x, None, "nngp")
    cls = lift(Tokens("cls").eval()).kernel_fn(x, None, "nngp")
    tail = lift(Tokens("tail").eval()).kernel_fn(x, None, "nngp")
    assert cls.shape == (2, 2) and torch.allclose(cls, full[:, :, 0, 0], rtol=1e-12, atol=1e-15)
    assert tail.shape == (2, 2, 2, 2) and torch.allclose(tail, full[:, :, 1:, 1:], rtol=1e-12, atol=1e-15)


def test_ntk_raises_and_explain():
    net = lift(AttnModel().eval())
    assert "GlobalSelfAttention" in net.lift_explanation and "heads" in net.lift_explanation
    with pytest.raises(LayerError, match="NTK of softmax attention"):
        net.kernel_fn(_x(2, 3, 3), None, "ntk")


class _Masked(AttnModel):
    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.attn(h, h, h, attn_mask=torch.zeros(3, 3, dtype=torch.bool))[0].mean(1))


class _Weights(AttnModel):
    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.attn(h, h, h)[1].mean(1))


class _Cross(AttnModel):
    def forward(self, x):
        h = self.inp(x)
        return self.fc(self.attn(h, torch.relu(h), torch.relu(h))[0].mean(1))


class _FeatureMean(AttnModel):
    def forward(self, x):
        h = self.inp(x)
        return self.attn(h, h, h)[0].mean(2)


class _RawEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, 8, batch_first=True)

    def forward(self, x):
        return self.enc(x).mean(1)


class _Cloned(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 8), 2, enable_nested_tensor=False)

    def forward(self, x):
        return self.enc(self.inp(x)).mean(0)


@pytest.mark.parametrize(
    "model, match",
    [
        (_Masked(), "attn_mask"),
        (_Weights(), "attention weights"),
        (_Cross(), "self-attention"),
        (_FeatureMean(), "mean over the tokens"),
        (_RawEncoder().eval(), "fixed width d_model"),
        (AttnModel(H=2).train(), None),  # MHA dropout 0: train mode is fine
        (EncoderModel().train(), "dropout"),
        (_Cloned().eval(), "identical parameters"),
    ],
)
def test_refusals_name_the_problem(model, match):
    if match is None:
        lift(model)
        return
    with pytest.raises(LiftError, match=match):
        lift(model)


def _layers(layer):
    yield layer
    for sub in layer.sublayers():
        yield from _layers(sub)


def test_init_weights_reads_the_projections():
    """init="weights": W_std² = Var(W)·E for each of the q/k/v rows of in_proj and for out_proj; a value bias is
    folded into b_std (softmax rows sum to 1); query/key biases are refused."""
    model = AttnModel(E=32, H=4).eval()
    E = 32
    with torch.no_grad():
        w = model.attn.in_proj_weight.detach()
        for i, std in enumerate((0.1, 0.2, 0.3)):
            torch.nn.init.normal_(w[i * E : (i + 1) * E], std=std)
        model.attn.in_proj_bias[2 * E :].normal_(std=0.05)
    att = next(la for la in _layers(lift(model, init="weights")) if type(la).__name__ == "GlobalSelfAttention")
    for name, rows in (("W_query_std", w[:E]), ("W_key_std", w[E : 2 * E]), ("W_value_std", w[2 * E :])):
        assert getattr(att, name) == pytest.approx(math.sqrt(float(rows.double().var(correction=0)) * E), rel=1e-12)
    bv = float(model.attn.in_proj_bias[2 * E :].detach().double().var(correction=0))
    assert att.b_std == pytest.approx(att.W_out_std * math.sqrt(bv), rel=1e-12)
    default = next(la for la in _layers(lift(model)) if type(la).__name__ == "GlobalSelfAttention")
    assert default.W_query_std == pytest.approx(math.sqrt(0.5)) and default.b_std is None
    with torch.no_grad():
        model.attn.in_proj_bias[:E].fill_(0.1)
    with pytest.raises(LiftError, match="query/key biases"):
        lift(model, init="weights")
