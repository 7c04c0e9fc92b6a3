"""Tests for bilevel.updates: torch.optim parity, granularity, differentiability, vmap, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad as fgrad
from torch.func import vmap

from bilevel.hparams import HyperParameterSpace, for_rule
from bilevel.updates import (
    SGD,
    Adam,
    AdamW,
    RMSprop,
    UpdateRule,
    WithDefaults,
    apply,
    detach_state,
    from_torch,
    resolve,
    state_from_torch,
    state_to_torch,
    twin,
)

DT = torch.float64
STEPS = 10


# --------------------------------------------------------------------------- fixtures


def make_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w1": torch.randn(5, 3, generator=g, dtype=DT) * 0.5,
        "b1": torch.randn(5, generator=g, dtype=DT) * 0.1,
        "w2": torch.randn(1, 5, generator=g, dtype=DT) * 0.5,
        "b2": torch.zeros(1, dtype=DT),
    }
    x = torch.randn(16, 3, generator=g, dtype=DT)
    y = torch.randn(16, 1, generator=g, dtype=DT)
    return params, x, y


def loss_fn(params, x, y):
    h = torch.tanh(x @ params["w1"].T + params["b1"])
    out = h @ params["w2"].T + params["b2"]
    return ((out - y) ** 2).mean()


def grads_of(params, x, y, create_graph=False):
    names = list(params)
    if not create_graph:
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
    gs = torch.autograd.grad(loss_fn(params, x, y), [params[k] for k in names], create_graph=create_graph)
    return dict(zip(names, gs))


def run_torch(opt_cls, groups_of, steps=STEPS, seed=0):
    """Train with torch.optim; ``groups_of(leaves)`` returns the param-group list."""
    params, x, y = make_problem(seed)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = opt_cls(groups_of(leaves))
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(leaves, x, y).backward()
        opt.step()
        traj.append({k: v.detach().clone() for k, v in leaves.items()})
    return traj


def run_rule(rule: UpdateRule, hparams, steps=STEPS, seed=0, graph=True):
    """The rule's trajectory; ``graph=False`` calls it under ``no_grad`` (as the tuner's weight step does)."""
    params, x, y = make_problem(seed)
    state = rule.init_state(params)
    traj = []
    for _ in range(steps):
        grads = grads_of(params, x, y)
        with torch.set_grad_enabled(graph):
            u, state = rule(params, grads, hparams, state)
        params = {k: v.detach() for k, v in apply(params, u).items()}
        state = detach_state(state)
        traj.append(params)
    return traj


def assert_traj_close(a, b, atol=1e-10):
    assert len(a) == len(b)
    for i, (pa, pb) in enumerate(zip(a, b)):
        for k in pa:
            torch.testing.assert_close(pa[k], pb[k], atol=atol, rtol=0, msg=lambda m: f"step {i}, {k}: {m}")


# --------------------------------------------------------------------------- 1. parity

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, dampening=0.3),
    dict(lr=0.1, momentum=0.9, nesterov=True),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.05),
    dict(lr=0.05, momentum=0.8, weight_decay=0.05, nesterov=True),
]


@pytest.mark.parametrize("opts", SGD_CASES, ids=str)
def test_sgd_parity(opts):
    ref = run_torch(lambda ps: torch.optim.SGD(ps, **opts), lambda leaves: list(leaves.values()))
    assert_traj_close(run_rule(SGD(**opts), {}), ref)


ADAM_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    dict(lr=0.01, amsgrad=True),
    dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.1, amsgrad=True),
]


@pytest.mark.parametrize("opts", ADAM_CASES, ids=str)
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_adam_parity(name, opts):
    opts = dict(opts)
    torch_cls = getattr(torch.optim, name)
    rule_cls = {"Adam": Adam, "AdamW": AdamW}[name]
    ref = run_torch(lambda ps: torch_cls(ps, **opts), lambda leaves: list(leaves.values()))
    betas = opts.pop("betas", (0.9, 0.999))
    if "weight_decay" not in opts and name == "AdamW":
        opts["weight_decay"] = 1e-2  # torch.optim.AdamW default; the rule's default too
    rule = rule_cls(beta1=betas[0], beta2=betas[1], **opts)
    assert_traj_close(run_rule(rule, {}), ref)


@pytest.mark.parametrize("opts", ADAM_CASES, ids=str)
def test_adam_takes_torch_keywords(opts):
    """The rule accepts torch.optim.Adam's own keywords (betas=, amsgrad=) and matches it step by step."""
    ref = run_torch(lambda ps: torch.optim.Adam(ps, **opts), lambda leaves: list(leaves.values()))
    assert_traj_close(run_rule(Adam(**opts), {}), ref)


def test_amsgrad_differs_from_adam_and_keeps_the_running_max():
    """AMSGrad's buffer is the running max of v_t (so the parity above is not Adam's by accident)."""
    params, x, y = make_problem(0)
    rule = Adam(lr=0.05, betas=(0.0, 0.5), amsgrad=True)
    state = rule.init_state(params)
    big = grads_of(params, x, y)
    _, state = rule(params, {k: 10 * g for k, g in big.items()}, {}, state)
    v_after_big = {k: v.clone() for k, v in state["max_exp_avg_sq"].items()}
    u_ams, state = rule(params, big, {}, state)
    for k in params:  # v shrank, the max did not
        assert bool((state["exp_avg_sq"][k] <= v_after_big[k] + 1e-15).all())
        torch.testing.assert_close(state["max_exp_avg_sq"][k], v_after_big[k])
    plain = Adam(lr=0.05, betas=(0.0, 0.5))
    s0 = plain.init_state(params)
    _, s0 = plain(params, {k: 10 * g for k, g in big.items()}, {}, s0)
    u_plain, _ = plain(params, big, {}, s0)
    assert any(not torch.allclose(u_ams[k], u_plain[k]) for k in params)


RMS_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, centered=True),
    dict(lr=0.01, momentum=0.9),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.01, alpha=0.9, eps=1e-6, momentum=0.5, centered=True, weight_decay=0.1),
]


@pytest.mark.parametrize("opts", RMS_CASES, ids=str)
def test_rmsprop_parity(opts):
    ref = run_torch(lambda ps: torch.optim.RMSprop(ps, **opts), lambda leaves: list(leaves.values()))
    assert_traj_close(run_rule(RMSprop(**opts), {}), ref)


def test_hparams_as_tensors_match_fields():
    """Passing the tuned values as tensors gives the same trajectory as the dataclass defaults."""
    ref = run_rule(SGD(lr=0.1, momentum=0.9, weight_decay=0.01), {})
    t = lambda v: torch.tensor(v, dtype=DT)  # noqa: E731
    got = run_rule(SGD(), {"lr": t(0.1), "momentum": t(0.9), "weight_decay": t(0.01)})
    assert_traj_close(got, ref)
    ref = run_rule(RMSprop(lr=0.01, momentum=0.5), {})
    got = run_rule(RMSprop(lr=0.01), {"momentum": t(0.5)})
    assert_traj_close(got, ref)


# --------------------------------------------------------------------------- 2. granularity

PER_TENSOR_LR = {"w1": 0.1, "b1": 0.03, "w2": 0.2, "b2": 0.07}


def _per_tensor(vals):
    return {k: torch.tensor(v, dtype=DT) for k, v in vals.items()}


def _groups(leaves, key, vals):
    return [{"params": [leaves[k]], key: vals[k]} for k in leaves]


def test_per_tensor_lr_sgd_momentum_matches_param_groups():
    opts = dict(momentum=0.9, weight_decay=0.01)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, **opts), lambda lv: _groups(lv, "lr", PER_TENSOR_LR))
    assert_traj_close(run_rule(SGD(**opts), {"lr": _per_tensor(PER_TENSOR_LR)}), ref)


def test_per_tensor_adam_lr_and_beta1_match_param_groups():
    b1 = {"w1": 0.9, "b1": 0.8, "w2": 0.85, "b2": 0.7}
    lr = {k: v / 10 for k, v in PER_TENSOR_LR.items()}
    groups = lambda lv: [{"params": [lv[k]], "lr": lr[k], "betas": (b1[k], 0.99)} for k in lv]  # noqa: E731
    ref = run_torch(lambda ps: torch.optim.Adam(ps, weight_decay=0.1), groups)
    got = run_rule(Adam(beta2=0.99, weight_decay=0.1), {"lr": _per_tensor(lr), "beta1": _per_tensor(b1)})
    assert_traj_close(got, ref)


@pytest.mark.parametrize("rule", [SGD(momentum=0.9), Adam(), RMSprop(centered=True)], ids=lambda r: type(r).__name__)
def test_scalar_per_tensor_per_element_agree(rule):
    params, _, _ = make_problem()
    lr = torch.tensor(0.05, dtype=DT)
    scalar = run_rule(rule, {"lr": lr})
    per_tensor = run_rule(rule, {"lr": {k: lr.clone() for k in params}})
    per_element = run_rule(rule, {"lr": {k: torch.full_like(v, 0.05) for k, v in params.items()}})
    assert_traj_close(per_tensor, scalar, atol=0)
    assert_traj_close(per_element, scalar, atol=0)


def test_per_element_values_manual_formula():
    torch.manual_seed(0)
    params, x, y = make_problem()
    lr = {k: torch.rand_like(v) * 0.1 for k, v in params.items()}
    mu = {k: torch.rand_like(v) for k, v in params.items()}
    wd = torch.tensor(0.03, dtype=DT)
    rule = SGD()
    hp = {"lr": lr, "momentum": mu, "weight_decay": wd}
    state = rule.init_state(params)
    # step 1: buffer = d
    g0 = grads_of(params, x, y)
    u, state = rule(params, g0, hp, state)
    d0 = {k: g0[k] + wd * params[k] for k in params}
    for k in params:
        torch.testing.assert_close(u[k], lr[k] * d0[k], atol=1e-14, rtol=0)
    p1 = apply(params, u)
    # step 2: buffer = mu * b + d
    g1 = grads_of(p1, x, y)
    u, state = rule(p1, g1, hp, state)
    for k in params:
        b = mu[k] * d0[k] + g1[k] + wd * p1[k]
        torch.testing.assert_close(state["momentum_buffer"][k], b, atol=1e-14, rtol=0)
        torch.testing.assert_close(u[k], lr[k] * b, atol=1e-14, rtol=0)
    # per-element Adam lr: one step is elementwise lr * direction
    u_scalar, _ = Adam()(params, g0, {"lr": torch.tensor(1.0, dtype=DT)}, Adam().init_state(params))
    u_elem, _ = Adam()(params, g0, {"lr": lr}, Adam().init_state(params))
    for k in params:
        torch.testing.assert_close(u_elem[k], lr[k] * u_scalar[k], atol=1e-14, rtol=1e-12)


# --------------------------------------------------------------------------- 3. differentiability


def _unrolled(rule, names, steps=3, detach=False):
    """f(*hparams) = sum of the weights after ``steps`` differentiable steps."""
    params0, x, y = make_problem()

    def f(*hs):
        hp = dict(zip(names, hs))
        params = {k: v.clone().requires_grad_() for k, v in params0.items()}
        state = rule.init_state(params)
        for _ in range(steps):
            grads = grads_of(params, x, y, create_graph=True) if not detach else grads_of(params, x, y)
            u, state = rule(params, grads, hp, state)
            params = apply(params, u)
            if detach:
                state = detach_state(state)
        return torch.stack([v.sum() for v in params.values()]).sum()

    return f


def _h(v):
    return torch.tensor(v, dtype=DT, requires_grad=True)


def test_gradcheck_sgd_momentum_single_step():
    params, x, y = make_problem()
    rule = SGD(momentum=0.9)
    state = rule.init_state(params)
    for _ in range(2):  # non-trivial buffer
        u, state = rule(params, grads_of(params, x, y), {}, state)
        params = apply(params, u)
    state = detach_state(state)
    grads = grads_of(params, x, y)

    def f(lr, mu, wd, dmp):
        u, _ = rule(params, grads, {"lr": lr, "momentum": mu, "weight_decay": wd, "dampening": dmp}, state)
        return sum((params[k] - u[k]).sum() for k in params)

    assert torch.autograd.gradcheck(f, (_h(0.1), _h(0.9), _h(0.01), _h(0.2)))


def test_gradcheck_sgd_momentum_unrolled():
    f = _unrolled(SGD(momentum=0.9), ("lr", "momentum", "weight_decay"))
    assert torch.autograd.gradcheck(f, (_h(0.1), _h(0.9), _h(0.01)))


def test_gradcheck_adam_unrolled():
    f = _unrolled(Adam(), ("lr", "beta1", "beta2", "eps", "weight_decay"))
    assert torch.autograd.gradcheck(f, (_h(0.01), _h(0.9), _h(0.99), _h(1e-3), _h(0.05)))


def test_gradcheck_adamw_and_rmsprop():
    f = _unrolled(AdamW(), ("lr", "weight_decay"))
    assert torch.autograd.gradcheck(f, (_h(0.01), _h(0.05)))
    f = _unrolled(RMSprop(centered=True), ("lr", "alpha", "momentum", "weight_decay"))
    assert torch.autograd.gradcheck(f, (_h(0.01), _h(0.9), _h(0.5), _h(0.05)))


def test_gradcheck_per_element_lr():
    params, x, y = make_problem()
    grads = grads_of(params, x, y)
    rule = Adam()
    state = rule.init_state(params)

    def f(lr_w1):
        u, _ = rule(params, grads, {"lr": {"w1": lr_w1, "b1": 0.1, "w2": 0.1, "b2": 0.1}}, state)
        return (params["w1"] - u["w1"]) ** 2

    assert torch.autograd.gradcheck(f, (torch.rand(5, 3, dtype=DT, requires_grad=True),))


def test_gradient_flows_to_params_and_grads():
    params, x, y = make_problem()
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    grads = {k: torch.randn_like(v).requires_grad_() for k, v in params.items()}
    for rule in (SGD(momentum=0.9, weight_decay=0.1), Adam(weight_decay=0.1), AdamW(), RMSprop(centered=True)):
        u, _ = rule(params, grads, {}, rule.init_state(params))
        total = sum(v.sum() for v in u.values())
        gp = torch.autograd.grad(total, list(params.values()) + list(grads.values()), allow_unused=True)
        assert all(g is not None for g in gp[len(params) :]), type(rule).__name__
        if not isinstance(rule, RMSprop):
            assert all(g is not None for g in gp[: len(params)]), type(rule).__name__


def test_zero_gradient_entries_give_finite_hypergradient():
    params, _, _ = make_problem()
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    grads["w1"] = torch.randn_like(params["w1"]).requires_grad_()
    b2 = _h(0.999)
    u, _ = Adam()(params, grads, {"beta2": b2}, Adam().init_state(params))
    g = torch.autograd.grad(sum(v.sum() for v in u.values()), [b2, grads["w1"]])
    assert all(torch.isfinite(t).all() for t in g)


def test_detach_state():
    params, x, y = make_problem()
    lr = _h(0.1)
    u, state = SGD(momentum=0.9)(params, grads_of(params, x, y), {"lr": lr}, SGD(momentum=0.9).init_state(params))
    d = detach_state(state)
    assert set(d) == set(state) and not any(v.requires_grad for v in d["momentum_buffer"].values())
    assert torch.equal(d["step"], torch.tensor(1))


# --------------------------------------------------------------------------- 4. torch.func


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "no-grad"])
@pytest.mark.parametrize(
    "rule",
    [SGD(momentum=0.9, nesterov=True), Adam(weight_decay=0.01), AdamW(), RMSprop(centered=True, momentum=0.5)],
    ids=lambda r: type(r).__name__,
)
def test_vmap_matches_loop(rule, graph):
    """``vmap`` over members gives each member's own trajectory; with grad off (``graph=False``) the rules see
    batched tensors and keep their per-tensor loop instead of the fused path."""
    inits = [make_problem(seed)[0] for seed in range(3)]
    _, x, y = make_problem()
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=DT)

    def run(params, lr):
        state = rule.init_state(params)
        for _ in range(3):
            with torch.enable_grad():
                grads = fgrad(loss_fn)(params, x, y)
            u, state = rule(params, grads, {"lr": lr}, state)
            params = apply(params, u)
        return params

    stacked = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
    with torch.set_grad_enabled(graph):
        batched = vmap(run)(stacked, lrs)
        for i in range(3):
            single = run(inits[i], lrs[i])
            for k in single:
                torch.testing.assert_close(batched[k][i], single[k], atol=1e-12, rtol=0)


def test_func_grad_of_hyperparameter_matches_autograd():
    f = _unrolled(Adam(), ("lr", "beta1"), steps=2)
    lr, b1 = _h(0.01), _h(0.9)
    ref = torch.autograd.grad(f(lr, b1), [lr, b1])
    params0, x, y = make_problem()

    def g(lr, b1):
        params = dict(params0)
        rule = Adam()
        state = rule.init_state(params)
        for _ in range(2):
            grads = fgrad(loss_fn)(params, x, y)
            u, state = rule(params, grads, {"lr": lr, "beta1": b1}, state)
            params = apply(params, u)
        return sum(v.sum() for v in params.values())

    got = fgrad(g, argnums=(0, 1))(lr.detach(), b1.detach())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- 5. errors


def test_unknown_hparam_name():
    params, x, y = make_problem()
    grads = grads_of(params, x, y)
    with pytest.raises(ValueError, match="learning_rate"):
        SGD()(params, grads, {"learning_rate": torch.tensor(0.1)}, SGD().init_state(params))
    with pytest.raises(ValueError, match="nesterov"):
        SGD()(params, grads, {"nesterov": torch.tensor(1.0)}, SGD().init_state(params))


def test_missing_param_in_mapping():
    params, x, y = make_problem()
    grads = grads_of(params, x, y)
    lr = {"w1": torch.tensor(0.1), "b1": torch.tensor(0.1), "w2": torch.tensor(0.1)}
    with pytest.raises(ValueError, match=r"'lr'.*'b2'"):
        Adam()(params, grads, {"lr": lr}, Adam().init_state(params))
    with pytest.raises(ValueError, match="unknown parameter name"):
        Adam()(
            params, grads, {"lr": {**lr, "b2": torch.tensor(0.1), "zz": torch.tensor(0.1)}}, Adam().init_state(params)
        )


def test_bad_shape():
    params, x, y = make_problem()
    grads = grads_of(params, x, y)
    lr = {k: torch.tensor(0.1) for k in params}
    lr["w1"] = torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"'lr'.*'w1'.*\(3, 5\)"):
        SGD()(params, grads, {"lr": lr}, SGD().init_state(params))
    # a non-mapping tensor must broadcast to every parameter
    with pytest.raises(ValueError, match=r"'momentum'.*'b1'"):
        SGD()(params, grads, {"momentum": torch.ones(3)}, SGD().init_state(params))
    # a value that would enlarge the parameter is refused too
    with pytest.raises(ValueError, match="does not broadcast"):
        resolve(torch.ones(2, 5), "b1", params["b1"], hparam="lr")


def test_resolve_shape_check_is_torch_broadcasting():
    """The written-out check accepts exactly the shapes that broadcast to the parameter's without enlarging it."""
    import itertools

    like = torch.zeros(3, 1, 4)
    for n in range(5):
        for o in itertools.product((1, 3, 4, 2), repeat=n):
            try:
                fits = torch.broadcast_shapes(o, like.shape) == like.shape
            except RuntimeError:
                fits = False
            if fits:
                assert resolve(torch.zeros(o), "w", like).shape == o
            else:
                with pytest.raises(ValueError, match="does not broadcast"):
                    resolve(torch.zeros(o), "w", like)


def test_resolve_and_misc():
    p = torch.zeros(2, 3, dtype=DT)
    assert resolve(0.1, "p", p).dtype == DT
    t = torch.tensor(0.5)
    assert resolve({"p": t}, "p", p) is t
    assert resolve(t, "p") is t
    with pytest.raises(ValueError, match="dampening"):
        SGD(momentum=0.9, dampening=0.1, nesterov=True)
    assert isinstance(SGD(), UpdateRule) and isinstance(RMSprop(), UpdateRule)
    assert Adam().hyperparameters == ("lr", "beta1", "beta2", "eps", "weight_decay")
    params, x, y = make_problem()
    with pytest.raises(ValueError, match="grads"):
        SGD()(params, {"w1": params["w1"]}, {}, SGD().init_state(params))
    with pytest.raises(AttributeError):
        SGD().lr = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- 6. torch.optim parameter groups and state

GROUP_NAMES = (("w1",), ("b1", "b2"), ("w2",))


def _make_opt(opt_cls, defaults, per_group, dtype=DT):
    """A fresh problem: leaves named like make_problem's, and ``opt_cls`` over the three GROUP_NAMES groups."""
    params, x, y = make_problem()
    leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in params.items()}
    groups = [{"params": [leaves[k] for k in names], **over} for names, over in zip(GROUP_NAMES, per_group)]
    return opt_cls(groups, **defaults), leaves, x.to(dtype), y.to(dtype)


def _torch_steps(opt, leaves, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        loss_fn(leaves, x, y).backward()
        opt.step()


def _twin_steps(rule, params, state, x, y, n):
    for _ in range(n):
        u, state = rule(params, grads_of(params, x, y), {}, state)
        params = {k: v.detach() for k, v in apply(params, u).items()}
        state = detach_state(state)
    return params, state


def _weights(leaves):
    return {k: v.detach().clone() for k, v in leaves.items()}


def _assert_weights(a, b, atol):
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


GROUP_CASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1), [dict(), dict(lr=0.05), dict(lr=0.2)]),
    "sgd-momentum": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9),
        [dict(), dict(lr=0.05, momentum=0.5), dict(momentum=0.0)],
    ),
    "sgd-dampening": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, dampening=0.3),
        [dict(), dict(momentum=0.0, weight_decay=0.05), dict(momentum=0.7, weight_decay=0.1)],
    ),
    "sgd-nesterov": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9, nesterov=True),
        [dict(), dict(momentum=0.5, lr=0.05), dict(momentum=0.8, lr=0.2)],
    ),
    "sgd-weight-decay": (
        torch.optim.SGD,
        dict(lr=0.1, momentum=0.9),
        [dict(weight_decay=0.05), dict(weight_decay=0.0), dict(weight_decay=0.1)],
    ),
    "adam": (torch.optim.Adam, dict(lr=0.01), [dict(weight_decay=0.1), dict(weight_decay=0.0, lr=0.02), dict()]),
    "adam-amsgrad": (
        torch.optim.Adam,
        dict(lr=0.01, amsgrad=True, weight_decay=0.05),
        [dict(betas=(0.8, 0.99)), dict(lr=0.03), dict(betas=(0.5, 0.9), weight_decay=0.0)],
    ),
    "adam-decoupled": (
        torch.optim.Adam,
        dict(lr=0.01, decoupled_weight_decay=True),
        [dict(weight_decay=0.1), dict(weight_decay=0.0), dict(lr=0.02, weight_decay=0.05)],
    ),
    "adamw": (
        torch.optim.AdamW,
        dict(lr=0.01),
        [dict(weight_decay=0.1), dict(weight_decay=0.0), dict(lr=torch.tensor(0.03, dtype=DT))],
    ),
    "adamw-amsgrad": (
        torch.optim.AdamW,
        dict(lr=0.01, amsgrad=True),
        [dict(lr=0.02), dict(weight_decay=0.0), dict(betas=(0.8, 0.95))],
    ),
    "rmsprop": (torch.optim.RMSprop, dict(lr=0.01), [dict(weight_decay=0.1), dict(lr=0.02), dict(alpha=0.9)]),
    "rmsprop-centered-momentum": (
        torch.optim.RMSprop,
        dict(lr=0.01, centered=True, momentum=0.5),
        [dict(weight_decay=0.1), dict(momentum=0.0), dict(momentum=0.9, lr=0.02)],
    ),
    "rmsprop-momentum": (
        torch.optim.RMSprop,
        dict(lr=0.01, momentum=0.9, weight_decay=0.01),
        [dict(), dict(momentum=0.5, weight_decay=0.0), dict(alpha=0.9, eps=1e-6)],
    ),
}


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_twin_of_param_groups_steps_like_torch(case):
    """(a) From fresh states, the twin with its per-group values takes torch's 5 steps."""
    opt_cls, defaults, per_group = GROUP_CASES[case]
    opt, leaves, x, y = _make_opt(opt_cls, defaults, per_group)
    tw = twin(opt, leaves)
    assert tw.groups == GROUP_NAMES and tw.per_param  # every case has a hyperparameter differing across groups
    rule = tw.with_defaults()
    params, state = _weights(leaves), rule.init_state(leaves)
    for _ in range(5):
        _torch_steps(opt, leaves, x, y, 1)
        params, state = _twin_steps(rule, params, state, x, y, 1)
        _assert_weights(params, _weights(leaves), atol=1e-12)


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_state_from_torch_continues_like_torch(case):
    """(b) torch steps 3 times; the twin, from state_from_torch, continues 4 steps as torch does."""
    opt_cls, defaults, per_group = GROUP_CASES[case]
    opt, leaves, x, y = _make_opt(opt_cls, defaults, per_group)
    rule = twin(opt, leaves).with_defaults()
    _torch_steps(opt, leaves, x, y, 3)
    state = state_from_torch(opt, leaves, rule)
    assert state["step"].dtype == torch.int64 and state["step"].dim() == 0
    # torch counts no SGD steps: the twin's step only tells whether the first momentum step was taken
    expected = (1 if defaults.get("momentum") else 0) if opt_cls is torch.optim.SGD else 3
    assert int(state["step"]) == expected
    for key, buf in state.items():  # copies, not torch's tensors
        if isinstance(buf, dict):
            assert all(buf[k].data_ptr() != opt.state[leaves[k]].get(key, torch.empty(0)).data_ptr() for k in buf)
    params, _ = _twin_steps(rule, _weights(leaves), state, x, y, 4)
    _torch_steps(opt, leaves, x, y, 4)
    _assert_weights(params, _weights(leaves), atol=1e-12)


@pytest.mark.parametrize("case", list(GROUP_CASES))
def test_state_to_torch_continues_like_the_twin(case):
    """(c) The twin steps 3 times; torch, from state_to_torch, continues 4 steps as the twin does."""
    opt_cls, defaults, per_group = GROUP_CASES[case]
    opt, leaves, x, y = _make_opt(opt_cls, defaults, per_group)
    rule = twin(opt, leaves).with_defaults()
    params, state = _twin_steps(rule, _weights(leaves), rule.init_state(leaves), x, y, 3)
    with torch.no_grad():
        for k, p in leaves.items():
            p.copy_(params[k])
    state_to_torch(state, opt, leaves, rule)
    _torch_steps(opt, leaves, x, y, 4)
    params, _ = _twin_steps(rule, params, state, x, y, 4)
    _assert_weights(params, _weights(leaves), atol=1e-12)


@pytest.mark.parametrize("case", ["sgd-dampening", "adam-amsgrad", "adamw", "rmsprop-centered-momentum"])
def test_state_round_trip_float32_matches_torchs_own_state(case):
    """float32: written-back state has torch's own keys, dtypes and devices (step: a float32 CPU tensor, one per
    parameter), holds copies, and torch continues from it within 1e-6; reading it back gives the twin's state."""
    opt_cls, defaults, per_group = GROUP_CASES[case]
    per_group = [{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in g.items()} for g in per_group]
    native, nleaves, x, y = _make_opt(opt_cls, defaults, per_group, dtype=torch.float32)
    _torch_steps(native, nleaves, x, y, 3)
    opt, leaves, _, _ = _make_opt(opt_cls, defaults, per_group, dtype=torch.float32)
    rule = twin(opt, leaves).with_defaults()
    params, state = _twin_steps(rule, _weights(leaves), rule.init_state(leaves), x, y, 3)
    _assert_weights(params, _weights(nleaves), atol=1e-6)
    with torch.no_grad():
        for k, p in leaves.items():
            p.copy_(params[k])
    state_to_torch(state, opt, leaves, rule)
    steps = []
    for k in leaves:
        ours, theirs = opt.state[leaves[k]], native.state[nleaves[k]]
        # every buffer the twin holds is written, also where a group without momentum does not read it
        assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= (
            {"momentum_buffer"} if k in ("b1", "b2") else set()
        )
        for key, v in theirs.items():
            if v is None:
                assert ours[key] is None
                continue
            assert (ours[key].dtype, ours[key].device, ours[key].shape) == (v.dtype, v.device, v.shape), (k, key)
            torch.testing.assert_close(ours[key], v, atol=1e-6, rtol=1e-5)
            if key != "step":
                assert ours[key].data_ptr() != state[key][k].data_ptr()
        if "step" in ours:
            assert ours["step"].dtype == torch.float32 and ours["step"].device.type == "cpu"
            steps.append(ours["step"])
    assert len({id(s) for s in steps}) == len(steps)  # torch increments each in place
    back = state_from_torch(opt, leaves, rule)
    assert torch.equal(back["step"], state["step"]) or opt_cls is torch.optim.SGD
    for key, buf in state.items():
        if isinstance(buf, dict):
            for k in buf:
                torch.testing.assert_close(back[key][k], buf[k], atol=0, rtol=0)
    _torch_steps(opt, leaves, x, y, 4)
    params, _ = _twin_steps(rule, params, state, x, y, 4)
    _assert_weights(params, _weights(leaves), atol=1e-6)


def test_twin_values_fields_and_from_torch():
    opt, leaves, _, _ = _make_opt(*GROUP_CASES["sgd-dampening"])
    tw = twin(opt, leaves)
    # the momentum-0 group (torch: no buffer, dampening ignored) runs with dampening 0
    assert tw.per_param["momentum"] == {"w1": 0.9, "b1": 0.0, "b2": 0.0, "w2": 0.7}
    assert tw.per_param["dampening"] == {"w1": 0.3, "b1": 0.0, "b2": 0.0, "w2": 0.3}
    assert "lr" not in tw.per_param and tw.rule.lr == 0.1  # equal across groups: a field
    assert tw.group_values["dampening"] == (0.3, 0.3, 0.3) and tw.group_values["momentum"] == (0.9, 0.0, 0.7)
    assert tw.names == ("w1", "b1", "b2", "w2")
    opt, leaves, _, _ = _make_opt(torch.optim.SGD, dict(lr=0.1), [dict(momentum=0.0), dict(momentum=0.5), dict()])
    assert twin(opt, leaves).rule.momentum == 0.5  # first non-zero: the rule allocates the buffer
    opt, leaves, _, _ = _make_opt(*GROUP_CASES["adamw"])
    tw = twin(opt, leaves)
    assert isinstance(tw.rule, AdamW) and tw.per_param["lr"]["w2"] == 0.03 and type(tw.per_param["lr"]["w2"]) is float
    opt, leaves, _, _ = _make_opt(*GROUP_CASES["adam-decoupled"])
    assert isinstance(twin(opt, leaves).rule, AdamW)
    opt, leaves, _, _ = _make_opt(*GROUP_CASES["adam-amsgrad"])
    tw = twin(opt, leaves)
    assert tw.per_param["beta1"]["w1"] == 0.8 and tw.rule.amsgrad and "eps" not in tw.per_param
    # parameters of `named` the optimiser does not hold are left out
    extra = dict(leaves, frozen=torch.zeros(2, dtype=DT))
    assert twin(opt, extra).groups == GROUP_NAMES
    # from_torch: unchanged for one set of values, refuses groups that differ
    leaves = {k: v.clone().requires_grad_() for k, v in make_problem()[0].items()}
    assert from_torch(torch.optim.Adam(list(leaves.values()), lr=0.02, betas=(0.8, 0.9))) == Adam(
        lr=0.02, beta1=0.8, beta2=0.9
    )
    assert isinstance(from_torch(torch.optim.Adam(list(leaves.values()), decoupled_weight_decay=True)), AdamW)
    with pytest.raises(ValueError, match=r"differ in \['lr'\].*twin"):
        from_torch(torch.optim.SGD([{"params": [leaves["w1"]], "lr": 0.2}, {"params": [leaves["b1"]]}], lr=0.1))


def test_twin_and_state_refusals():
    leaves = {k: v.clone().requires_grad_() for k, v in make_problem()[0].items()}
    a, b = [leaves["w1"], leaves["b1"]], [leaves["w2"], leaves["b2"]]
    sgd = torch.optim.SGD([{"params": a, "nesterov": True}, {"params": b, "nesterov": False}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="structural option 'nesterov'"):
        twin(sgd, leaves)
    adam = torch.optim.Adam([{"params": a, "amsgrad": True}, {"params": b}], lr=0.1)
    with pytest.raises(ValueError, match="structural option 'amsgrad'"):
        twin(adam, leaves)
    with pytest.raises(ValueError, match="maximize"):
        twin(torch.optim.Adam([{"params": a}, {"params": b, "maximize": True}]), leaves)
    with pytest.raises(ValueError, match="maximize"):
        from_torch(torch.optim.SGD(a + b, lr=0.1, maximize=True))
    with pytest.raises(ValueError, match=r"`named` lacks.*group 1, parameter 1 \(shape \(1,\)\)"):
        twin(torch.optim.SGD([{"params": a}, {"params": b}], lr=0.1), {k: leaves[k] for k in ("w1", "b1", "w2")})
    with pytest.raises(ValueError, match="LBFGS"):
        twin(torch.optim.LBFGS(a), leaves)
    # per-parameter step counts that differ: torch skips a parameter without a gradient
    _, x, y = make_problem()
    for opt in (torch.optim.Adam(a + b, lr=0.01), torch.optim.SGD(a + b, lr=0.01, momentum=0.9)):
        rule = twin(opt, leaves).rule
        assert state_from_torch(opt, leaves, rule)["step"] == 0  # never stepped
        opt.zero_grad()
        loss_fn(leaves, x, y).backward()
        leaves["w2"].grad = None
        opt.step()
        with pytest.raises(ValueError, match=r"different numbers of steps.*'w2'"):
            state_from_torch(opt, leaves, rule)
    # a rule that is not the optimiser's twin
    with pytest.raises(ValueError, match="not the twin"):
        state_from_torch(torch.optim.Adam(a + b), leaves, SGD())
    with pytest.raises(ValueError, match="amsgrad=False"):
        state_to_torch(Adam().init_state(leaves), torch.optim.Adam(a + b, amsgrad=True), leaves, Adam())
    # torch needs a momentum buffer the twin's state lacks
    opt = torch.optim.SGD(a + b, lr=0.1, momentum=0.9)
    _, st = SGD(lr=0.1)(leaves, grads_of(leaves, x, y), {}, SGD().init_state(leaves))
    with pytest.raises(ValueError, match="lacks 'momentum_buffer'"):
        state_to_torch(st, opt, leaves, SGD(lr=0.1, momentum=0.9))


def test_sgd_first_step_round_trip():
    """torch's momentum buffer None (before the first step) is the twin's step 0, both ways."""
    opt, leaves, x, y = _make_opt(*GROUP_CASES["sgd-momentum"])
    rule = twin(opt, leaves).with_defaults()
    fresh = state_from_torch(opt, leaves, rule)
    assert int(fresh["step"]) == 0 and all(
        torch.equal(v, torch.zeros_like(v)) for v in fresh["momentum_buffer"].values()
    )
    _torch_steps(opt, leaves, x, y, 2)
    stepped = state_from_torch(opt, leaves, rule)
    assert int(stepped["step"]) == 1
    torch.testing.assert_close(stepped["momentum_buffer"]["w1"], opt.state[leaves["w1"]]["momentum_buffer"])
    state_to_torch(rule.init_state(leaves), opt, leaves, rule)  # step 0: torch's never-stepped state
    assert all(leaves[k] not in opt.state for k in leaves)
    before = _weights(leaves)
    _torch_steps(opt, leaves, x, y, 1)  # torch's first step again: buffer = d
    params, _ = _twin_steps(rule, before, rule.init_state(leaves), x, y, 1)
    _assert_weights(params, _weights(leaves), atol=1e-12)


def test_with_defaults_fills_untuned_values_and_keeps_the_graph():
    opt, leaves, x, y = _make_opt(*GROUP_CASES["adam-amsgrad"])
    tw = twin(opt, leaves)
    rule = tw.with_defaults()
    params = _weights(leaves)
    grads = grads_of(params, x, y)
    # delegation: hyperparameters, fields, init_state; no state_dict where the rule has none
    assert rule.hyperparameters == Adam.hyperparameters and rule.amsgrad and rule.lr == tw.rule.lr
    assert isinstance(rule, UpdateRule) and not hasattr(rule, "state_dict")
    assert set(rule.init_state(params)) == set(tw.rule.init_state(params))
    # a tuned per-group lr requiring grad: same u and gradient as spelling every value out
    lr_groups = [torch.tensor(v, dtype=DT, requires_grad=True) for v in (0.01, 0.02, 0.005)]
    lr = {k: lr_groups[i] for i, names in enumerate(tw.groups) for k in names}
    u, _ = rule(params, grads, {"lr": lr}, rule.init_state(params))
    full = {h: {k: torch.tensor(v, dtype=DT) for k, v in m.items()} for h, m in tw.per_param.items()}
    u_ref, _ = tw.rule(params, grads, {**full, "lr": lr}, tw.rule.init_state(params))
    for k in params:
        torch.testing.assert_close(u[k], u_ref[k], atol=0, rtol=0)
    g = torch.autograd.grad(sum(v.sum() for v in u.values()), lr_groups)
    g_ref = torch.autograd.grad(sum(v.sum() for v in u_ref.values()), lr_groups)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        assert a != 0
    # a mapping covering some parameters: the others keep their group's value
    part, _ = rule(params, grads, {"beta1": {"w1": torch.tensor(0.8, dtype=DT)}}, rule.init_state(params))
    plain, _ = rule(params, grads, {}, rule.init_state(params))
    for k in params:
        torch.testing.assert_close(part[k], plain[k], atol=0, rtol=0)
    # gradcheck through the wrapper (a tuned scalar weight decay)
    state = rule.init_state(params)
    assert torch.autograd.gradcheck(
        lambda wd: rule(params, grads, {"weight_decay": wd}, state)[0]["w1"],
        (torch.tensor(0.05, dtype=DT, requires_grad=True),),
    )
    with pytest.raises(ValueError, match="momentum"):
        WithDefaults(Adam(), {"momentum": 0.9})
    # a float for every parameter
    u_f, _ = WithDefaults(SGD(), {"lr": 0.5})(params, grads)
    torch.testing.assert_close(u_f["w1"], 0.5 * grads["w1"])


def test_group_granularity_drives_the_twin():
    """hparams' "group" granularity over TorchTwin.groups, started from group_values, steps like torch."""
    opt, leaves, x, y = _make_opt(*GROUP_CASES["sgd-momentum"])
    tw = twin(opt, leaves)
    space = HyperParameterSpace(
        [for_rule("lr", "group", groups=tw.groups), for_rule("momentum", "group", groups=tw.groups)]
    )
    raw = space.from_natural(leaves, {"lr": tw.group_values["lr"], "momentum": tw.group_values["momentum"]})
    assert sorted(raw) == [
        "lr/group0",
        "lr/group1",
        "lr/group2",
        "momentum/group0",
        "momentum/group1",
        "momentum/group2",
    ]
    nat = space.natural(raw, leaves)
    rule = tw.with_defaults()
    params, state = _weights(leaves), rule.init_state(leaves)
    for _ in range(3):
        _torch_steps(opt, leaves, x, y, 1)
        u, state = rule(params, grads_of(params, x, y), nat, state)
        params = apply(params, u)
    # momentum 0 is moved 1e-6 inside logit's domain
    _assert_weights({k: v.detach() for k, v in params.items()}, _weights(leaves), atol=1e-6)


# --------------------------------------------------------------------------- the fused (no-graph) path


def _hparam_forms(seed: int) -> list[dict]:
    """Hyperparameters as the tuner passes them: none, 0-d tensors, per-tensor mappings, per-element values."""
    params, _, _ = make_problem(seed)
    g = torch.Generator().manual_seed(seed + 100)
    return [
        {},
        {"lr": torch.tensor(0.07, dtype=DT), "momentum": torch.tensor(0.6, dtype=DT)},
        {"lr": {k: torch.tensor(0.01 * (i + 1), dtype=DT) for i, k in enumerate(params)}},
        {"weight_decay": {k: torch.rand(v.shape, generator=g, dtype=DT) * 0.1 for k, v in params.items()}},
        {"dampening": torch.tensor(0.2, dtype=DT), "lr": torch.tensor(0.03, dtype=DT)},
    ]


@pytest.mark.parametrize("opts", SGD_CASES, ids=str)
@pytest.mark.parametrize("form", range(5))
def test_sgd_fused_path_is_the_per_tensor_loop_bit_for_bit(opts, form, monkeypatch):
    """Under ``no_grad`` on a CPU, SGD takes one ``torch._foreach_*`` call per operation: the same trajectory,
    bit for bit, as the differentiable per-tensor loop, for every option and hyperparameter form."""
    hp = _hparam_forms(0)[form]
    if opts.get("nesterov") and "dampening" in hp:
        hp = {k: v for k, v in hp.items() if k != "dampening"}
    rule = SGD(**opts)
    loop = run_rule(rule, hp)
    calls = []
    fused_step = SGD._fused
    monkeypatch.setattr(SGD, "_fused", lambda self, *a: calls.append(1) or fused_step(self, *a))
    fused = run_rule(rule, hp, graph=False)
    assert len(calls) == STEPS  # the fused path ran at every step
    for a, b in zip(loop, fused):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_sgd_fused_path_matches_torch_optim():
    opts = dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=0.05)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, **opts), lambda leaves: list(leaves.values()))
    assert_traj_close(run_rule(SGD(**opts), {}, graph=False), ref)


def test_sgd_keeps_the_loop_where_a_graph_is_recorded(monkeypatch):
    """With grad enabled the fused path is never taken, and the result is differentiable in the hyperparameters."""
    params, x, y = make_problem(0)
    lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
    calls = []
    fused_step = SGD._fused
    monkeypatch.setattr(SGD, "_fused", lambda self, *a: calls.append(1) or fused_step(self, *a))
    u, _ = SGD(momentum=0.9)(params, grads_of(params, x, y), {"lr": lr}, None)
    assert calls == [] and all(v.requires_grad for v in u.values())
    (g,) = torch.autograd.grad(sum(v.sum() for v in u.values()), lr)
    assert float(g) == pytest.approx(float(sum(v.detach().sum() for v in u.values())) / 0.1, rel=1e-12)


ADAM_FORMS = [
    {},
    {"lr": torch.tensor(0.02, dtype=DT), "beta1": torch.tensor(0.7, dtype=DT), "eps": torch.tensor(1e-3, dtype=DT)},
    {"beta2": {k: torch.tensor(0.9 + 0.01 * i, dtype=DT) for i, k in enumerate(("w1", "b1", "w2", "b2"))}},
    {
        "weight_decay": torch.tensor(0.03, dtype=DT),
        "lr": {k: torch.tensor(0.005, dtype=DT) for k in ("w1", "b1", "w2", "b2")},
    },
]


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("opts", ADAM_CASES, ids=str)
@pytest.mark.parametrize("form", range(len(ADAM_FORMS)))
def test_adam_fused_path_is_the_per_tensor_loop_bit_for_bit(name, opts, form, monkeypatch):
    """Adam and AdamW (AMSGrad too) under ``no_grad`` on a CPU: the same trajectory as the per-tensor loop, bit for
    bit, for scalar, per-tensor and mapped hyperparameters."""
    from bilevel.updates import adam as adam_module

    rule = {"Adam": Adam, "AdamW": AdamW}[name](**opts)
    loop = run_rule(rule, ADAM_FORMS[form])
    calls = []
    fused_step = adam_module._adam_fused
    monkeypatch.setattr(adam_module, "_adam_fused", lambda *a: calls.append(1) or fused_step(*a))
    fused = run_rule(rule, ADAM_FORMS[form], graph=False)
    assert len(calls) == STEPS
    for a, b in zip(loop, fused):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_adam_fused_path_matches_torch_optim_and_keeps_safe_sqrt_at_zero():
    opts = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, amsgrad=True)
    ref = run_torch(lambda ps: torch.optim.Adam(ps, **opts), lambda leaves: list(leaves.values()))
    assert_traj_close(run_rule(Adam(**opts), {}, graph=False), ref)
    # zero, NaN and inf gradient entries: the fused _safe_sqrt gives the loop's values (0 for NaN, not NaN)
    w = {"w": torch.ones(4, dtype=DT)}
    g = {"w": torch.tensor([0.0, math.nan, math.inf, 2.0], dtype=DT)}
    u_loop, s_loop = Adam(amsgrad=True)(w, g, {}, None)
    with torch.no_grad():
        u_fused, s_fused = Adam(amsgrad=True)(w, g, {}, None)
    torch.testing.assert_close(u_fused, u_loop, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(s_fused, s_loop, rtol=0, atol=0, equal_nan=True)
    assert float(u_fused["w"][0]) == 0.0


RMS_FORMS = [
    {},
    {"lr": torch.tensor(0.02, dtype=DT), "alpha": torch.tensor(0.95, dtype=DT), "eps": torch.tensor(1e-3, dtype=DT)},
    {"momentum": {k: torch.tensor(0.3 + 0.1 * i, dtype=DT) for i, k in enumerate(("w1", "b1", "w2", "b2"))}},
    {"weight_decay": torch.tensor(0.03, dtype=DT)},
]


@pytest.mark.parametrize("opts", RMS_CASES, ids=str)
@pytest.mark.parametrize("form", range(len(RMS_FORMS)))
def test_rmsprop_fused_path_is_the_per_tensor_loop_bit_for_bit(opts, form, monkeypatch):
    rule = RMSprop(**opts)
    loop = run_rule(rule, RMS_FORMS[form])
    calls = []
    fused_step = RMSprop._fused
    monkeypatch.setattr(RMSprop, "_fused", lambda self, *a: calls.append(1) or fused_step(self, *a))
    fused = run_rule(rule, RMS_FORMS[form], graph=False)
    assert len(calls) == STEPS
    for a, b in zip(loop, fused):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    ref = run_torch(lambda ps: torch.optim.RMSprop(ps, **opts), lambda leaves: list(leaves.values()))
    if not RMS_FORMS[form]:
        assert_traj_close(fused, ref)
