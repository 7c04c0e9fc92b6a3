"""The online loop (Algorithm 1) on populations: vectorised = alone, hypergradients, divergence, resume."""

import math

import pytest
import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel import updates
from bilevel.strategies import SharedGradient
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

D = torch.float64
g0 = torch.Generator().manual_seed(0)
X = torch.randn(64, 4, generator=g0, dtype=D)
W = torch.randn(4, 1, generator=g0, dtype=D)
Y = X @ W + 0.1 * torch.randn(64, 1, generator=g0, dtype=D)
Xv = torch.randn(32, 4, generator=g0, dtype=D)
Yv = Xv @ W + 0.1 * torch.randn(32, 1, generator=g0, dtype=D)


def make_params(g):
    return {
        "W1": torch.randn(8, 4, generator=g, dtype=D) / 2,
        "b1": torch.zeros(8, dtype=D),
        "W2": torch.randn(1, 8, generator=g, dtype=D) / 8**0.5,
    }


def forward(p, x):
    return torch.tanh(x @ p["W1"].T + p["b1"]) @ p["W2"].T


LOSS = pop.vmap_loss(forward, lambda o, y: ((o - y) ** 2).mean())
SPACE = H.HyperParameterSpace(
    [H.HyperParameter("lr", H.LOG10, -2.0, -0.5, clip=(1e-10, 1.0)), H.weight_decay(), H.momentum()]
)


UPDATE = ("lr", "weight_decay", "momentum")


def make_tuner(n, seed, callbacks=(), **cfg):
    params, raw = pop.init_population(make_params, n, seed, lambda p, g: SPACE.init(p, g))
    return OnlineTuner(
        params,
        raw,
        SPACE,
        updates.SGD(),
        LOSS,
        LOSS,
        update_form=UPDATE,
        config=TunerConfig(**cfg),
        callbacks=callbacks,
    )


def run(tuner, steps):
    return tuner.run(steps, lambda: (X, Y), lambda: (Xv, Yv), record_batches=((X, Y), (Xv, Yv), None))


@pytest.mark.parametrize("mode", ["ift", "unroll", "baydin"])
def test_population_equals_members_alone(mode):
    cfg = dict(mode=mode, interval=5, lookback=3, record_every=5)
    together = run(make_tuner(3, seed=10, **cfg), 40)
    for i in range(3):
        alone = run(make_tuner(1, seed=10 + i, **cfg), 40)
        for key in ("val_loss", "train_loss"):
            torch.testing.assert_close(
                torch.tensor(getattr(together, key)[i]), torch.tensor(getattr(alone, key)[0]), rtol=1e-9, atol=1e-12
            )
        for name in SPACE.names:
            torch.testing.assert_close(
                torch.tensor(together.hparams[name][i]), torch.tensor(alone.hparams[name][0]), rtol=1e-9, atol=1e-12
            )


def test_population_equals_members_alone_per_weight_lr_and_minibatches():
    """ours-wd-hdlr-m's set-up (one learning rate per weight) on seeded mini-batches: together = alone."""
    space = H.HyperParameterSpace([H.learning_rate("element"), H.weight_decay(), H.momentum()])
    cfg = dict(mode="ift", interval=3, lookback=2, record_every=4)

    def go(n, seed):
        params, raw = pop.init_population(make_params, n, seed, lambda p, g: space.init(p, g))
        t = OnlineTuner(params, raw, space, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(**cfg))
        g = torch.Generator().manual_seed(99)  # the same batch sequence for every run

        def batch():
            idx = torch.randint(0, len(X), (16,), generator=g)
            return X[idx], Y[idx]

        return t.run(24, batch, lambda: (Xv, Yv), record_batches=((X, Y), (Xv, Yv), None)), t

    together, tt = go(3, 20)
    assert tt.raw["lr/W1"].shape == (3, 8, 4)
    for i in range(3):
        alone, ta = go(1, 20 + i)
        torch.testing.assert_close(
            torch.tensor(together.val_loss[i]), torch.tensor(alone.val_loss[0]), rtol=1e-9, atol=1e-12
        )
        torch.testing.assert_close(tt.raw["lr/W1"][i], ta.raw["lr/W1"][0], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(tt.raw["lr/W1"][0], tt.raw["lr/W1"][0].flatten()[0])  # per-weight values moved apart


def test_tuned_names_that_nothing_uses_are_refused():
    params, raw = pop.init_population(make_params, 1, 0, lambda p, g: SPACE.init(p, g))
    with pytest.raises(ValueError, match=r"\['momentum'\] are not hyperparameters of Adam"):
        OnlineTuner(
            params,
            raw,
            SPACE,
            updates.Adam(),
            LOSS,
            LOSS,
            update_form=("lr", "momentum"),
            config=TunerConfig(tuned=("lr", "momentum")),
        )
    with pytest.raises(ValueError, match=r"\['lr'\] are hyperparameters of Adam but not declared update-form"):
        OnlineTuner(params, raw, SPACE, updates.Adam(), LOSS, LOSS, config=TunerConfig(tuned=("lr",)))


def _finite_difference_hypergradient(tuner_factory, steps, key, eps=1e-6):
    """d L_V(w_steps(raw)) / d raw[key] by re-running the weight steps with a perturbed raw value."""
    vals = []
    for s in (eps, -eps):
        t = tuner_factory()
        with torch.no_grad():
            t.raw[key] += s
        for _ in range(steps):
            t.weight_step((X, Y))
        vals.append(LOSS(t.params, None, (Xv, Yv)))
    return (vals[0] - vals[1]) / (2 * eps)


def test_diff_through_opt_hypergradient_matches_finite_differences():
    factory = lambda: make_tuner(2, seed=3, mode="unroll", interval=4, lookback=4)  # noqa: E731
    t = factory()
    for _ in range(4):
        t.weight_step((X, Y))
        t.t += 1
    hg = t.hypergradient((X, Y), (Xv, Yv))
    for key in ("lr", "weight_decay", "momentum"):
        fd = _finite_difference_hypergradient(factory, 4, key)
        torch.testing.assert_close(hg[key], fd, rtol=1e-5, atol=1e-10)


def _mixed_tuner():
    """Update-form lr and momentum with a loss-form per-weight L2 (Lorraine) in the same loop."""
    from bilevel.regularizers import l2_penalty

    space = H.HyperParameterSpace(
        [
            H.HyperParameter("lr", H.LOG10, -2.0, -0.5),
            H.momentum(),
            H.HyperParameter("l2", H.LOG10, -3.0, -1.0, granularity="element"),
        ]
    )
    params, raw = pop.init_population(make_params, 1, 5, lambda p, g: space.init(p, g, shared_init=False))
    return OnlineTuner(
        params,
        raw,
        space,
        updates.SGD(),
        LOSS,
        LOSS,
        update_form=("lr", "momentum"),
        penalty=lambda p, nat: l2_penalty(p, nat["l2"]),
        config=TunerConfig(tuned=("lr", "momentum", "l2"), lookback=3),
    )


@pytest.mark.parametrize("which", ["update-form", "mixed"])
def test_ift_hypergradient_matches_dense_neumann_formula(which):
    """Clarke et al. eq. 6 written densely: direct - v sum_{j=0}^{i} (I - du/dw)^j du/dlambda."""
    from bilevel import tree as T

    t = make_tuner(1, seed=5, mode="ift", lookback=3) if which == "update-form" else _mixed_tuner()
    run(t, 7)  # some steps, so the momentum buffer is non-zero
    hg = t.hypergradient((X, Y), (Xv, Yv))
    keys = t.tuned_keys
    fixed = {k: v.detach() for k, v in t.raw.items() if k not in keys}
    w0 = T.flatten(t.params)
    lam0 = T.flatten({k: t.raw[k].detach() for k in keys})

    w = w0.clone().requires_grad_(True)
    lam = lam0.clone().requires_grad_(True)
    raw = {**fixed, **T.unflatten(lam, {k: t.raw[k] for k in keys})}
    out = T.flatten(t.step_map(T.unflatten(w, t.params), raw, (X, Y), t.state, True)[0])
    rows = [torch.autograd.grad(out[j], (w, lam), retain_graph=True) for j in range(len(out))]
    J = torch.stack([r[0] for r in rows])
    dudl = torch.stack([r[1] for r in rows])
    v = torch.func.grad(lambda w: LOSS(T.unflatten(w, t.params), None, (Xv, Yv)).sum())(w0)
    M = torch.eye(len(w0), dtype=D) - J
    acc, term = v.clone(), v.clone()
    for _ in range(3):
        term = term @ M
        acc = acc + term
    ref = -(acc @ dudl)
    got = T.flatten({k: hg[k] for k in keys})
    assert len(got) == (3 if which == "update-form" else 2 + 48)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-12)


def test_baydin_hypergradient_is_gradient_dot_product():
    """Baydin et al. (2018): for plain SGD, dL(w_t)/d lr = -grad L(w_t) . grad L(w_{t-1})."""
    space = H.HyperParameterSpace([H.HyperParameter("lr", H.LOG10, -1.5, -1.5)])
    params, raw = pop.init_population(make_params, 1, 0, lambda p, g: space.init(p, g))
    t = OnlineTuner(
        params,
        raw,
        space,
        updates.SGD(),
        LOSS,
        LOSS,
        update_form=("lr",),
        config=TunerConfig(mode="baydin", tuned=("lr",)),
    )
    captured = {}
    t.apply_hypergradient = lambda hg: captured.update(hg)
    grad = lambda p: torch.func.grad(lambda q: LOSS(q, None, (X, Y)).sum())(p)  # noqa: E731
    g_prev = grad(t.params)
    t.run(1, lambda: (X, Y), lambda: (Xv, Yv))
    g_now = grad(t.params)
    lr = 10**-1.5
    expected = -sum((g_prev[k] * g_now[k]).sum() for k in g_now) * lr * math.log(10)  # chain rule to log10 lr
    torch.testing.assert_close(captured["lr"], expected.reshape(1), rtol=1e-8, atol=1e-14)


def test_tuning_raises_a_too_small_learning_rate_and_improves_validation():
    fixed = run(make_tuner(4, seed=0, mode="none"), 200)
    tuned = run(make_tuner(4, seed=0, mode="ift", tuned=("lr",), hyper_lr=0.1), 200)
    lr0 = [v[0] for v in fixed.hparams["lr"]]
    lr1 = [v[-1] for v in tuned.hparams["lr"]]
    assert all(b > 2 * a for a, b in zip(lr0, lr1)), (lr0, lr1)
    assert sum(v[-1] for v in tuned.val_loss) < 0.9 * sum(v[-1] for v in fixed.val_loss)


def test_diverged_member_recorded_and_others_untouched():
    params, raw = pop.init_population(make_params, 3, 0, lambda p, g: SPACE.init(p, g))
    raw["lr"][1] = 8.0  # lr clipped to 1.0 but then grows: force a huge lr in member 1 via a big multiplier
    big_space = H.HyperParameterSpace([H.HyperParameter("lr", H.LOG10, -2.0, -0.5), H.weight_decay(), H.momentum()])
    t = OnlineTuner(
        params, raw, big_space, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(interval=5)
    )
    hist = run(t, 30)
    assert hist.diverged_at[1] is not None and hist.diverged_at[0] is None and hist.diverged_at[2] is None
    assert all(v is None for v in hist.val_loss[1][-2:])
    assert all(v is not None and math.isfinite(v) for v in hist.val_loss[0] + hist.val_loss[2])
    # the healthy members match a population without the diverging one
    params2 = {k: v[[0, 2]] for k, v in params.items()}
    raw2 = {k: v[[0, 2]] for k, v in raw.items()}
    t2 = OnlineTuner(
        params2, raw2, big_space, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(interval=5)
    )
    hist2 = run(t2, 30)
    torch.testing.assert_close(torch.tensor(hist.val_loss[2]), torch.tensor(hist2.val_loss[1]), rtol=1e-9, atol=1e-12)


def _diverging_tuner(sync_free: bool, **cfg) -> OnlineTuner:
    """Three members, the second with learning rate 10**8: it diverges in the first steps."""
    big_space = H.HyperParameterSpace([H.HyperParameter("lr", H.LOG10, -2.0, -0.5), H.weight_decay(), H.momentum()])
    params, raw = pop.init_population(make_params, 3, 0, lambda p, g: SPACE.init(p, g))
    raw["lr"][1] = 8.0
    t = OnlineTuner(
        params, raw, big_space, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(interval=5, **cfg)
    )
    t.sync_free = sync_free
    return t


def test_sync_free_divergence_marking_gives_the_same_run():
    """On an accelerator the loop marks divergence without waiting for the device (``sync_free``): the same
    weights, losses and divergence steps as the synchronising path, and no ``.item()``-style read per step."""
    a, b = _diverging_tuner(False), _diverging_tuner(True)
    params = a.initial_params  # the draw before any step
    ha, hb = run(a, 30), run(b, 30)
    assert ha.diverged_at == hb.diverged_at and ha.diverged_at[1] is not None
    assert ha.val_loss == hb.val_loss
    alive = [i for i, d in enumerate(ha.diverged_at) if d is None]
    for k in a.params:  # a diverged member is frozen at its initial weights on the sync-free path only
        torch.testing.assert_close(a.params[k][alive], b.params[k][alive], rtol=0, atol=0)
    assert all(torch.equal(b.params[k][1], params[k][1]) for k in params)
    # the sync-free path never converts a device tensor to a Python bool while marking
    c = _diverging_tuner(True)
    c.step((X, Y))
    calls = []
    real_bool = torch.Tensor.__bool__
    torch.Tensor.__bool__ = lambda self: calls.append(1) or real_bool(self)  # type: ignore[method-assign]
    try:
        c._mark(torch.tensor([False, True, False]), "test")
    finally:
        torch.Tensor.__bool__ = real_bool  # type: ignore[method-assign]
    assert calls == [] and not bool(c.alive[1]) and c.history.diverged_at[1] == c.t
    # a resumed sync-free loop keeps the recorded divergence steps
    d = _diverging_tuner(True)
    d.load_state_dict(b.state_dict())
    assert d.history.diverged_at == hb.diverged_at and d._diverged_t.tolist()[1] == hb.diverged_at[1]


def _counted(loss, calls, noise=False):
    def f(p, nat, batch):
        calls.append(1)
        out = loss(p, nat, batch)
        return out + 0.0 * torch.randn((), dtype=out.dtype) if noise else out  # draws, changes nothing

    return f


def _shared_and_not(steps, batches, make=lambda: make_tuner(3, 0, interval=5), noise=False):
    """The same run with and without SharedGradient: the training-loss evaluations of each (share True, False)."""
    out = []
    for share in (True, False):
        calls: list[int] = []
        t = make()
        if share:  # the opt-in wrapper around the IFT strategy
            t.strategy = SharedGradient(t.strategy)
        t.train_loss = _counted(t.train_loss, calls, noise)
        t.run(steps, batches, lambda: (Xv, Yv))
        out.append((t, len(calls)))
    (a, na), (b, nb) = out
    for k in a.params:  # the same run, bit for bit
        assert torch.equal(a.params[k], b.params[k]), k
    for k in a.raw:
        assert torch.equal(a.raw[k], b.raw[k]), k
    return na, nb


def test_shared_gradient_saves_a_gradient_per_hyper_step_bit_for_bit():
    """Full batch, update-form lr / decay / momentum: the weight step after each hyperparameter step reuses
    that step's training gradient (one loss evaluation fewer per hyperparameter step), the same run exactly."""
    na, nb = _shared_and_not(30, lambda: (X, Y))
    # 30 weight steps, hyperparameter steps after steps 5, 10, ..., 30: the steps 6, 11, 16, 21, 26 reuse
    assert nb == 30 + 6 and na == nb - 5


def test_shared_gradient_is_not_reused_when_it_would_differ():
    """Minibatches (other tensors), a loss that draws random numbers, a tuned loss-form hyperparameter, a
    checkpoint restored in between: every weight step computes its own gradient."""
    na, nb = _shared_and_not(20, lambda: (X[:32], Y[:32]))  # new tensors every call (a slice is a new view)
    assert na == nb == 20 + 4
    na, nb = _shared_and_not(20, lambda: (X, Y), noise=True)
    assert na == nb == 20 + 4
    na, nb = _shared_and_not(20, lambda: (X, Y), make=_mixed_tuner)
    assert na == nb == 20 + 2  # _mixed_tuner: T = 10; l2 is tuned and enters the loss
    # restoring a checkpoint between the hyperparameter step and the next weight step drops the entry
    t = make_tuner(2, 0, interval=5, share_gradient=True)
    calls: list[int] = []
    t.train_loss = _counted(t.train_loss, calls)
    t.run(5, lambda: (X, Y), lambda: (Xv, Yv))
    assert t.strategy.entry is not None
    t.load_state_dict(t.state_dict())
    t.run(1, lambda: (X, Y), lambda: (Xv, Yv))
    assert len(calls) == 5 + 1 + 1


def test_shared_gradient_is_off_by_default_and_catches_a_batch_refilled_in_place():
    """Sharing is opt-in; opted in, a batch tensor refilled in place behind autograd's back (``.data.copy_``,
    which does not bump the version counter; a numpy staging buffer) is recomputed: the same run as without."""
    assert TunerConfig().share_gradient is False
    xb, yb = X[:32].clone(), Y[:32].clone()
    draws = iter(range(10**6))

    def refill():  # the same tensor objects, new contents every call (a staging buffer)
        i = next(draws) % 2
        xb.data.copy_(X[32 * i : 32 * (i + 1)])
        yb.data.copy_(Y[32 * i : 32 * (i + 1)])
        return xb, yb

    na, nb = _shared_and_not(20, refill)
    assert na == nb == 20 + 4
    for buf_x in (X.numpy().copy(),):  # numpy buffer shared with the tensor: writes bump no version
        shared_x = torch.from_numpy(buf_x)

        def numpy_refill():
            i = next(draws) % 2
            buf_x[:] = X.numpy()[::-1].copy() if i else X.numpy()
            return shared_x, Y

        draws = iter(range(10**6))
        na, nb = _shared_and_not(20, numpy_refill)
        assert na == nb == 20 + 4


def test_shared_gradient_on_the_sync_free_path_with_a_diverging_member():
    """On an accelerator every marking rebuilds the weights (``where(alive, w, w_0)``); the shared gradient
    follows them: still one loss evaluation fewer per hyperparameter step, and the same run for every live
    member and the same divergence steps as without sharing."""
    out = []
    for share in (True, False):
        calls: list[int] = []
        t = _diverging_tuner(True, share_gradient=share)
        t.train_loss = _counted(t.train_loss, calls)
        out.append((t, run(t, 30), len(calls)))
    (a, ha, na), (b, hb, nb) = out
    assert ha.diverged_at == hb.diverged_at and ha.diverged_at[1] is not None
    assert ha.val_loss == hb.val_loss
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k]), k  # dead member 1 is back at w_0 in both
    assert nb == 30 + 6 + 3 and na == nb - 5  # weight steps, hyperparameter steps, records


def test_checkpoint_resume_is_exact(tmp_path):
    from bilevel.callbacks import RandomLRMultiplier

    xlr = lambda: [RandomLRMultiplier(0.95, 1.01, seed=1)]  # noqa: E731
    full = run(make_tuner(2, seed=1, interval=5, callbacks=xlr()), 30)
    t = make_tuner(2, seed=1, interval=5, callbacks=xlr())
    run(t, 15)
    torch.save(t.state_dict(), tmp_path / "ckpt.pt")
    t2 = make_tuner(2, seed=1, interval=5, callbacks=xlr())
    t2.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))  # plain containers only
    resumed = run(t2, 15)
    assert resumed.step == full.step
    torch.testing.assert_close(torch.tensor(resumed.val_loss), torch.tensor(full.val_loss), rtol=0, atol=0)


def test_cold_start_retrains_from_initial_weights():
    t = make_tuner(1, seed=2, warm_start=False, cold_steps=7, interval=5)
    calls = []
    orig = t.weight_step
    t.weight_step = lambda b: (calls.append(1), orig(b))[1]
    run(t, 5)
    assert len(calls) == 5 + 7  # 5 ordinary steps, then a cold restart of 7 before the hypergradient


def test_unknown_tuned_name():
    params, raw = pop.init_population(make_params, 1, 0, lambda p, g: SPACE.init(p, g))
    with pytest.raises(ValueError, match="not in the space"):
        OnlineTuner(
            params, raw, SPACE, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(tuned=("dropout",))
        )


def test_nn_module_with_buffers_and_any_loss():
    """An nn.Module (BatchNorm in eval mode, buffers used as they are) tuned with a Huber loss, mini-batches."""
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    model[1].running_mean.normal_()
    forward = pop.module_forward(model)
    loss = pop.vmap_loss(forward, F.huber_loss)
    params = pop.module_population(model, 2)
    raw = pop.stack([SPACE.init(dict(model.named_parameters()), torch.Generator().manual_seed(i)) for i in range(2)])
    t = OnlineTuner(
        params,
        raw,
        SPACE,
        updates.SGD(),
        loss,
        loss,
        update_form=UPDATE,
        config=TunerConfig(interval=3, record_every=3),
    )
    gen = torch.Generator().manual_seed(1)
    batches = lambda: (lambda idx: (X[idx], Y[idx]))(torch.randint(0, 64, (16,), generator=gen))  # noqa: E731
    hist = t.run(9, batches, lambda: (Xv, Yv), record_batches=((X, Y), (Xv, Yv), None))
    assert len(hist.step) == 3 and all(v is not None for v in hist.val_loss[0])
    # the recorded validation loss is the Huber loss of the module itself with member 0's weights
    with torch.no_grad():
        for k, v in model.named_parameters():
            v.copy_(t.params[k][0])
        torch.testing.assert_close(torch.tensor(hist.val_loss[0][-1], dtype=D), F.huber_loss(model(Xv), Yv))


def test_implicit_loss_is_lorraine_ift_with_the_hessian_whatever_the_rule():
    """implicit='loss': -dL_V/dw H^-1 d2L_T/dw dlambda (Lorraine et al. eq. 2-3), H the Hessian of the penalised
    training loss, even when Adam steps the weights; checked against a dense solve."""
    from bilevel import tree as T
    from bilevel.regularizers import l2_penalty
    from bilevel.solvers import Exact

    space = H.HyperParameterSpace([H.HyperParameter("l2", H.LOG10, -2.0, -1.0, granularity="element")])
    params, raw = pop.init_population(make_params, 1, 3, lambda p, g: space.init(p, g, shared_init=False))
    pen = lambda p, nat: l2_penalty(p, nat["l2"])  # noqa: E731
    t = OnlineTuner(
        params,
        raw,
        space,
        updates.Adam(lr=0.01),
        LOSS,
        LOSS,
        penalty=pen,
        config=TunerConfig(tuned=("l2",), implicit="loss", solver=Exact()),
    )
    run(t, 5)
    hg = t.hypergradient((X, Y), (Xv, Yv))
    w0 = T.flatten(t.params)
    lam0 = T.flatten({k: t.raw[k].detach() for k in t.tuned_keys})

    def train(w, lam):
        p = T.unflatten(w, t.params)
        nat = space.natural(T.unflatten(lam, {k: t.raw[k] for k in t.tuned_keys}))
        return LOSS(p, None, (X, Y)).sum() + pen(p, nat).sum()

    Hm = torch.func.hessian(train, argnums=0)(w0, lam0)
    mixed = torch.func.jacrev(torch.func.grad(train, argnums=0), argnums=1)(w0, lam0)
    v = torch.func.grad(lambda w: LOSS(T.unflatten(w, t.params), None, (Xv, Yv)).sum())(w0)
    ref = -torch.linalg.solve(Hm, mixed).T @ v
    torch.testing.assert_close(T.flatten({k: hg[k] for k in t.tuned_keys}), ref, rtol=1e-7, atol=1e-12)
    assert ref.abs().max() > 1e-6
    p1, r1 = pop.init_population(make_params, 1, 0, lambda p, g: SPACE.init(p, g))
    with pytest.raises(ValueError, match="must be loss-form"):
        OnlineTuner(
            p1,
            r1,
            SPACE,
            updates.SGD(),
            LOSS,
            LOSS,
            update_form=("lr",),
            config=TunerConfig(tuned=("lr",), implicit="loss"),
        )


# ---------------------------------------------------------------------------- one model (stacked=False), contexts


def test_clip_grad_norm_matches_torch():
    from bilevel.tuner import clip_grad_norm

    g = [torch.randn(3, 4, dtype=D), torch.randn(5, dtype=D)]
    ps = [torch.nn.Parameter(x.clone()) for x in g]
    for p, x in zip(ps, g):
        p.grad = x.clone()
    torch.nn.utils.clip_grad_norm_(ps, 0.5)
    mine = clip_grad_norm(g, 0.5)
    assert all(torch.allclose(p.grad, m) for p, m in zip(ps, mine))
    stacked = clip_grad_norm([torch.stack([x, 3 * x]) for x in g], 0.5, population=2)
    assert all(torch.allclose(s[0], m) and torch.allclose(s[1], m) for s, m in zip(stacked, mine))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(g, 0.0)


def _one_model(loss, w0, h0, rule, **cfg):
    space = H.HyperParameterSpace([H.HyperParameter(k.split("/")[0], "identity", 0.0, 0.0) for k in h0])
    return OnlineTuner(w0, h0, space, rule, loss, loss, config=TunerConfig(tuned=space.names, **cfg), stacked=False)


def test_one_model_unroll_with_contexts_equals_autograd_through_steps():
    """Diff-through-Opt on one model, each step with its own context (mini-batch), against differentiating three
    explicit SGD steps by hand; the validation loss is a different function of a different batch."""
    torch.manual_seed(0)
    X, y = torch.randn(20, 3, dtype=D), torch.randn(20, dtype=D)
    Xv, yv = torch.randn(10, 3, dtype=D), torch.randn(10, dtype=D)

    def loss(p, h, ctx):
        if ctx == "val":
            return ((Xv @ p["w"] - yv) ** 2).mean()
        return ((X[ctx] @ p["w"] - y[ctx]) ** 2).mean() + (h["lwd"].exp() * p["w"] ** 2).sum()

    w0, h0 = {"w": torch.randn(3, dtype=D)}, {"lwd": torch.full((), -1.0, dtype=D)}
    t = _one_model(loss, w0, h0, SGD(lr=0.1), mode="unroll", lookback=3, hyper_lr=0.1)
    ctxs = [torch.arange(0, 10), torch.arange(5, 15), torch.arange(10, 20)]
    for c in ctxs:
        t.step(c)
    hg = t.hyper_step(ctxs[-1], "val")
    h = h0["lwd"].clone().requires_grad_()
    w = w0["w"].clone().requires_grad_()
    for c in ctxs:
        (g,) = torch.autograd.grad(loss({"w": w}, {"lwd": h}, c), w, create_graph=True)
        w = w - 0.1 * g
    (ref,) = torch.autograd.grad(loss({"w": w}, None, "val"), h)
    assert torch.allclose(hg["lwd"], ref, rtol=1e-10)
    assert not torch.equal(t.raw["lwd"].detach(), h0["lwd"])  # Adam moved the hyperparameter


def test_one_model_equals_population_of_one():
    """stacked=False runs the same maths as a population of one (vmap-ed losses)."""
    cfg = dict(mode="ift", interval=4, lookback=3, record_every=4)
    many = run(make_tuner(1, seed=7, **cfg), 24)
    params, raw = pop.init_population(make_params, 1, 7, lambda p, g: SPACE.init(p, g))
    one_loss = lambda p, h, b: ((forward(p, b[0]) - b[1]) ** 2).mean()  # noqa: E731
    t = OnlineTuner(
        pop.member(params, 0),
        pop.member(raw, 0),
        SPACE,
        updates.SGD(),
        one_loss,
        one_loss,
        update_form=UPDATE,
        config=TunerConfig(**cfg),
        stacked=False,
    )
    one = run(t, 24)
    torch.testing.assert_close(torch.tensor(one.val_loss), torch.tensor(many.val_loss), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(one.hparams["lr"]), torch.tensor(many.hparams["lr"]), rtol=1e-9, atol=1e-12)


def test_one_model_raises_on_divergence():
    from bilevel.errors import NonFiniteError

    params, raw = pop.init_population(make_params, 1, 0, lambda p, g: SPACE.init(p, g))
    one_loss = lambda p, h, b: ((forward(p, b[0]) - b[1]) ** 2).mean()  # noqa: E731
    rule = updates.SGD(lr=1e3)
    t = OnlineTuner(
        pop.member(params, 0),
        pop.member(raw, 0),
        SPACE,
        rule,
        one_loss,
        one_loss,
        config=TunerConfig(tuned=(), on_divergence="raise"),
        stacked=False,
    )
    snapshots = []
    t.callbacks.append(type("Snap", (), {"on_weight_step": lambda self, tu: snapshots.append(dict(tu.params))})())
    with pytest.raises(NonFiniteError, match=r"(training loss|weights) at weight step (\d+)") as err:
        t.run(50, lambda: (X, Y * 1e3), lambda: (Xv, Yv))
    assert err.value.step == len(snapshots) + 1 == t.t + 1  # the step that failed was not taken
    for k, v in t.params.items():  # the weights are the last finite ones, those after the last step taken
        assert torch.isfinite(v).all() and torch.equal(v, snapshots[-1][k])


def test_rollback_restores_the_member_and_halves_its_learning_rate():
    """on_divergence="rollback" on a population where one member's learning rate is far too large for a
    quadratic (lr * lambda_max > 2): that member is put back to its weights and momentum before each bad
    step, its lr halves until its steps stay finite, each event is in ``history.events``; the other members
    run exactly as without it."""
    Xs = X * 3  # Hessian 2 Xs^T Xs / n: lambda_max ~ 20, so lr = 1 overshoots by a factor ~20 each step

    def loss(p, x):  # a quadratic whose log-barrier term turns non-finite once |w|^2 > 1e4
        r = x[0] @ p["w"] - x[1]
        return (r**2).mean() + 0.0 * torch.log(1e4 - (p["w"] ** 2).sum())

    vloss = torch.vmap(lambda p, b: loss(p, b), in_dims=(0, None))

    def make(mode):
        params = {"w": torch.zeros(3, 4, 1, dtype=D)}
        raw = SPACE.from_natural(pop.member(params, 0), {"lr": 0.01, "weight_decay": 1e-4, "momentum": 0.5})
        raw = pop.stack([raw, raw, raw])
        raw["lr"] = torch.tensor([-2.0, 0.0, -1.5], dtype=D)  # member 1: lr = 1 (the clip)
        return OnlineTuner(
            params,
            raw,
            SPACE,
            updates.SGD(),
            lambda p, h, b: vloss(p, b),
            lambda p, h, b: vloss(p, b),
            update_form=UPDATE,
            config=TunerConfig(tuned=("weight_decay",), interval=5, on_divergence=mode),
        )

    a, b = make("rollback"), make("record")
    for t in (a, b):
        t.run(120, lambda: (Xs, Y), lambda: (Xv, Yv))
    ev = a.history.events
    assert len(ev) >= 2 and all(e["member"] == 1 and e["action"] == "rollback" for e in ev)
    assert [e["lr_factor"] for e in ev] == [0.5 ** (i + 1) for i in range(len(ev))]
    assert a.history.diverged_at == [None, None, None] and b.history.diverged_at[1] is not None
    assert bool(a.alive.all()) and torch.isfinite(a.params["w"]).all()
    torch.testing.assert_close(10 ** a.raw["lr"][1], torch.tensor(0.5 ** len(ev), dtype=D), rtol=1e-12, atol=0)
    for k in a.params:  # members 0 and 2 are untouched by member 1's rollbacks
        assert torch.equal(a.params[k][[0, 2]], b.params[k][[0, 2]]), k
    for k in a.raw:
        assert torch.equal(a.raw[k][[0, 2]], b.raw[k][[0, 2]]), k
    # once its lr was small enough member 1 stopped diverging: its last 40 steps needed no rollback
    assert ev[-1]["step"] <= 80 and torch.isfinite(vloss(a.params, (Xs, Y))).all()


def test_per_weight_decay_of_adam_hypergradient_matches_finite_differences():
    """Update-form per-weight decays of Adam (Fig. 8 set-up): two unrolled steps against central differences of the
    validation loss along a random raw direction; the IFT identity estimate agrees with it in sign."""
    import torch.nn.functional as F

    from bilevel.nets.lstm import lstm_lm_forward, lstm_lm_init
    from bilevel.solvers import Identity

    g = torch.Generator().manual_seed(0)
    V = 12
    p = lstm_lm_init(V, 4, 5, 1, g, D)
    x, xv = torch.randint(0, V, (6, 3), generator=g), torch.randint(0, V, (6, 3), generator=g)
    y, yv = torch.randint(0, V, (18,), generator=g), torch.randint(0, V, (18,), generator=g)
    space = H.HyperParameterSpace([H.per_weight_decay()])
    raw = space.from_natural(p, {"weight_decay": 1e-2})
    loss = lambda q, h, ctx: F.cross_entropy(lstm_lm_forward(q, xv if ctx == "val" else x), yv if ctx == "val" else y)  # noqa: E731
    rule = updates.Adam(
        lr=0.05, eps=1e-3
    )  # torch's eps=1e-8 makes u(lambda) so curved that differences need eps < 1e-6

    def make(**cfg):
        return OnlineTuner(
            p,
            raw,
            space,
            rule,
            loss,
            loss,
            update_form=("weight_decay",),
            config=TunerConfig(tuned=("weight_decay",), **cfg),
            stacked=False,
        )

    t = make(mode="unroll", lookback=2)
    t.step(None)
    t.step(None)
    hg = t.hypergradient(None, "val")

    def val_after_two_steps(r):
        s = make(mode="none")
        with torch.no_grad():
            for k in r:
                s.raw[k].copy_(r[k])
        s.step(None)
        s.step(None)
        return float(loss(s.params, None, "val"))

    gd = torch.Generator().manual_seed(1)
    d = {k: torch.randn(v.shape, generator=gd, dtype=D) for k, v in raw.items()}
    eps = 1e-4
    fd = (
        val_after_two_steps({k: raw[k] + eps * d[k] for k in raw})
        - val_after_two_steps({k: raw[k] - eps * d[k] for k in raw})
    ) / (2 * eps)
    directional = sum(float((hg[k] * d[k]).sum()) for k in raw)
    assert fd != 0.0
    assert directional == pytest.approx(fd, rel=1e-6)
    ift = make(mode="ift", solver=Identity())
    ift.step(None)
    ift.step(None)
    hi = ift.hypergradient(None, "val")
    assert sum(float((hi[k] * hg[k]).sum()) for k in raw) > 0


def test_config_errors_name_the_problem():
    params, raw = pop.init_population(make_params, 1, 0, lambda p, g: SPACE.init(p, g))
    for bad, match in (
        (dict(mode="neumann"), "mode"),
        (dict(interval=0), "interval"),
        (dict(mode="unroll", lookback=0), "lookback"),
        (dict(hyper_lr=-1.0), "hyper_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            OnlineTuner(params, raw, SPACE, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(**bad))
    for mode in ("unroll", "baydin"):  # both differentiate through weight steps: none taken yet
        t = OnlineTuner(
            params, raw, SPACE, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(mode=mode)
        )
        with pytest.raises(ValueError, match="weight step"):
            t.hypergradient((X, Y), (Xv, Yv))
    t = OnlineTuner(params, raw, SPACE, updates.SGD(), LOSS, LOSS, update_form=UPDATE)  # the IFT at w_0 (HyperFirst)
    assert all(bool(torch.isfinite(v).all()) for v in t.hypergradient((X, Y), (Xv, Yv)).values())
    assert (
        OnlineTuner(
            params, raw, SPACE, updates.SGD(), LOSS, LOSS, update_form=UPDATE, config=TunerConfig(mode="none")
        ).hyper_step((X, Y), (Xv, Yv))
        is None
    )
