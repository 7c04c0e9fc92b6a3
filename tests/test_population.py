"""bilevel.population: stacked members, per-member values, seeds, and vmap-ed losses equal to the members alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilevel import population as pop
from bilevel.nets import mlp_forward, mlp_init


def _trees(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)} for _ in range(n)]


def test_stack_and_member_are_inverse():
    trees = _trees(5)
    stacked = pop.stack(trees)
    assert stacked["a"].shape == (5, 3, 2) and stacked["b"].shape == (5, 4)
    assert pop.size(stacked) == 5
    for i, t in enumerate(trees):
        m = pop.member(stacked, i)
        assert m.keys() == t.keys() and all(torch.equal(m[k], t[k]) for k in t)
    with pytest.raises(ValueError, match="empty"):
        pop.stack([])


def test_per_member_broadcasts_one_value_per_member():
    like = torch.ones(4, 3, 2)
    value = torch.tensor([1.0, 2.0, 3.0, 4.0])
    scaled = pop.per_member(value, like) * like
    for i in range(4):
        assert torch.equal(scaled[i], torch.full((3, 2), value[i].item()))
    assert pop.per_member(like, like) is like  # already the right rank: left alone


def test_derived_seeds_are_disjoint_across_base_seeds():
    assert [pop.derived_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert pop.derived_seed(2, 5) == 2 * pop.SEED_STRIDE + 5
    zero = {pop.derived_seed(0, i) for i in range(1000)}
    one = {pop.derived_seed(1, i) for i in range(1000)}
    assert not zero & one
    for bad in ((-1, 0), (0, -1), (0, pop.SEED_STRIDE)):
        with pytest.raises(ValueError):
            pop.derived_seed(*bad)


def test_member_i_of_a_population_is_a_population_of_one_seeded_seed_plus_i():
    sizes = [4, 6, 3]
    make = lambda g: mlp_init(sizes, g, dtype=torch.float64)  # noqa: E731
    hp = lambda p, g: {"lr": torch.rand((), generator=g, dtype=torch.float64)}  # noqa: E731
    params, raw = pop.init_population(make, 5, pop.derived_seed(7, 10), hp)
    alone_p, alone_h = pop.init_population(make, 1, pop.derived_seed(7, 13), hp)
    for k in params:
        assert torch.equal(params[k][3], alone_p[k][0])
    assert torch.equal(raw["lr"][3], alone_h["lr"][0])
    assert pop.init_population(make, 2, 0)[1] == {}  # no hyperparameters asked for


def test_vmapped_losses_and_gradients_equal_each_member_alone():
    """The population's loss is the stack of the members' losses and the gradient of their sum is the stack of
    their own gradients (the members do not interact)."""
    sizes = [4, 8, 3]
    params, _ = pop.init_population(lambda g: mlp_init(sizes, g, dtype=torch.float64), 4, 0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    loss = pop.vmap_loss(mlp_forward, F.cross_entropy)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    losses = loss(leaves, None, (x, y))
    assert losses.shape == (4,)
    grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
    for i in range(4):
        own = {k: v.clone().requires_grad_() for k, v in pop.member(params, i).items()}
        alone = F.cross_entropy(mlp_forward(own, x), y)
        assert float(losses[i].detach()) == pytest.approx(float(alone.detach()), rel=1e-12)
        for gk, ga in zip(grads, torch.autograd.grad(alone, list(own.values()))):
            torch.testing.assert_close(gk[i], ga, rtol=1e-12, atol=1e-14)


def test_a_module_population_runs_through_functional_call():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    stacked = pop.module_population(net, 3)
    assert pop.size(stacked) == 3 and stacked.keys() == dict(net.named_parameters()).keys()
    with torch.no_grad():
        stacked["0.weight"][1] *= 2.0  # member 1 differs
    x = torch.randn(7, 3, dtype=torch.float64)
    forward = pop.module_forward(net)
    out = torch.func.vmap(forward, in_dims=(0, None))(stacked, x)
    assert out.shape == (3, 7, 2)
    torch.testing.assert_close(out[0], net(x).detach())
    torch.testing.assert_close(out[2], net(x).detach())
    assert not torch.allclose(out[1], out[0])
