"""What the loop does on a non-finite value (bilevel.divergence): scale_lr on every kind of rule, the error of a
failed hyperparameter step, and rollback's scaled hyperparameter step against the optimiser's own step."""

import math

import pytest
import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel.divergence import scale_lr
from bilevel.errors import NonFiniteError
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD, Adam, TorchOptimizer, WithDefaults

D = torch.float64


def test_scale_lr_on_a_rule_a_wrapper_and_a_torch_optimiser():
    assert scale_lr(SGD(lr=0.2, momentum=0.9), 0.5) == SGD(lr=0.1, momentum=0.9)
    assert scale_lr(Adam(lr=1e-3), 0.25).lr == pytest.approx(2.5e-4)
    wrapped = WithDefaults(SGD(), {"lr": {"a": torch.tensor(0.4), "b": torch.tensor(0.2)}})
    scaled = scale_lr(wrapped, 0.5)
    lr = scaled.values["lr"]
    assert float(lr["a"]) == pytest.approx(0.2) and float(lr["b"]) == pytest.approx(0.1)
    w = {"w": torch.zeros(2, requires_grad=True)}
    opt = torch.optim.SGD([{"params": [w["w"]], "lr": 0.3}])
    rule = TorchOptimizer(opt, w)
    assert scale_lr(rule, 0.5) is rule and opt.param_groups[0]["lr"] == pytest.approx(0.15)
    with pytest.raises(ValueError, match="cannot shrink the learning rate"):
        scale_lr(object(), 0.5)


def _tuner(on_divergence, val_x):
    space = H.HyperParameterSpace([H.learning_rate()])
    loss = pop.vmap_loss(lambda p, x: x @ p["w"], lambda o, y: ((o - y) ** 2).mean())
    x = torch.ones(4, 2, dtype=D)
    params = {"w": torch.zeros(2, 2, 1, dtype=D)}
    t = OnlineTuner(
        params, {"lr": torch.full((2,), -1.0, dtype=D)}, space, SGD(), loss, loss, update_form=("lr",),
        config=TunerConfig(tuned=("lr",), interval=1, on_divergence=on_divergence),
    )  # fmt: skip
    return t, (x, x.sum(1, keepdim=True)), (val_x, val_x.sum(1, keepdim=True))


def test_a_failed_hyperparameter_step_names_the_validation_data_and_the_step():
    bad = torch.ones(3, 2, dtype=D)
    bad[1, 0] = math.nan
    t, train, val = _tuner("raise", bad)
    raw = t.raw["lr"].detach().clone()
    with pytest.raises(
        NonFiniteError,
        match=r"data \(the validation batch holds NaN or inf\) at the hyperparameter step after weight step 1",
    ) as e:  # noqa: E501
        t.run(1, lambda: train, lambda: val)
    assert e.value.step == 1 and torch.equal(t.raw["lr"].detach(), raw)  # nothing changed


def test_rollback_scales_a_members_hyperparameter_step_and_leaves_the_others_bit_for_bit():
    t, train, val = _tuner("rollback", torch.ones(3, 2, dtype=D))
    ref, _, _ = _tuner("rollback", torch.ones(3, 2, dtype=D))
    t._hyper_scale[1] = 0.5  # member 1 had a non-finite hypergradient before
    for u in (t, ref):
        u.step(train)
    hg = ref.hypergradient(train, val)
    before = t.raw["lr"].detach().clone()
    t.apply_hypergradient(hg)
    ref.apply_hypergradient(hg)
    after, full = t.raw["lr"].detach(), ref.raw["lr"].detach()
    assert after[0] == full[0]  # scale 1: the optimiser's own step
    assert float(after[1] - before[1]) == pytest.approx(0.5 * float(full[1] - before[1]), rel=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_the_fused_finiteness_check_of_one_model_is_torch_isfinite(seed):
    """One model's check sums each tensor (and looks entry by entry only when a sum is not finite); drawn tensors,
    dtypes, empty tensors, entries whose sums overflow and NaN / inf / -inf at drawn places give exactly what
    ``torch.isfinite`` on every tensor gives."""
    from types import SimpleNamespace

    from bilevel.divergence import DivergencePolicy

    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.bfloat16]
    tree = {}
    for i in range(int(torch.randint(1, 6, (), generator=g))):
        shape = tuple(int(s) for s in torch.randint(0, 5, (int(torch.randint(0, 3, (), generator=g)),), generator=g))
        dtype = dtypes[int(torch.randint(0, 3, (), generator=g))]
        scale = [1.0, 1e30, 3e38][int(torch.randint(0, 3, (), generator=g))]  # 3e38: sums overflow, entries finite
        tree[f"t{i}"] = (torch.randn(shape, generator=g).clamp(-1.1, 1.1) * scale).to(dtype)
    losses = torch.randn((), generator=g)
    if torch.rand((), generator=g) < 0.7:  # plant a non-finite value somewhere (or nowhere)
        k = list(tree)[int(torch.randint(0, len(tree), (), generator=g))]
        bad = [math.nan, math.inf, -math.inf][int(torch.randint(0, 3, (), generator=g))]
        if tree[k].numel():
            tree[k].view(-1)[int(torch.randint(0, tree[k].numel(), (), generator=g))] = bad
        else:
            losses = torch.tensor(bad)
    expected = not all(bool(torch.isfinite(v).all()) for v in (losses, *tree.values()))
    got = DivergencePolicy._nonfinite(SimpleNamespace(P=1, stacked=False), losses, tree)  # type: ignore[arg-type]
    assert got.shape == (1,) and bool(got[0]) == expected


def test_finite_entries_whose_sum_overflows_are_finite():
    from types import SimpleNamespace

    from bilevel.divergence import DivergencePolicy

    one = SimpleNamespace(P=1, stacked=False)
    big = {"a": torch.full((4,), 3e38), "b": torch.ones(2)}
    assert not bool(DivergencePolicy._nonfinite(one, torch.tensor(0.5), big)[0])  # type: ignore[arg-type]
    big["b"][1] = math.nan
    assert bool(DivergencePolicy._nonfinite(one, torch.tensor(0.5), big)[0])  # type: ignore[arg-type]
