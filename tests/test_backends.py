"""All three product backends agree on the common losses (MSE, cross-entropy, Huber)."""

import pytest
import torch
import torch.nn.functional as F

import bilevel as B

D = torch.float64
g = torch.Generator().manual_seed(0)
X, Xv = torch.randn(32, 5, generator=g, dtype=D), torch.randn(16, 5, generator=g, dtype=D)
W1, W2 = torch.randn(6, 5, generator=g, dtype=D) / 2, torch.randn(3, 6, generator=g, dtype=D) / 2
Yr, Yvr = torch.randn(32, 3, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D)
Yc, Yvc = torch.randint(0, 3, (32,), generator=g), torch.randint(0, 3, (16,), generator=g)

LOSSES = {"mse": (F.mse_loss, Yr, Yvr), "cross_entropy": (F.cross_entropy, Yc, Yvc), "huber": (F.huber_loss, Yr, Yvr)}


def net(p, x):
    return torch.tanh(x @ p["W1"].T) @ p["W2"].T


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend", ["func", "compile"])
def test_backends_agree(loss_name, backend):
    loss, y, yv = LOSSES[loss_name]

    def inner(p, h):
        return loss(net(p, X), y) + 0.5 * sum((h["wd"].exp() * v**2).sum() for v in p.values())

    def outer(p, h):
        return loss(net(p, Xv), yv)

    p, h = {"W1": W1, "W2": W2}, {"wd": torch.tensor(-1.0, dtype=D)}
    ref = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5))
    got = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5), backend=backend)
    torch.testing.assert_close(got["wd"], ref["wd"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["func", "compile"])
def test_backends_agree_on_update_maps(backend):
    """update= (Clarke et al.): SGD with momentum state and per-weight learning rates, non-symmetric J."""
    from bilevel.updates import SGD

    loss, y, yv = LOSSES["mse"]
    rule = SGD(momentum=0.9)
    p = {"W1": W1, "W2": W2}
    state = rule.init_state(p)
    state["momentum_buffer"] = {k: 0.1 * torch.ones_like(v) for k, v in p.items()}
    state["step"] = state["step"] + 3

    def update(q, h):
        g = torch.func.grad(lambda r: loss(net(r, X), y))(q)
        lr = {k: 10 ** h["log_lr"] * torch.ones_like(v) for k, v in q.items()}
        return rule(q, g, {"lr": lr, "momentum": torch.sigmoid(h["m"]), "weight_decay": 10 ** h["log_wd"]}, state)[0]

    def outer(q, h):
        return loss(net(q, Xv), yv)

    h = {"log_lr": torch.tensor(-1.0, dtype=D), "m": torch.tensor(0.5, dtype=D), "log_wd": torch.tensor(-3.0, dtype=D)}
    ref = B.hypergradient(outer, p, h, update=update, solver=B.Neumann(5, alpha=1.0))
    got = B.hypergradient(outer, p, h, update=update, solver=B.Neumann(5, alpha=1.0), backend=backend)
    for k in h:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-9, atol=1e-12)


def test_compiled_programs_are_cached_per_function_and_bounded(monkeypatch):
    from bilevel.hypergradient import _CompiledOperator

    monkeypatch.setattr(_CompiledOperator, "cache_size", 2)

    def outer(p, h):
        return (p["w"] ** 2).sum()

    def inner(p, h):
        return ((p["w"] - h["c"]) ** 2).sum()

    p, h = {"w": torch.ones(3, dtype=D)}, {"c": torch.zeros(3, dtype=D)}
    _CompiledOperator._cache.clear()
    for _ in range(3):  # the same function: compiled once
        B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(2, alpha=0.25), backend="compile")
    assert list(_CompiledOperator._cache) == [inner]
    for i in range(4):  # fresh closures: the table stays bounded
        B.hypergradient(
            outer, p, h, inner=lambda p, h, i=i: inner(p, h) * (1 + i), solver=B.Identity(), backend="compile"
        )
    assert len(_CompiledOperator._cache) == 2


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        B.hypergradient(
            lambda p, h: p["w"].sum(),
            {"w": torch.ones(2)},
            {"l": torch.ones(1)},
            inner=lambda p, h: (p["w"] ** 2).sum(),
            solver=B.Identity(),
            backend="jax",
        )
