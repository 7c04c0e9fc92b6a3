import math

import pytest
import torch

from bilevel.hparams import (
    CLARKE_TABLE5,
    IDENTITY,
    LOG,
    LOG10,
    LOGIT,
    SOFTPLUS,
    Granularity,
    HyperParameter,
    HyperParameterSpace,
    for_rule,
    get_transform,
    learning_rate,
    momentum,
    per_weight_decay,
    weight_decay,
)

DT = torch.float64
ALL = [IDENTITY, LOG10, LOG, LOGIT, SOFTPLUS]


def make_params():
    g = torch.Generator().manual_seed(0)
    return {
        "w1": torch.randn(3, 4, generator=g, dtype=DT),
        "b1": torch.randn(4, generator=g, dtype=DT),
        "w2": torch.randn(4, 2, generator=g, dtype=DT),
    }


@pytest.mark.parametrize("t", ALL, ids=lambda t: t.name)
def test_transform_roundtrip_and_gradcheck(t):
    raw = torch.linspace(-3, 3, 13, dtype=DT)
    torch.testing.assert_close(t.inverse(t.forward(raw)), raw)
    lo, hi = t.domain
    nat = torch.linspace(max(lo, -3.0) + 0.05, min(hi, 3.0) - 0.05, 11, dtype=DT)
    torch.testing.assert_close(t.forward(t.inverse(nat)), nat)
    assert torch.autograd.gradcheck(t.forward, (raw.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(t.inverse, (nat.clone().requires_grad_(),))


def test_transform_values_and_lookup():
    x = torch.tensor([-2.0, 0.0, 1.5], dtype=DT)
    torch.testing.assert_close(LOG10(x), torch.tensor([1e-2, 1.0, 10**1.5], dtype=DT))
    torch.testing.assert_close(LOGIT(x), torch.sigmoid(x))
    torch.testing.assert_close(
        SOFTPLUS.inverse(torch.tensor(1e-8, dtype=DT)), torch.log(torch.expm1(torch.tensor(1e-8, dtype=DT)))
    )
    assert get_transform("log10") is LOG10 and get_transform(LOGIT) is LOGIT
    with pytest.raises(ValueError, match="known transforms.*log10"):
        get_transform("log2")


def test_clarke_init_ranges():
    params = {"w": torch.zeros(2, dtype=DT)}
    g = torch.Generator().manual_seed(1)
    draws = [CLARKE_TABLE5.init(params, generator=g) for _ in range(2000)]
    lr = torch.stack([d["lr"] for d in draws])
    wd = torch.stack([d["weight_decay"] for d in draws])
    mu = torch.sigmoid(torch.stack([d["momentum"] for d in draws]))
    assert lr.dtype == DT and lr.min() >= -6 and lr.max() <= -1
    assert abs(lr.mean().item() + 3.5) < 0.1 and abs(lr.std().item() - 5 / math.sqrt(12)) < 0.1
    assert wd.min() >= -7 and wd.max() <= -2 and abs(wd.mean().item() + 4.5) < 0.1
    # momentum uniform on [0, 1] in natural space
    assert mu.min() > 0 and mu.max() < 1 and abs(mu.mean().item() - 0.5) < 0.03
    hist = torch.histc(mu, bins=4, min=0, max=1)
    assert (hist - 500).abs().max() < 80
    assert torch.isfinite(torch.stack([d["momentum"] for d in draws])).all()


def test_init_deterministic_and_dtype():
    params = make_params()
    space = HyperParameterSpace([learning_rate("element"), momentum()])
    a = space.init(params, generator=torch.Generator().manual_seed(5))
    b = space.init(params, generator=torch.Generator().manual_seed(5))
    c = space.init(params, generator=torch.Generator().manual_seed(6))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["momentum"], c["momentum"])
    f32 = space.init(params, generator=torch.Generator().manual_seed(5), dtype=torch.float32, requires_grad=True)
    assert all(v.dtype == torch.float32 and v.requires_grad and v.is_leaf for v in f32.values())


def test_key_naming_and_shapes():
    params = make_params()
    space = HyperParameterSpace([learning_rate("element"), weight_decay("tensor", params=("w1", "w2")), momentum()])
    raw = space.init(params, generator=torch.Generator().manual_seed(0))
    assert list(raw) == ["lr/w1", "lr/b1", "lr/w2", "weight_decay/w1", "weight_decay/w2", "momentum"]
    for p in params:
        assert raw[f"lr/{p}"].shape == params[p].shape
    assert raw["weight_decay/w1"].shape == () and raw["momentum"].shape == ()
    # shared init: one draw per hyperparameter
    lr_vals = torch.cat([raw[f"lr/{p}"].reshape(-1) for p in params])
    assert torch.all(lr_vals == lr_vals[0])
    assert raw["weight_decay/w1"] == raw["weight_decay/w2"]
    nat = space.natural(raw, params)
    assert set(nat) == {"lr", "weight_decay", "momentum"}
    assert isinstance(nat["momentum"], torch.Tensor)
    assert list(nat["lr"]) == ["w1", "b1", "w2"] and nat["lr"]["w1"].shape == (3, 4)
    assert list(nat["weight_decay"]) == ["w1", "w2"]
    # independent init
    raw2 = space.init(params, generator=torch.Generator().manual_seed(0), shared_init=False)
    assert raw2["lr/w1"].unique().numel() == 12
    assert raw2["lr/w1"].min() >= -6 and raw2["lr/w1"].max() <= -1


def test_granularity_enum_and_validation():
    assert per_weight_decay().granularity is Granularity.ELEMENT
    assert learning_rate("tensor").granularity == "tensor"
    with pytest.raises(ValueError, match="unique.*lr"):
        HyperParameterSpace([learning_rate(), learning_rate()])
    with pytest.raises(ValueError, match="granularity"):
        HyperParameter("x", LOG10, 0, 1, granularity="row")
    with pytest.raises(ValueError, match="clip"):
        HyperParameter("x", LOGIT, 0, 1, clip=(0.5, 2.0))
    with pytest.raises(ValueError, match="'/'"):
        HyperParameter("a/b", LOG10, 0, 1)
    space = HyperParameterSpace([weight_decay("tensor", params=("nope",))])
    with pytest.raises(ValueError, match="nope"):
        space.init(make_params())


def test_natural_key_errors():
    params = make_params()
    space = HyperParameterSpace([learning_rate(), per_weight_decay()])
    raw = space.init(params, generator=torch.Generator().manual_seed(0))
    bad = dict(raw)
    del bad["lr"]
    bad["bogus"] = torch.zeros(())
    with pytest.raises(ValueError, match=r"missing keys \['lr'\].*unexpected keys \['bogus'\]"):
        space.natural(bad)
    partial = {k: v for k, v in raw.items() if k != "weight_decay/b1"}
    space.natural(partial)  # without params, any subset of parameters is accepted
    with pytest.raises(ValueError, match="weight_decay/b1"):
        space.natural(partial, params)
    wrong = dict(raw, **{"weight_decay/w1": torch.zeros(2, dtype=DT)})
    with pytest.raises(ValueError, match="weight_decay/w1.*shape"):
        space.natural(wrong, params)


def test_clip_bounds():
    space = CLARKE_TABLE5
    raw = {
        "lr": torch.tensor(5.0, dtype=DT, requires_grad=True),
        "weight_decay": torch.tensor(-3.0, dtype=DT),
        "momentum": torch.tensor(0.0, dtype=DT),
    }
    nat = space.natural(raw)
    assert nat["lr"].item() == 1.0
    nat["lr"].backward()
    assert raw["lr"].grad.item() == 0.0  # clipped: no gradient, and no inf/nan
    low = space.natural(dict(raw, lr=torch.tensor(-400.0, dtype=DT)))["lr"]
    torch.testing.assert_close(low, torch.tensor(1e-10, dtype=DT))
    huge = torch.tensor(400.0, dtype=DT, requires_grad=True)
    space.natural(dict(raw, lr=huge))["lr"].backward()
    assert huge.grad.item() == 0.0
    # inside the box the gradient is d/dr 10**r = ln(10) 10**r
    r = torch.tensor(-2.0, dtype=DT, requires_grad=True)
    space.natural(dict(raw, lr=r))["lr"].backward()
    torch.testing.assert_close(r.grad, torch.tensor(math.log(10) * 1e-2, dtype=DT))
    assert nat["weight_decay"].item() == pytest.approx(1e-3)
    assert nat["momentum"].item() == 0.5


def test_from_natural_and_describe():
    params = make_params()
    space = HyperParameterSpace([learning_rate("tensor"), per_weight_decay(params=("w1",)), momentum()])
    wd_w1 = torch.full((3, 4), 1e-4, dtype=DT)
    raw = space.from_natural(
        params, {"lr": {"w1": 0.1, "b1": 0.01, "w2": 1e-3}, "weight_decay": wd_w1, "momentum": 0.9}
    )
    nat = space.natural(raw, params)
    torch.testing.assert_close(nat["lr"]["b1"], torch.tensor(0.01, dtype=DT))
    torch.testing.assert_close(nat["weight_decay"]["w1"], wd_w1)
    torch.testing.assert_close(nat["momentum"], torch.tensor(0.9, dtype=DT))
    d = space.describe(raw)
    assert d["lr"] == pytest.approx((0.1 + 0.01 + 1e-3) / 3)
    assert d["momentum"] == pytest.approx(0.9) and d["weight_decay"] == pytest.approx(1e-4)
    # boundary values are moved inside the open domain
    edge = space.from_natural(params, {"lr": 0.1, "weight_decay": 0.0, "momentum": 1.0})
    assert all(torch.isfinite(v).all() for v in edge.values())
    with pytest.raises(ValueError, match=r"missing \['momentum'\]"):
        space.from_natural(params, {"lr": 0.1, "weight_decay": 1e-4})


def test_natural_under_vmap_equals_loop():
    params = make_params()
    space = HyperParameterSpace([learning_rate("element"), weight_decay("tensor"), momentum()])
    g = torch.Generator().manual_seed(3)
    pop = [space.init(params, generator=g, shared_init=False) for _ in range(5)]
    pop[0]["lr/w1"][0, 0] = 3.0  # exercise the clip
    batched = {k: torch.stack([p[k] for p in pop]) for k in pop[0]}
    out = torch.func.vmap(space.natural)(batched)
    for i, p in enumerate(pop):
        ref = space.natural(p)
        torch.testing.assert_close(out["momentum"][i], ref["momentum"])
        for n in params:
            torch.testing.assert_close(out["lr"][n][i], ref["lr"][n])
            torch.testing.assert_close(out["weight_decay"][n][i], ref["weight_decay"][n])
    assert out["lr"]["w1"][0, 0, 0].item() == 1.0


def test_optimiser_updates_raw():
    params = make_params()
    space = HyperParameterSpace([learning_rate(), per_weight_decay()])
    raw = space.init(params, generator=torch.Generator().manual_seed(0), requires_grad=True)
    opt = torch.optim.SGD(list(raw.values()), lr=0.1)
    nat = space.natural(raw)
    loss = nat["lr"] + sum(v.sum() for v in nat["weight_decay"].values())
    loss.backward()
    before = {k: v.detach().clone() for k, v in raw.items()}
    opt.step()
    assert all(not torch.equal(before[k], raw[k]) for k in raw)


# --------------------------------------------------------------------------- group granularity

GROUPS = (("w1", "w2"), ("b1",))


def test_group_granularity_natural_maps_params_to_their_group():
    params = make_params()
    space = HyperParameterSpace([learning_rate("group", groups=GROUPS), momentum()])
    raw = space.from_natural(params, {"lr": [0.1, 0.01], "momentum": 0.9})
    assert list(raw) == ["lr/group0", "lr/group1", "momentum"]
    assert all(raw[k].shape == () and raw[k].dtype == DT for k in raw)
    assert space.shapes(params) == {"lr/group0": (), "lr/group1": (), "momentum": ()}
    nat = space.natural(raw, params)
    assert list(nat["lr"]) == ["w1", "w2", "b1"]
    assert nat["lr"]["w1"] is nat["lr"]["w2"]  # one tensor per group
    torch.testing.assert_close(nat["lr"]["w1"], torch.tensor(0.1, dtype=DT))
    torch.testing.assert_close(nat["lr"]["b1"], torch.tensor(0.01, dtype=DT))
    sel = space["lr"].select(raw)
    assert sel["w1"] is raw["lr/group0"] and sel["w2"] is raw["lr/group0"] and sel["b1"] is raw["lr/group1"]
    assert space["lr"].param_names(params) == ["w1", "w2", "b1"]
    assert space.describe(raw)["lr"] == pytest.approx((0.1 + 0.01) / 2)  # mean over groups, not parameters


def test_group_granularity_gradient_accumulates_per_group():
    params = make_params()
    space = HyperParameterSpace([learning_rate("group", groups=GROUPS, clip=None)])
    raw = space.from_natural(params, {"lr": [0.1, 0.01]}, requires_grad=True)
    nat = space.natural(raw)["lr"]
    c = {"w1": 2.0, "w2": -0.5, "b1": 3.0}
    sum(c[p] * nat[p] for p in nat).backward()
    # d/d raw_i of sum_p c_p 10**raw_i = ln(10) 10**raw_i * sum_{p in group i} c_p
    torch.testing.assert_close(raw["lr/group0"].grad, torch.tensor(math.log(10) * 0.1 * (2.0 - 0.5), dtype=DT))
    torch.testing.assert_close(raw["lr/group1"].grad, torch.tensor(math.log(10) * 0.01 * 3.0, dtype=DT))


def test_group_granularity_from_natural_init_check():
    params = make_params()
    space = HyperParameterSpace([weight_decay("group", groups=GROUPS)])
    want = [1e-3, 1e-5]
    for value in (
        want,
        tuple(want),
        torch.tensor(want),
        {"w1": 1e-3, "w2": 1e-3, "b1": 1e-5},
        {"w1": 1e-3, "b1": 1e-5},
    ):
        nat = space.natural(space.from_natural(params, {"weight_decay": value}, dtype=DT), params)
        torch.testing.assert_close(
            torch.stack([nat["weight_decay"][p] for p in ("w1", "b1")]), torch.tensor(want, dtype=DT)
        )
    one = space.from_natural(params, {"weight_decay": 1e-4})
    assert torch.equal(one["weight_decay/group0"], one["weight_decay/group1"])
    with pytest.raises(ValueError, match="not constant within group 0"):
        space.from_natural(params, {"weight_decay": {"w1": 1e-3, "w2": 1e-4, "b1": 1e-5}})
    with pytest.raises(ValueError, match="no value for group 1"):
        space.from_natural(params, {"weight_decay": {"w1": 1e-3}})
    with pytest.raises(ValueError, match="2 groups, but 3 values"):
        space.from_natural(params, {"weight_decay": [1e-3, 1e-4, 1e-5]})
    with pytest.raises(ValueError, match="one value per group"):
        space.from_natural(params, {"weight_decay": torch.ones(2, 2)})
    # init: one shared draw, or one per group; requires_grad leaves
    shared = space.init(params, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert list(shared) == ["weight_decay/group0", "weight_decay/group1"] and shared["weight_decay/group0"].is_leaf
    assert torch.equal(shared["weight_decay/group0"], shared["weight_decay/group1"])
    own = space.init(params, generator=torch.Generator().manual_seed(0), shared_init=False)
    assert not torch.equal(own["weight_decay/group0"], own["weight_decay/group1"])
    assert all(-7 <= float(v) <= -2 for v in own.values())
    # check: with and without params
    space.check(own)
    space.check(own, params)
    with pytest.raises(
        ValueError, match=r"missing keys \['weight_decay/group1'\].*unexpected keys \['weight_decay/b1'\]"
    ):
        space.check({"weight_decay/group0": own["weight_decay/group0"], "weight_decay/b1": own["weight_decay/group1"]})
    with pytest.raises(ValueError, match="weight_decay/group1"):
        space.natural({"weight_decay/group0": own["weight_decay/group0"]})
    with pytest.raises(ValueError, match="shape"):
        space.check(dict(own, **{"weight_decay/group1": torch.zeros(2)}), params)
    with pytest.raises(ValueError, match="unknown parameters.*'w9'"):
        HyperParameterSpace([weight_decay("group", groups=[["w1"], ["w9"]])]).init(params)


def test_group_granularity_validation_and_for_rule():
    h = for_rule("lr", "group", groups=[["w1", "w2"], ["b1"]])
    assert h.granularity is Granularity.GROUP and h.groups == GROUPS and h.clip == (1e-10, 1.0)
    assert h.group_keys() == ["lr/group0", "lr/group1"] and h.group_key(1) == "lr/group1"
    raw = {"lr/group0": torch.tensor(3.0, dtype=DT), "lr/group1": torch.tensor(-2.0, dtype=DT)}
    nat = h.natural(raw)
    assert nat["w1"].item() == 1.0 and nat["b1"].item() == pytest.approx(1e-2)  # clipped like the scalar lr
    for name in ("momentum", "weight_decay", "eps", "beta1", "alpha"):
        g = for_rule(name, "group", groups=GROUPS)
        assert g.name == name and g.groups == GROUPS
    assert Granularity("group") is Granularity.GROUP
    with pytest.raises(ValueError, match=r"'scalar', 'group', 'tensor', 'element'"):
        HyperParameter("x", LOG10, 0, 1, granularity="row")
    with pytest.raises(ValueError, match="needs groups="):
        for_rule("lr", "group")
    with pytest.raises(ValueError, match="groups=... needs granularity 'group'"):
        for_rule("lr", "tensor", groups=GROUPS)
    with pytest.raises(ValueError, match="takes groups="):
        HyperParameter("x", LOG10, 0, 1, granularity="group", params=("w1",), groups=GROUPS)
    with pytest.raises(ValueError, match=r"\['w1'\] appear in more than one group"):
        for_rule("lr", "group", groups=[["w1"], ["w1", "b1"]])
    with pytest.raises(ValueError, match="at least one group"):
        for_rule("lr", "group", groups=[])
    with pytest.raises(ValueError, match="sequence of parameter names"):
        for_rule("lr", "group", groups=["w1", "b1"])
    # an empty group keeps its raw key (aligned with an optimiser's param_groups) and maps no parameter
    e = for_rule("lr", "group", groups=[["w1"], []])
    assert list(e.shapes(make_params())) == ["lr/group0", "lr/group1"]
    assert list(e.natural({"lr/group0": torch.tensor(-1.0), "lr/group1": torch.tensor(-2.0)})) == ["w1"]
    # existing granularities unchanged
    assert for_rule("lr", "tensor", params=["w1"]).groups is None


def test_group_granularity_under_vmap():
    space = HyperParameterSpace([momentum("group", groups=GROUPS), learning_rate()])
    pop = [space.init(make_params(), generator=torch.Generator().manual_seed(i), shared_init=False) for i in range(3)]
    batched = {k: torch.stack([p[k] for p in pop]) for k in pop[0]}
    out = torch.func.vmap(space.natural)(batched)
    for i, p in enumerate(pop):
        ref = space.natural(p)
        for name in ("w1", "w2", "b1"):
            torch.testing.assert_close(out["momentum"][name][i], ref["momentum"][name])


def _same_natural(a, b):
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], dict):
            for n in a[k]:
                assert torch.equal(a[k][n], b[k][n]), (k, n)
        else:
            assert torch.equal(a[k], b[k]), k


def test_natural_reused_is_natural_and_follows_every_change_of_the_raw_values():
    """The natural values reused between two hyperparameter steps: equal to :meth:`natural` at every call,
    recomputed after an in-place step (a new version) or a new tensor, never reused for a graph or under vmap."""
    params = make_params()
    space = HyperParameterSpace([learning_rate("element"), weight_decay("tensor", params=("w1", "w2")), momentum()])
    raw = space.init(params, generator=torch.Generator().manual_seed(0))
    first = space.natural_reused({k: v.detach() for k, v in raw.items()})
    _same_natural(first, space.natural(raw))
    again = space.natural_reused({k: v.detach() for k, v in raw.items()})  # new detached views: reused
    assert again["momentum"] is first["momentum"]
    with torch.no_grad():
        raw["momentum"].add_(0.3)  # a hyperparameter step, in place
    moved = space.natural_reused({k: v.detach() for k, v in raw.items()})
    _same_natural(moved, space.natural(raw))
    assert not torch.equal(moved["momentum"], first["momentum"])
    raw = {k: v.clone() for k, v in raw.items()}  # new tensors (a loaded checkpoint)
    raw["lr/w1"] = raw["lr/w1"] - 0.5
    _same_natural(space.natural_reused(raw), space.natural(raw))
    leaf = {k: v.clone().requires_grad_() for k, v in raw.items()}
    out = space.natural_reused(leaf)  # a graph: mapped afresh, differentiable
    assert out["momentum"].requires_grad
    import copy
    import pickle

    space.natural_reused(raw)
    for other in (copy.deepcopy(space), pickle.loads(pickle.dumps(space))):  # a copy never reuses another's values
        fresh = {k: v + 0.25 for k, v in raw.items()}
        _same_natural(other.natural_reused(fresh), space.natural(fresh))
    batched = torch.vmap(lambda m: space.natural_reused({**raw, "momentum": m})["momentum"])(torch.zeros(3, dtype=DT))
    assert torch.equal(batched, space.natural({**raw, "momentum": torch.zeros((), dtype=DT)})["momentum"].expand(3))
