"""Tests for bilevel.updates: torch.optim parity, granularity, differentiability, vmap, errors."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad as fgrad
from torch.func import vmap

from bilevel.updates import SGD, Adam, AdamW, RMSprop, UpdateRule, apply, detach_state, resolve

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


def run_rule(rule: UpdateRule, hparams, steps=STEPS, seed=0):
    params, x, y = make_problem(seed)
    state = rule.init_state(params)
    traj = []
    for _ in range(steps):
        grads = grads_of(params, x, y)
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


@pytest.mark.parametrize(
    "rule",
    [SGD(momentum=0.9, nesterov=True), Adam(weight_decay=0.01), AdamW(), RMSprop(centered=True, momentum=0.5)],
    ids=lambda r: type(r).__name__,
)
def test_vmap_matches_loop(rule):
    inits = [make_problem(seed)[0] for seed in range(3)]
    _, x, y = make_problem()
    lrs = torch.tensor([0.01, 0.05, 0.1], dtype=DT)

    def run(params, lr):
        state = rule.init_state(params)
        for _ in range(3):
            grads = fgrad(loss_fn)(params, x, y)
            u, state = rule(params, grads, {"lr": lr}, state)
            params = apply(params, u)
        return params

    stacked = {k: torch.stack([p[k] for p in inits]) for k in inits[0]}
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
