"""bilevel.online (Lorraine et al. Alg. 1 on one model with per-step contexts) and the Fig. 8 overfit check."""

import argparse
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from bilevel.hparams import HyperParameterSpace, per_weight_decay
from bilevel.nets.lstm import lstm_lm_forward, lstm_lm_init
from bilevel.online import Algorithm1, clip_grad_norm, loss_step_map
from bilevel.solvers import Identity
from bilevel.updates import SGD, Adam

D = torch.float64


def test_clip_grad_norm_matches_torch():
    g = [torch.randn(3, 4, dtype=D), torch.randn(5, dtype=D)]
    ps = [torch.nn.Parameter(x.clone()) for x in g]
    for p, x in zip(ps, g):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(ps, 0.5)
    mine = clip_grad_norm(g, 0.5)
    assert all(torch.allclose(p.grad, m) for p, m in zip(ps, mine))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(g, 0.0)


def test_algorithm1_unroll_equals_autograd_through_steps():
    """The unrolled hypergradient against differentiating three explicit SGD steps by hand."""
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=D), torch.randn(20, dtype=D)
    Xv, yv = torch.randn(10, 3, dtype=D), torch.randn(10, dtype=D)
    loss = lambda p, h, ctx: (((X[ctx] @ p["w"] - y[ctx]) ** 2).mean() + (h["lwd"].exp() * p["w"] ** 2).sum())  # noqa: E731
    outer = lambda p, h: ((Xv @ p["w"] - yv) ** 2).mean()  # noqa: E731
    rule = SGD(lr=0.1)
    w0, h0 = {"w": torch.randn(3, dtype=D)}, {"lwd": torch.full((3,), -1.0, dtype=D)}
    alg = Algorithm1(loss_step_map(loss, rule), w0, h0, rule, mode="unroll", lookback=3, hyper_lr=0.1)
    ctxs = [torch.arange(0, 10), torch.arange(5, 15), torch.arange(10, 20)]
    for c in ctxs:
        alg.weight_step(c)
    hg = alg.hyper_step(outer)
    h = h0["lwd"].clone().requires_grad_()
    w = w0["w"].clone().requires_grad_()
    for c in ctxs:
        g, = torch.autograd.grad(loss({"w": w}, {"lwd": h}, c), w, create_graph=True)
        w = w - 0.1 * g
    ref, = torch.autograd.grad(outer({"w": w}, None), h)
    assert torch.allclose(hg["lwd"], ref, rtol=1e-10)
    assert not torch.equal(alg.raw["lwd"].detach(), h0["lwd"])  # Adam moved the hyperparameters


def _tiny_lstm_problem():
    g = torch.Generator().manual_seed(0)
    V = 12
    p = lstm_lm_init(V, 4, 5, 1, g, D)
    x, xv = torch.randint(0, V, (6, 3), generator=g), torch.randint(0, V, (6, 3), generator=g)
    y, yv = torch.randint(0, V, (18,), generator=g), torch.randint(0, V, (18,), generator=g)
    space = HyperParameterSpace([per_weight_decay()])
    raw = space.from_natural(p, {"weight_decay": 1e-2})
    train = lambda q, h, ctx: F.cross_entropy(lstm_lm_forward(q, x), y)  # noqa: E731
    outer = lambda q, h: F.cross_entropy(lstm_lm_forward(q, xv), yv)  # noqa: E731
    return p, raw, space, train, outer


def test_rule_weight_decay_step_matches_torch_adam():
    """``rule_hparams``: per-weight decays reach the rule as torch.optim.Adam's coupled L2."""
    p, raw, space, train, _ = _tiny_lstm_problem()
    nat = space.natural(raw)["weight_decay"]
    step = loss_step_map(train, Adam(lr=0.05), space=space, rule_hparams=("weight_decay",))
    w = {k: v.clone().requires_grad_() for k, v in p.items()}
    u, _, _ = step(w, raw, None, Adam(lr=0.05).init_state(p), False)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in p.items()}
    grads = torch.autograd.grad(train(ref, None, None), list(ref.values()))
    opt = torch.optim.Adam(list(ref.values()), lr=0.05)
    for (k, r), gk in zip(ref.items(), grads):
        r.grad = gk + nat[k] * r.detach()
    opt.step()
    for k in p:
        assert torch.allclose(p[k] - u[k], ref[k].detach(), atol=1e-12)
    with pytest.raises(ValueError, match="no hyperparameters"):
        loss_step_map(train, SGD(), space=space, rule_hparams=("beta1",))
    with pytest.raises(ValueError, match="space"):
        loss_step_map(train, SGD(), rule_hparams=("weight_decay",))


def test_per_weight_decay_hypergradient_matches_finite_differences():
    """Sign and scale of the Fig. 8 hypergradient: two unrolled Adam steps with per-weight log10 decays
    against central differences of the validation loss along a random raw direction; the IFT identity
    estimate (what the overfit default uses) agrees with it in sign."""
    p, raw, space, train, outer = _tiny_lstm_problem()
    rule = Adam(lr=0.05, eps=1e-3)  # torch's eps=1e-8 makes u(lambda) so curved that differences need eps < 1e-6
    step = loss_step_map(train, rule, space=space, rule_hparams=("weight_decay",))
    alg = Algorithm1(step, p, raw, rule, mode="unroll", lookback=2)
    alg.weight_step(None)
    alg.weight_step(None)
    hg = alg.hypergradient(outer)

    def val_after_two_steps(r):
        w, s = dict(p), rule.init_state(p)
        for _ in range(2):
            wl = {k: v.detach().requires_grad_() for k, v in w.items()}
            u, s, _ = step(wl, r, None, s, False)
            w = {k: (wl[k] - u[k]).detach() for k in wl}
        return float(outer(w, None))

    g = torch.Generator().manual_seed(1)
    d = {k: torch.randn(v.shape, generator=g, dtype=D) for k, v in raw.items()}
    eps = 1e-4
    fd = (val_after_two_steps({k: raw[k] + eps * d[k] for k in raw})
          - val_after_two_steps({k: raw[k] - eps * d[k] for k in raw})) / (2 * eps)
    directional = sum(float((hg[k] * d[k]).sum()) for k in raw)
    assert fd != 0.0
    assert directional == pytest.approx(fd, rel=1e-6)
    ift = Algorithm1(step, p, raw, rule, mode="ift", solver=Identity())
    ift.weight_step(None)
    ift.weight_step(None)
    hi = ift.hypergradient(outer)
    dot = sum(float((hi[k] * hg[k]).sum()) for k in raw)
    assert dot > 0


def test_algorithm1_errors():
    p, raw, _, train, outer = _tiny_lstm_problem()
    step = loss_step_map(train, SGD(lr=0.1))
    with pytest.raises(ValueError, match="mode"):
        Algorithm1(step, p, raw, SGD(), mode="neumann")
    with pytest.raises(ValueError, match="solver"):
        Algorithm1(step, p, raw, SGD(), mode="unroll", solver=Identity())
    with pytest.raises(ValueError, match="tuned"):
        Algorithm1(step, p, raw, SGD(), tuned=("dropout",))
    with pytest.raises(ValueError, match="weight step"):
        Algorithm1(step, p, raw, SGD()).hypergradient(outer)
    assert Algorithm1(step, p, raw, SGD(), mode="none").hyper_step(outer) is None


def test_overfit_lowers_validation_loss():
    """A tiny Fig. 8: per-weight decays tuned online drive the validation loss far below both its start
    and the same training without hyperparameter steps (which over-fits the training sequences)."""
    from bilevel.experiments.lstm import run_overfit

    g = torch.Generator().manual_seed(0)
    V = 60
    zipf = 1.0 / torch.arange(1, V + 1, dtype=D)  # a skewed unigram distribution, as words are
    corpus = SimpleNamespace(ntokens=V, train=torch.multinomial(zipf, 400, True, generator=g),
                             valid=torch.multinomial(zipf, 400, True, generator=g))
    a = argparse.Namespace(dtype="float64", device="cpu", seed=0, layers=1, bptt=9, overfit_sequences=10,
                           overfit_size=16, overfit_steps=120, overfit_lr=0.02, overfit_wd=1e-4,
                           overfit_max_decay=10.0, overfit_hyper_lr=0.1, overfit_interval=1, overfit_terms=0,
                           overfit_record_every=20, overfit_signed=False)
    r = run_overfit(a, corpus)
    assert r["diverged_at"] is None and r["none_diverged_at"] is None
    assert r["n_hyperparameters"] == r["n_weights"]
    assert r["none_final_train_loss"] < 0.5 * r["initial_val_loss"]  # without HO it memorises training ...
    assert r["none_final_val_loss"] > r["initial_val_loss"]  # ... and validation gets worse
    assert r["final_val_loss"] < 0.85 * r["initial_val_loss"]
    assert r["final_val_loss"] < r["none_final_val_loss"] - 1.0
    assert r["weight_decay_mean"][-1] > 10 * a.overfit_wd
