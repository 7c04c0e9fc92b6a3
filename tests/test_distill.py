"""DistilledData: layout, initialisation, targets, gradients and the IFT hypergradient through it."""

import pytest
import torch
import torch.nn.functional as F

import bilevel as B
from bilevel.distill import DistilledData
from bilevel.hparams import HyperParameterSpace, per_weight_decay


def test_layout_keys_and_space():
    d = DistilledData((3, 4, 4), num_classes=5, per_class=2, soft_labels=True, name="syn")
    assert d.num_points == 10
    assert d.keys() == ["syn/x", "syn/label_logits"]
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    h = d.init(init="zeros")
    assert set(h) == {"syn/x", "syn/label_logits"}
    assert h["syn/x"].shape == (10, 3, 4, 4) and h["syn/label_logits"].shape == (10, 5)
    assert all(v.requires_grad and v.is_leaf for v in h.values())
    # the raw dict is a valid point of the library's parametrisation (identity transform)
    nat = d.space.natural(h)["syn"]
    assert torch.equal(nat["x"], h["syn/x"])
    hard = DistilledData((2,), num_classes=3)
    assert hard.keys() == ["distill/x"]
    assert list(hard.init(init="zeros")) == ["distill/x"]


def test_combines_with_other_hyperparameters_in_one_flat_dict():
    d = DistilledData((2,), num_classes=2)
    params = {"w": torch.zeros(2, 2)}
    wd = HyperParameterSpace([per_weight_decay()])
    raw = {**d.init(init="normal", generator=torch.Generator().manual_seed(0)), **wd.init(params)}
    assert torch.equal(d.inputs(raw), raw["distill/x"])  # other keys are ignored


def test_normal_init_is_seeded_and_scaled():
    d = DistilledData((6,), num_classes=4, per_class=3)
    a = d.init(torch.Generator().manual_seed(3), "normal", scale=0.5, dtype=torch.float64)["distill/x"]
    b = d.init(torch.Generator().manual_seed(3), "normal", scale=0.5, dtype=torch.float64)["distill/x"]
    ref = 0.5 * torch.randn((12, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_real_init_picks_distinct_examples_of_each_class():
    x = torch.arange(30, dtype=torch.float64).reshape(15, 2)
    y = torch.tensor([0, 1, 2] * 5)
    d = DistilledData((2,), num_classes=3, per_class=2)
    h = d.init(torch.Generator().manual_seed(0), "real", real=(x, y))
    xs = h["distill/x"]
    rows = [int(r[0]) // 2 for r in xs]  # row index in x
    assert len(set(rows)) == 6
    assert [int(y[r]) for r in rows] == d.labels.tolist()
    assert torch.equal(xs, x[rows])
    assert xs.dtype == torch.float64


def test_soft_targets_are_softmax_and_label_scale():
    d = DistilledData((2,), num_classes=3, soft_labels=True)
    h = d.init(init="zeros", label_scale=2.0, dtype=torch.float64)
    t = d.targets(h)
    e = torch.exp(torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(t.diagonal(), torch.full((3,), float(e / (e + 2)), dtype=torch.float64))
    assert torch.allclose(t.sum(1), torch.ones(3, dtype=torch.float64))
    uniform = d.targets(d.init(init="zeros", label_scale=0.0))
    assert torch.allclose(uniform, torch.full((3, 3), 1 / 3))


def test_cross_entropy_matches_manual_and_hard_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 2, generator=g, dtype=torch.float64)
    d = DistilledData((5,), num_classes=2, per_class=2)
    h = d.init(init="zeros", dtype=torch.float64)
    manual = -(logits.log_softmax(1)[torch.arange(4), torch.tensor([0, 0, 1, 1])]).mean()
    assert torch.allclose(d.cross_entropy(logits, h), manual)
    s = DistilledData((5,), num_classes=2, per_class=2, soft_labels=True)
    hs = s.init(init="normal", generator=g, dtype=torch.float64)
    hs["distill/label_logits"] = torch.randn(4, 2, generator=g, dtype=torch.float64)
    p = hs["distill/label_logits"].softmax(1)
    manual_soft = -(p * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(s.cross_entropy(logits, hs), manual_soft)


def test_soft_label_and_input_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(2)
    d = DistilledData((3,), num_classes=3, per_class=2, soft_labels=True)
    h = d.init(g, "normal", dtype=torch.float64)
    with torch.no_grad():
        h["distill/label_logits"].copy_(torch.randn(6, 3, generator=g, dtype=torch.float64))
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def loss(raw):
        return d.cross_entropy(d.inputs(raw) @ W, raw)

    grads = torch.autograd.grad(loss(h), list(h.values()))
    eps = 1e-6
    for (k, _v), gk in zip(h.items(), grads):
        for idx in [(0, 0), (3, 1), (5, 2)]:
            plus = {kk: vv.detach().clone() for kk, vv in h.items()}
            minus = {kk: vv.detach().clone() for kk, vv in h.items()}
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd = (loss(plus) - loss(minus)) / (2 * eps)
            assert abs(float(fd) - float(gk[idx])) < 1e-7, (k, idx)


def test_ift_hypergradient_through_distilled_data_matches_finite_differences():
    """Logistic regression (+ small L2) trained to optimality on 2 learned points; dL_V/dx by IFT vs FD."""
    g = torch.Generator().manual_seed(4)
    d = DistilledData((2,), num_classes=2, soft_labels=True)
    h = d.init(g, "normal", dtype=torch.float64)
    Xv = torch.randn(40, 2, generator=g, dtype=torch.float64)
    yv = (Xv[:, 0] + 0.3 * Xv[:, 1] > 0).long()

    def inner(p, raw):
        return d.cross_entropy(d.inputs(raw) @ p["w"] + p["b"], raw) + 0.05 * (p["w"] ** 2).sum()

    def outer(p, raw):
        return F.cross_entropy(Xv @ p["w"] + p["b"], yv)

    def solve(raw):  # Newton's method on the strictly convex inner problem
        p = {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
        flat = torch.cat([p["w"].flatten(), p["b"]])
        f = lambda z: inner({"w": z[:4].reshape(2, 2), "b": z[4:]}, raw)  # noqa: E731
        for _ in range(30):
            gr = torch.func.grad(f)(flat)
            H = torch.func.hessian(f)(flat) + 1e-12 * torch.eye(6, dtype=torch.float64)
            flat = flat - torch.linalg.lstsq(H, gr).solution
        return {"w": flat[:4].reshape(2, 2), "b": flat[4:]}

    raw = {k: v.detach() for k, v in h.items()}
    p = solve(raw)
    # the bias makes the Hessian singular along b -> b + c*1 (softmax shift): damp it slightly
    hg = B.hypergradient(outer, p, raw, inner=inner, solver=B.ConjugateGradient(steps=50, damping=1e-9))
    eps = 1e-5
    for k in raw:
        for idx in [(0, 0), (1, 1)]:
            plus = {kk: vv.clone() for kk, vv in raw.items()}
            minus = {kk: vv.clone() for kk, vv in raw.items()}
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd = (outer(solve(plus), plus) - outer(solve(minus), minus)) / (2 * eps)
            assert abs(float(fd) - float(hg[k][idx])) < 1e-5 * max(1.0, abs(float(fd))), (k, idx, float(fd))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="num_classes"):
        DistilledData((2,), num_classes=0)
    with pytest.raises(ValueError, match="per_class"):
        DistilledData((2,), num_classes=2, per_class=0)
    with pytest.raises(ValueError, match="shape"):
        DistilledData((0, 3), num_classes=2)
    with pytest.raises(ValueError, match="name"):
        DistilledData((2,), num_classes=2, name="a/b")
    d = DistilledData((2,), num_classes=3, per_class=2)
    with pytest.raises(ValueError, match="unknown init"):
        d.init(init="uniform")
    with pytest.raises(ValueError, match="needs real"):
        d.init(init="real")
    with pytest.raises(ValueError, match="class 2 has 1"):
        d.init(init="real", real=(torch.zeros(5, 2), torch.tensor([0, 0, 1, 1, 2])))
    with pytest.raises(ValueError, match="real inputs must have shape"):
        d.init(init="real", real=(torch.zeros(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])))
    with pytest.raises(ValueError, match="lack the distilled-data key 'distill/x'"):
        d.inputs({"other": torch.zeros(1)})
    with pytest.raises(ValueError, match="has shape"):
        d.inputs({"distill/x": torch.zeros(5, 2)})
    with pytest.raises(ValueError, match=r"logits must have shape \(6, 3\)"):
        d.cross_entropy(torch.zeros(6, 2), d.init())


def test_num_points_round_robin_fewer_points_than_classes():
    """Vicol et al. Fig. 6: 3 classes, 2 learned points with learned soft labels."""
    d = DistilledData((2,), num_classes=3, num_points=2, soft_labels=True)
    assert d.num_points == 2 and d.labels.tolist() == [0, 1]
    h = d.init(init="zeros", label_scale=2.0, dtype=torch.float64)
    assert h["distill/x"].shape == (2, 2) and h["distill/label_logits"].shape == (2, 3)
    # point j starts with label_scale * onehot(j mod C): softmax([2, 0, 0]) and softmax([0, 2, 0])
    e = float(torch.exp(torch.tensor(2.0, dtype=torch.float64)))
    expect = torch.tensor([[e, 1, 1], [1, e, 1]], dtype=torch.float64) / (e + 2)
    torch.testing.assert_close(d.targets(h), expect)
    logits = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(d.cross_entropy(logits, h), -(expect * logits.log_softmax(1)).sum(1).mean())
    # more points than classes wrap around
    assert DistilledData((2,), num_classes=3, num_points=7).labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert "num_points=2" in repr(d)


def test_num_points_real_init_uses_each_points_class():
    x = torch.arange(40, dtype=torch.float64).reshape(20, 2)
    y = torch.tensor([0, 1, 2, 3] * 5)
    d = DistilledData((2,), num_classes=4, num_points=6)
    xs = d.init(torch.Generator().manual_seed(5), "real", real=(x, y))["distill/x"]
    rows = [int(r[0]) // 2 for r in xs]
    assert len(set(rows)) == 6  # distinct examples
    assert [int(y[r]) for r in rows] == [0, 1, 2, 3, 0, 1] == d.labels.tolist()
    assert torch.equal(xs, x[rows])
    # class 3 has no point when num_points=3: it needs no examples at all
    few = DistilledData((2,), num_classes=4, num_points=3)
    keep = y != 3
    xs3 = few.init(torch.Generator().manual_seed(5), "real", real=(x[keep], y[keep]))["distill/x"]
    assert [int(y[int(r[0]) // 2]) for r in xs3] == [0, 1, 2]
    with pytest.raises(ValueError, match="class 0 has 1 real examples, need 2"):
        d.init(init="real", real=(x[[0, 1, 2, 3, 5, 6]], y[[0, 1, 2, 3, 5, 6]]))


def test_num_points_errors():
    with pytest.raises(ValueError, match="num_points must be >= 1"):
        DistilledData((2,), num_classes=3, num_points=0)
    with pytest.raises(ValueError, match="either per_class=2 or num_points=4"):
        DistilledData((2,), num_classes=3, per_class=2, num_points=4)
