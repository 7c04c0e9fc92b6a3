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

LOSSES = {"mse": (F.mse_loss, Yr, Yvr), "cross_entropy": (F.cross_entropy, Yc, Yvc),
          "huber": (F.huber_loss, Yr, Yvr)}


def net(p, x):
    return torch.tanh(x @ p["W1"].T) @ p["W2"].T


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("backend", ["func", "compile"])
def test_backends_agree(loss_name, backend):
    loss, y, yv = LOSSES[loss_name]

    def inner(p, h):
        return loss(net(p, X), y) + 0.5 * sum((h["wd"].exp() * v ** 2).sum() for v in p.values())

    def outer(p, h):
        return loss(net(p, Xv), yv)

    p, h = {"W1": W1, "W2": W2}, {"wd": torch.tensor(-1.0, dtype=D)}
    ref = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5))
    got = B.hypergradient(outer, p, h, inner=inner, solver=B.Neumann(10, alpha=0.5), backend=backend)
    torch.testing.assert_close(got["wd"], ref["wd"], rtol=1e-9, atol=1e-12)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        B.hypergradient(lambda p, h: p["w"].sum(), {"w": torch.ones(2)}, {"l": torch.ones(1)},
                        inner=lambda p, h: (p["w"] ** 2).sum(), solver=B.Identity(), backend="jax")
