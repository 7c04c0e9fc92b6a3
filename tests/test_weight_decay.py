"""Weight decay as a hyperparameter (bilevel.weight_decay) and solvers chosen by name."""

import math

import pytest
import torch
import torch.nn.functional as F

import bilevel as B
from bilevel import weight_decay as WD
from bilevel.solvers import check_size, make_solver


def test_make_solver_choices_and_errors():
    assert make_solver("neumann", 7, alpha=0.3) == B.Neumann(7, alpha=0.3)
    assert make_solver("cg", 4, damping=0.1) == B.ConjugateGradient(4, damping=0.1)
    assert make_solver("identity", 3) == B.Identity()
    assert make_solver("exact", 0, damping=0.5) == B.Exact(0.5)
    with pytest.raises(ValueError, match="unknown solver 'lu'"):
        make_solver("lu", 3)
    with pytest.raises(ValueError, match="solver steps must be >= 0"):
        make_solver("cg", -1)


def test_exact_size_check_refuses_before_any_work():
    check_size(B.Exact(max_size=10), 10)
    check_size(B.Neumann(3), 10**9)
    with pytest.raises(ValueError, match="refuses 11 weights"):
        check_size(B.Exact(max_size=10), 11)
    assert make_solver("exact", 0, max_size=20) == B.Exact(max_size=20)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_tune_weight_decay_fixed_decay_is_sgd_with_l2(optimizer):
    """tune=False must be plain SGD / Adam on CE + 1/2 lambda ||w||^2
    (reference: torch.optim's coupled weight_decay)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    p0 = {"W": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    fwd = lambda p, x: x @ p["W"].T + p["b"]  # noqa: E731
    tuner = WD.tune_weight_decay(
        fwd,
        p0,
        (X, y),
        (X, y),
        per_weight=True,
        solver=B.Identity(),
        steps=15,
        lr=0.2,
        optimizer=optimizer,
        init_decay=0.05,
        tune=False,
    )
    ref = {k: v.clone().requires_grad_() for k, v in p0.items()}
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(ref.values(), lr=0.2, weight_decay=0.05)
    for _ in range(15):
        opt.zero_grad()
        F.cross_entropy(fwd(ref, X), y).backward()
        opt.step()
    for k in p0:
        torch.testing.assert_close(tuner.params[k][0], ref[k].detach())
    s = WD.decay_summary(tuner)
    assert s["count"] == 15 and math.isclose(s["median"], 0.05, rel_tol=1e-9)


def test_tune_weight_decay_lowers_validation_loss():
    g = torch.Generator().manual_seed(1)
    w_true = torch.randn(5, 2, generator=g, dtype=torch.float64)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = (X @ w_true).argmax(1)
    fwd = lambda p, x: x @ p["W"].T + p["b"]  # noqa: E731
    p0 = {"W": torch.zeros(2, 5, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    tr, va = (X[:20], y[:20]), (X[20:], y[20:])
    kw = dict(per_weight=False, solver=B.ConjugateGradient(10), steps=40, interval=5, lr=0.5, init_decay=1.0)
    fixed = WD.tune_weight_decay(fwd, p0, tr, va, tune=False, **kw)
    tuned = WD.tune_weight_decay(fwd, p0, tr, va, hyper_lr=0.3, **kw)
    loss = lambda t: float(F.cross_entropy(fwd({k: v[0] for k, v in t.params.items()}, va[0]), va[1]))  # noqa: E731
    assert WD.decay_summary(tuned)["median"] < 0.5  # the decay of 1 over-regularises: it is lowered
    assert loss(tuned) < loss(fixed) - 0.05


def test_signed_decays_are_natural_values_of_either_sign():
    """signed=True: the raw value is the decay itself, clipped to [-max, max]; a fixed negative decay is
    plain gradient descent on CE + 1/2 lambda ||w||^2 with lambda < 0 (written out by hand)."""
    space = WD.decay_space(per_weight=True, max_decay=4.0, signed=True)
    p = {"W": torch.zeros(2, 3, dtype=torch.float64)}
    raw = space.from_natural(p, {WD.DECAY: -0.5})
    torch.testing.assert_close(raw[f"{WD.DECAY}/W"], torch.full((2, 3), -0.5, dtype=torch.float64))
    nat = space.natural({k: torch.full_like(v, -9.0) for k, v in raw.items()})[WD.DECAY]["W"]
    assert float(nat.min()) == -4.0  # clipped
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (20,), generator=g)
    fwd = lambda p, x: x @ p["W"].T  # noqa: E731
    p0 = {"W": 0.1 * torch.randn(2, 3, generator=g, dtype=torch.float64)}
    tuner = WD.tune_weight_decay(
        fwd,
        p0,
        (X, y),
        (X, y),
        per_weight=True,
        solver=B.Identity(),
        steps=10,
        lr=0.1,
        init_decay=-0.05,
        signed=True,
        tune=False,
    )
    w = p0["W"].clone()
    for _ in range(10):
        w_ = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(F.cross_entropy(fwd({"W": w_}, X), y), w_)
        w = w - 0.1 * (gw - 0.05 * w)
    torch.testing.assert_close(tuner.params["W"][0], w)
