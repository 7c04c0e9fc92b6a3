"""Concrete dropout, AWD-LSTM regularisers and their hyperparameter specs (bilevel.dropout, nets.awd_lstm)."""

import math

import pytest
import torch

from bilevel import Neumann, hypergradient
from bilevel.dropout import (
    activation_regularization,
    ar_coefficient,
    concrete_dropout,
    concrete_keep_mask,
    drop_connect,
    dropout_rate,
    embedding_dropout,
    temporal_activation_regularization,
    uniform_noise,
    variational_dropout,
)
from bilevel.hparams import HyperParameterSpace
from bilevel.nets.awd_lstm import AWD_HPARAMS, awd_lstm_forward, awd_lstm_loss, awd_noise, awd_sites, awd_space
from bilevel.nets.lstm import lstm_layer, lstm_lm_forward, lstm_lm_init

D = torch.float64


def test_mask_gradient_wrt_rate_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    u = uniform_noise((7, 5), g, dtype=D)
    p = torch.rand(5, generator=g, dtype=D) * 0.8 + 0.05  # one rate per unit
    x = torch.randn(7, 5, generator=g, dtype=D)
    f = lambda r: (concrete_dropout(x, r, u, temperature=0.3) ** 2).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (p.clone().requires_grad_(),))
    # and an explicit central difference on one coordinate against the closed form of d mask / dp
    t, i = 0.3, 2
    lp = math.log(p[i] / (1 - p[i]))
    lu = torch.log(u[:, i] / (1 - u[:, i]))
    s = torch.sigmoid((lp + lu) / t)
    keep = 1 - s
    dmask = (-s * (1 - s) / (t * p[i] * (1 - p[i]))) / (1 - p[i]) + keep / (1 - p[i]) ** 2
    r = p.clone().requires_grad_()
    concrete_keep_mask(r, u, t)[:, i].sum().backward()
    assert torch.allclose(r.grad[i], dmask.sum(), rtol=1e-10)
    assert float(r.grad[:i].abs().sum() + r.grad[i + 1 :].abs().sum()) == 0.0


def test_zero_rate_is_identity_and_zero_temperature_is_bernoulli():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 6, dtype=D)
    u = uniform_noise((4, 6), g, dtype=D)
    assert torch.equal(concrete_dropout(x, 0.0, u), x)
    p = 0.3
    hard = concrete_keep_mask(p, u, temperature=0.0)
    assert torch.equal(hard, (u <= 1 - p).to(D) / (1 - p))
    # small temperatures converge to the hard mask (away from the boundary u = 1 - p)
    soft = concrete_keep_mask(p, u, temperature=1e-4)
    assert torch.allclose(soft, hard, atol=1e-6)


def test_hard_mask_has_bernoulli_statistics_and_concrete_mask_mean():
    g = torch.Generator().manual_seed(3)
    u = uniform_noise((200_000,), g, dtype=D)
    p = 0.4
    hard = concrete_keep_mask(p, u, 0.0)
    assert abs(float((hard == 0).to(D).mean()) - p) < 5e-3  # drop fraction p (binomial sd 1.1e-3)
    assert abs(float(hard.mean()) - 1.0) < 1e-2  # inverted dropout keeps the expectation
    # the relaxed mask: E[1 - sigmoid((logit p + logit u)/t)] is 1 - p only as t -> 0; compare with quadrature
    t = 0.5
    grid = (torch.arange(1, 200_001, dtype=D) - 0.5) / 200_000
    quad = float(concrete_keep_mask(p, grid, t).mean())
    assert abs(float(concrete_keep_mask(p, u, t).mean()) - quad) < 5e-3


def test_variational_embedding_dropconnect_shapes_and_sharing():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 4, dtype=D)
    u = uniform_noise((3, 4), g, dtype=D)
    y = variational_dropout(x, 0.5, u, temperature=0.0)
    mask = y / x
    assert torch.allclose(mask, mask[0:1].expand_as(mask))  # same mask at every time step
    W = torch.randn(6, 4, dtype=D)
    ue = uniform_noise((6,), g, dtype=D)
    E = embedding_dropout(W, torch.full((6,), 0.5, dtype=D), ue, temperature=0.0)
    rows_zero = (E == 0).all(1)
    assert torch.equal(rows_zero, ue > 0.5)  # whole rows dropped
    uw = uniform_noise((6, 4), g, dtype=D)
    rate = torch.rand(6, 4, generator=g, dtype=D) * 0.9
    assert torch.allclose(drop_connect(W, rate, uw, 0.0), W * (uw <= 1 - rate) / (1 - rate), rtol=1e-14, atol=0)


def test_errors():
    u = uniform_noise((3, 4))
    with pytest.raises(ValueError, match="does not broadcast"):
        concrete_keep_mask(torch.full((5,), 0.1), u)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        concrete_keep_mask(torch.tensor(1.0), u)
    with pytest.raises(ValueError, match="temperature"):
        concrete_keep_mask(0.1, u, temperature=-1)
    with pytest.raises(ValueError, match="time, batch, units"):
        variational_dropout(torch.zeros(3, 4), 0.1, u)
    with pytest.raises(ValueError, match="noise must have shape"):
        variational_dropout(torch.zeros(2, 4, 3), 0.1, u)
    with pytest.raises(ValueError, match="vocab"):
        embedding_dropout(torch.zeros(5, 2), 0.1, u)
    with pytest.raises(ValueError, match="weight's shape"):
        drop_connect(torch.zeros(4, 3), 0.1, u)
    with pytest.raises(ValueError, match="2 time steps"):
        temporal_activation_regularization(torch.zeros(1, 2, 3), 1.0)
    with pytest.raises(ValueError, match="> 0"):
        ar_coefficient("alpha", 0.0)


def test_ar_tar_closed_form_and_rate_spec():
    h = torch.arange(12, dtype=D).reshape(3, 2, 2)
    assert float(activation_regularization(h, 2.0)) == pytest.approx(2 * float((h**2).mean()))
    assert float(temporal_activation_regularization(h, 1.0)) == pytest.approx(16.0)  # h_t - h_{t-1} = 4
    space = HyperParameterSpace([dropout_rate("d", 0.5, "element", ["a"]), ar_coefficient("alpha", 2.0)])
    raw = space.init({"a": torch.empty(3)})
    nat = space.natural(raw)
    assert torch.allclose(nat["d"]["a"], torch.full((3,), 0.5)) and float(nat["alpha"]) == pytest.approx(2.0)


def test_lstm_layer_matches_torch_lstm():
    g = torch.Generator().manual_seed(5)
    ref = torch.nn.LSTM(3, 4).to(D)
    x = torch.randn(6, 2, 3, generator=g, dtype=D)
    out, _ = ref(x)
    mine = lstm_layer(x, ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0 + ref.bias_hh_l0)
    assert torch.allclose(out, mine, atol=1e-12)


def _small():
    p = lstm_lm_init(30, 5, 4, 2, torch.Generator().manual_seed(6), dtype=D, init_range=0.5)
    tok = torch.randint(0, 30, (6, 3), generator=torch.Generator().manual_seed(7))
    tgt = torch.randint(0, 30, (18,), generator=torch.Generator().manual_seed(8))
    return p, tok, tgt


def test_awd_forward_reduces_to_plain_lstm():
    p, tok, tgt = _small()
    logits, _, _ = awd_lstm_forward(p, tok)
    assert torch.allclose(logits, lstm_lm_forward(p, tok))
    # rates at their lower clip 1e-4 and AR = TAR ~ 0: the training loss is the plain cross-entropy up to
    # the masks' deviation from 1 (O(1e-4) per unit)
    space, _ = awd_space(p, "element", rate=1e-4, alpha=1e-12, beta=1e-12)
    raw = space.from_natural(awd_sites(p), {**{n: 0.0 for n in AWD_HPARAMS[:5]}, "alpha": 1e-12, "beta": 1e-12})
    nat = space.natural(raw)
    loss = awd_lstm_loss(p, tok, tgt, nat, awd_noise(p, 3, torch.Generator().manual_seed(0)))
    assert float(loss) == pytest.approx(
        float(torch.nn.functional.cross_entropy(lstm_lm_forward(p, tok), tgt)), rel=1e-5
    )


def test_awd_space_sizes_and_hypergradient_finite_differences():
    p, tok, tgt = _small()
    s_space, s_raw = awd_space(p, "scalar")
    assert len(s_raw) == 7
    m_space, m_raw = awd_space(p, "element")
    # one rate per word, per input unit, per unit between layers, per output unit, per W_hh weight; AR, TAR
    assert sum(v.numel() for v in m_raw.values()) == 30 + 5 + 4 + 4 + 2 * 16 * 4 + 2
    noise = awd_noise(p, 3, torch.Generator().manual_seed(9))

    def inner(w, h):
        return awd_lstm_loss(w, tok, tgt, m_space.natural(h), noise, temperature=0.5)

    # the direct derivative of the training loss wrt the per-weight DropConnect rates, by finite differences
    h = {k: v.clone() for k, v in m_raw.items()}
    h["wdrop/W_hh1"].requires_grad_()
    inner(p, h).backward()
    k, idx, eps = "wdrop/W_hh1", (3, 2), 1e-6
    hp, hm = dict(h), dict(h)
    hp[k] = h[k].detach().clone()
    hm[k] = h[k].detach().clone()
    hp[k][idx] += eps
    hm[k][idx] -= eps
    fd = (float(inner(p, hp)) - float(inner(p, hm))) / (2 * eps)
    assert h[k].grad[idx].item() == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # the IFT hypergradient runs and has the space's keys/shapes
    outer = lambda w, h: awd_lstm_loss(w, tok, tgt)  # noqa: E731
    hg = hypergradient(outer, p, m_raw, inner=inner, solver=Neumann(2, alpha=0.1))
    assert {k: v.shape for k, v in hg.items()} == {k: v.shape for k, v in m_raw.items()}
    assert all(torch.isfinite(v).all() for v in hg.values())
