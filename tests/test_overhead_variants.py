"""Every variant of ``benchmarks/overhead.py`` computes what it claims (issue 25).

On a ridge regression trained by SGD with momentum (float64) the IFT hypergradient of the update map
``u(theta, w) = lr (mu b + g(w) + wd w)`` (``b`` the momentum buffer, constant; ``theta`` the raw
``log10 lr``, ``logit mu``, ``log10 wd``) has a closed form: ``J = du/dw = lr (H + wd I)`` and
``B = du/dtheta`` are small dense matrices, written out here without the library, so

* the exact hypergradient is ``-v^T J^-1 B`` (``v = dL_V/dw``; ``L_V`` does not depend on ``theta``);
* the identity solver (``solver=identity``) is the first-order ``-v^T B``;
* the default solver with look-back ``i`` (``AutoNeumann(i)``) is the truncated series
  ``-alpha v^T sum_{j=0..i} (I - alpha J)^j B``, with ``alpha = min(1, 1 / lambda_max(J))``;
* CG with as many iterations as weights is exact;
* ``T`` (``interval``) only decides when the steps happen, the hyper learning rate only how far one
  Adam step moves each raw value, and the validation batch which rows a step sees.

No timing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overhead as O  # noqa: E402

D, N, M = 4, 32, 16  # weights, training rows, validation rows
START = dict(momentum=0.5, weight_decay=1e-2)


def ridge(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([1.0, 0.7, 0.4, 0.2], dtype=torch.float64)  # distinct curvatures
    X = torch.randn(N + M, D, generator=g, dtype=torch.float64) * scales
    w_true = torch.randn(D, 1, generator=g, dtype=torch.float64)
    y = X @ w_true + 0.3 * torch.randn(N + M, 1, generator=g, dtype=torch.float64)
    return (X[:N], y[:N]), (X[N:], y[N:])


def tuner_for(variant: O.Variant, lr: float, seed: int = 0) -> bilevel.Tuner:
    torch.manual_seed(seed)
    model = nn.Linear(D, 1, bias=False).double()
    opt = bilevel.optim.SGD(lr=lr, **START)
    return bilevel.Tuner(model, loss_fn=F.mse_loss, optimizer=opt, **variant.tuner_kwargs())


def dense(tuner: bilevel.Tuner, train, val):
    """``(v, J, B)`` at the tuner's weights, state and raw hyperparameters, from the formulas (no library)."""
    loop = tuner.loop
    w0 = loop.params["weight"].detach().reshape(-1)
    buf = loop.state["momentum_buffer"]["weight"].detach().reshape(-1)
    assert int(loop.state["step"]) > 0  # the buffer is then mu * b + d (torch's SGD after its first step)
    theta0 = torch.stack([loop.raw[k].detach() for k in ("lr", "momentum", "weight_decay")])
    (X, y), (Xv, yv) = train, val

    def u(w, theta):
        lr, mu, wd = 10 ** theta[0], torch.sigmoid(theta[1]), 10 ** theta[2]
        grad = 2 * X.T @ (X @ w - y.reshape(-1)) / len(X)  # d/dw mean((Xw - y)^2)
        return lr * (mu * buf + grad + wd * w)

    J = torch.autograd.functional.jacobian(lambda w: u(w, theta0), w0)
    B = torch.autograd.functional.jacobian(lambda th: u(w0, th), theta0)
    v = 2 * Xv.T @ (Xv @ w0 - yv.reshape(-1)) / len(Xv)
    return v, J, B


def as_vector(hg):
    return torch.stack([hg[k] for k in ("lr", "momentum", "weight_decay")])


def truncated(v, J, B, steps: int, alpha: float):
    term, total = v.clone(), v.clone()
    for _ in range(steps):
        term = term - alpha * (term @ J)
        total = total + term
    return -(alpha * total) @ B


def trained(variant: O.Variant, lr: float, train, val, steps: int = 3) -> bilevel.Tuner:
    """The variant's tuner after ``steps`` weight steps (fewer than T: no hyperparameter step yet)."""
    tuner = tuner_for(variant, lr)
    assert steps < variant.interval
    tuner.fit([train], [val], steps=steps)
    return tuner


def test_variant_keywords_are_the_front_doors():
    def solver(v):
        how = v.tuner_kwargs()["strategy"]
        return None if isinstance(how, str) else how.solver

    assert O.Variant().tuner_kwargs()["strategy"] == "ift"  # the Tuner's own default solver, AutoNeumann(lookback)
    assert solver(O.Variant(solver="identity")) == bilevel.Identity()
    assert solver(O.Variant(solver="cg", lookback=7)) == bilevel.ConjugateGradient(7)
    assert solver(O.Variant(solver="neumann-alpha1", lookback=2)) == bilevel.Neumann(2, alpha=1.0, divergence="ignore")
    kw = O.parse_variant("T=40,i=2,hlr=0.2,vb=50").tuner_kwargs()
    assert (kw["schedule"], kw["lookback"], kw["hyper_lr"], kw["strategy"]) == (40, 2, 0.2, "ift")
    adaptive = O.parse_variant("T=10,adaptive=80").tuner_kwargs()["schedule"]
    assert adaptive == bilevel.loop.Adaptive(10, max_interval=80)
    assert O.parse_variant("mode=none").tuner_kwargs()["tune"] is None
    assert O.parse_variant("vb=50").val_batch == 50
    grid = {v.name: v for v in O.frontier()}
    assert grid["T=40 hlr x T/10"].hyper_lr == pytest.approx(0.2)
    assert grid["T=40 hlr x sqrt"].hyper_lr == pytest.approx(0.1)
    assert grid["identity"].solver == "identity"
    assert O.Variant(interval=20, lookback=2, hyper_lr=0.1).cli_flags() == "--interval 20 --lookback 2 --hyper-lr 0.1"
    assert O.Variant(solver="identity").cli_flags().startswith("--interval 10 --lookback 0")
    with pytest.raises(ValueError):
        O.parse_variant("T=10,foo=1")


def test_identity_is_the_first_order_formula():
    train, val = ridge()
    tuner = trained(O.Variant(solver="identity", lookback=0), 0.05, train, val)
    v, J, B = dense(tuner, train, val)
    got = as_vector(tuner.loop.hypergradient(train, val))
    torch.testing.assert_close(got, -v @ B, rtol=1e-10, atol=1e-12)
    exact = -torch.linalg.solve(J.T, v) @ B
    assert not torch.allclose(got, exact, rtol=1e-2)  # the approximation is not the exact answer here


@pytest.mark.parametrize("lookback", [0, 1, 2, 5])
@pytest.mark.parametrize("lr", [0.05, 0.6])  # lambda_max(J) below 1 (alpha = 1) and above 1 (alpha < 1)
def test_neumann_lookback_is_the_truncated_series(lookback, lr):
    train, val = ridge()
    tuner = trained(O.Variant(lookback=lookback), lr, train, val)
    v, J, B = dense(tuner, train, val)
    got = as_vector(tuner.loop.hypergradient(train, val))
    alpha = tuner.loop.solver.alpha
    lam = float(torch.linalg.eigvalsh((J + J.T) / 2).max())
    torch.testing.assert_close(J, J.T, rtol=1e-12, atol=1e-14)  # SGD's update map: lr (H + wd I)
    assert alpha == pytest.approx(min(1.0, 1.0 / lam), rel=1e-3)  # AutoNeumann's power iteration, capped at 1
    assert (lam > 1) == (lr == 0.6)
    torch.testing.assert_close(got, truncated(v, J, B, lookback, alpha), rtol=1e-9, atol=1e-12)
    if lookback == 0 and alpha == 1.0:  # one term: the identity solver's answer
        torch.testing.assert_close(got, -v @ B, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lookback", [1, 3])
def test_neumann_with_alpha_one_is_the_series_without_power_iteration(lookback, monkeypatch):
    train, val = ridge()
    tuner = trained(O.Variant(solver="neumann-alpha1", lookback=lookback), 0.3, train, val)
    v, J, B = dense(tuner, train, val)
    module = sys.modules["bilevel.hypergradient"]
    linearise, products = module.linearise, []

    def counting(*a, **k):  # count the products the solver asks for
        op, p, h = linearise(*a, **k)
        rmatvec = op.rmatvec
        op.rmatvec = lambda x: products.append(1) or rmatvec(x)
        return op, p, h

    monkeypatch.setattr(module, "linearise", counting)
    got = as_vector(tuner.loop.hypergradient(train, val))
    assert len(products) == lookback  # no power iteration: i products, i + 1 terms
    torch.testing.assert_close(got, truncated(v, J, B, lookback, 1.0), rtol=1e-9, atol=1e-12)


def test_the_default_solver_pays_a_power_iteration_on_its_first_call_only(monkeypatch):
    train, val = ridge()
    tuner = trained(O.Variant(lookback=5), 0.05, train, val)
    module = sys.modules["bilevel.hypergradient"]
    linearise, products = module.linearise, []

    def counting(*a, **k):
        op, p, h = linearise(*a, **k)
        rmatvec = op.rmatvec
        op.rmatvec = lambda x: products.append(1) or rmatvec(x)
        return op, p, h

    monkeypatch.setattr(module, "linearise", counting)
    tuner.loop.hypergradient(train, val)
    first = len(products)
    tuner.loop.hypergradient(train, val)
    assert (first, len(products) - first) == (tuner.loop.solver.iters + 5, 5)  # 20 + i, then i


def test_neumann_tends_to_the_exact_hypergradient_and_cg_reaches_it():
    train, val = ridge()
    exact = None
    for variant in (O.Variant(lookback=400), O.Variant(solver="cg", lookback=D)):
        tuner = trained(variant, 0.6, train, val)
        v, J, B = dense(tuner, train, val)
        exact = -torch.linalg.solve(J.T, v) @ B
        got = as_vector(tuner.loop.hypergradient(train, val))
        torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-10)
    # and the shorter series are further from it the fewer terms they have
    tuner = trained(O.Variant(lookback=1), 0.6, train, val)
    v, J, B = dense(tuner, train, val)
    alpha = tuner.loop.solver.alpha or 1.0
    errors = [float((truncated(v, J, B, i, alpha) - exact).norm()) for i in (0, 1, 2, 5, 20)]
    assert errors == sorted(errors, reverse=True)


@pytest.mark.parametrize("T,hyper_lr", [(3, 0.05), (6, 0.1)])
def test_interval_only_decides_when_the_steps_happen(T, hyper_lr):
    train, val = ridge()
    batches = [(train[0][i::4], train[1][i::4]) for i in range(4)]  # four minibatches, in order
    vals = [(val[0][i::2], val[1][i::2]) for i in range(2)]
    variant = O.Variant(interval=T, hyper_lr=hyper_lr)
    tuner = tuner_for(variant, 0.05)
    calls = []
    hyper_step = tuner.loop.hyper_step

    def spy(train_batch, val_batch):
        loop = tuner.loop
        calls.append((loop.t, train_batch, val_batch, {k: r.detach().clone() for k, r in loop.raw.items()}))
        return hyper_step(train_batch, val_batch)

    tuner.loop.hyper_step = spy
    tuner.fit(batches, vals, steps=4 * T)
    assert [c[0] for c in calls] == [T, 2 * T, 3 * T, 4 * T]
    for k, (t, train_batch, val_batch, _) in enumerate(calls):
        assert train_batch[0] is batches[(t - 1) % 4][0]  # the last weight step's batch
        assert val_batch[0] is vals[k % 2][0]  # the validation batches cycle, one per hyperparameter step
    # the same run, stepped by hand with the same schedule
    manual = tuner_for(O.Variant(interval=10**9, hyper_lr=hyper_lr), 0.05)
    k = 0
    for t in range(1, 4 * T + 1):
        manual.loop.step(batches[(t - 1) % 4])
        if t % T == 0:
            manual.loop.hyper_step(batches[(t - 1) % 4], vals[k % 2])
            k += 1
    for a, b in ((tuner.loop.params, manual.loop.params), (tuner.loop.raw, manual.loop.raw)):
        for key in a:
            assert torch.equal(a[key].detach(), b[key].detach()), key
    # one Adam step moves every raw value by hyper_lr (its first step: lr * g / |g|): the hyper learning rate
    # caps how far the hyperparameters travel per hyperparameter step, whatever T
    first, second = calls[0][3], calls[1][3]
    for key in first:
        step = abs(float(second[key] - first[key]))  # lr * |g| / (|g| + 1e-8): hyper_lr up to Adam's eps
        assert hyper_lr * (1 - 1e-4) < step <= hyper_lr


def test_the_hyperparameter_step_follows_the_truncated_series():
    """The step the run takes at t = T is Adam's first step along the dense truncated-series hypergradient."""
    train, val = ridge()
    variant = O.Variant(interval=4, lookback=2, hyper_lr=0.05)
    tuner = tuner_for(variant, 0.05)
    tuner.fit([train], [val], steps=3)
    before = as_vector({k: r.detach().clone() for k, r in tuner.loop.raw.items()})
    tuner.fit([train], [val], steps=1)  # step 4: a weight step, then the hyperparameter step at its weights
    assert tuner.loop.t == 4
    after = as_vector({k: r.detach() for k, r in tuner.loop.raw.items()})
    # recompute the hypergradient at the weights of step 4 (the dense formula of that state)
    probe = tuner_for(O.Variant(interval=10**9, lookback=2), 0.05)
    probe.fit([train], [val], steps=4)
    v, J, B = dense(probe, train, val)
    want = truncated(v, J, B, 2, 1.0)
    assert tuner.loop.solver.alpha == 1.0
    torch.testing.assert_close(after - before, -0.05 * torch.sign(want), rtol=0, atol=1e-6)


def test_a_smaller_validation_batch_is_what_a_step_sees():
    train, val = ridge()
    variant = O.Variant(interval=2, val_batch=5)
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(*val), batch_size=variant.val_batch)
    tuner = tuner_for(variant, 0.05)
    seen, got = [], []
    hypergradient = tuner.loop.hypergradient

    def spy(train_batch, val_batch):
        seen.append(val_batch)
        out = hypergradient(train_batch, val_batch)  # (changes nothing the dense formula reads)
        v, J, B = dense(tuner, train_batch, val_batch)
        got.append((as_vector(out), truncated(v, J, B, variant.lookback, tuner.loop.solver.alpha)))
        return out

    tuner.loop.hypergradient = spy
    tuner.fit([train], loader, steps=8)
    sizes = [len(b[0]) for b in seen]
    assert sizes == [5, 5, 5, 1]  # 16 rows in batches of 5, in order
    assert torch.equal(seen[0][0], val[0][:5]) and torch.equal(seen[1][0], val[0][5:10])
    for a, b in got:
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mode_none_takes_no_hyperparameter_step():
    train, val = ridge()
    for variant in O.none_variants():
        torch.manual_seed(0)
        model = nn.Linear(D, 1, bias=False).double()
        if variant.optimizer == "torch":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, **START)
        else:
            opt = bilevel.optim.SGD(lr=0.05, **START)
        tuner = bilevel.Tuner(model, loss_fn=F.mse_loss, optimizer=opt, **variant.tuner_kwargs())
        tuner.fit([train], [val], steps=25)
        assert tuner.loop.hyper_opt is None and tuner.loop.t == 25
