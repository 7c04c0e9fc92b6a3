"""The front door's settings (bilevel.module_spec): strategy= and schedule= as values, older keywords mapped once."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel
from bilevel import loop, strategies
from bilevel.solvers import AutoNeumann, ConjugateGradient


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x[i : i + 8], x[i : i + 8].sum(1, keepdim=True)) for i in range(0, n, 8)]


def make(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = bilevel.optim.SGD(lr=0.05, momentum=0.5)
    return bilevel.Tuner(model, F.mse_loss, opt, tune=("lr", "momentum"), progress=False, **kw)


def test_names_and_values_build_the_loop():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings never warn
        t = make()
        assert isinstance(t.loop.strategy, strategies.IFT) and isinstance(t.loop.strategy.solver, AutoNeumann)
        assert t.loop.schedule == loop.Every(10)
        assert isinstance(make(strategy="unroll", lookback=3).loop.strategy, strategies.Unrolled)
        assert make(strategy="unroll", lookback=3).loop.strategy.lookback == 3
        assert make(strategy="baydin").loop.schedule == loop.Every(1)
        assert make(schedule=loop.Every(4, cold_steps=7)).loop.schedule.cold_steps == 7
        ift = make(strategy=strategies.IFT(ConjugateGradient(3))).loop.strategy
        assert isinstance(ift.solver, ConjugateGradient)
        assert isinstance(make(strategy=strategies.IFT()).loop.strategy.solver, AutoNeumann)  # the one default
        assert isinstance(
            make(strategy=strategies.SharedGradient(strategies.IFT())).loop.strategy, strategies.SharedGradient
        )


@pytest.mark.parametrize(
    "old, new",
    [
        (dict(interval=5), dict(schedule=5)),
        (dict(mode="unroll", lookback=2), dict(strategy="unroll", lookback=2)),
        (dict(warm_start=False, cold_steps=3, interval=4), dict(schedule=loop.Every(4, cold_steps=3))),
        (dict(solver=ConjugateGradient(4)), dict(strategy=strategies.IFT(ConjugateGradient(4)))),
    ],
)
def test_older_keywords_warn_and_give_the_same_run(old, new):
    train, val = data(), data(seed=1)
    with pytest.warns(DeprecationWarning, match="deprecated: pass"):
        a = make(**old).fit(train, val, epochs=2)
    b = make(**new).fit(train, val, epochs=2)
    assert a.hparams == b.hparams
    for (k, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), k


def test_share_gradient_keyword_maps_to_the_wrapper_and_unknown_keywords_are_refused():
    with pytest.warns(DeprecationWarning, match="SharedGradient"):
        assert isinstance(make(share_gradient=True).loop.strategy, strategies.SharedGradient)
    with pytest.raises(TypeError, match="unexpected keyword"):
        make(intervall=5)
    with pytest.raises(TypeError, match="schedule must be"):
        make(schedule="often")


def test_every_schedule_runs_through_the_front_door_and_fires_the_callbacks():
    """HyperFirst takes its step at w_t on the batch of the weight step that follows; Adaptive and cold starts."""

    class Order:
        def __init__(self):
            self.events = []

        def on_weight_step(self, t):
            self.events.append("w")

        def on_hyper_step(self, t):
            self.events.append("h")

    train, val = data(), data(seed=1)
    for schedule, head in (
        (loop.HyperFirst(3), ["h", "w", "w", "w", "h"]),
        (loop.Every(3, cold_steps=2), ["w", "w", "w", "h", "w"]),
        (loop.Adaptive(3, max_interval=12), ["w", "w", "w", "h", "w"]),
    ):
        order = Order()
        tuner = make(schedule=schedule, callbacks=[order]).fit(train, val, epochs=2)
        assert order.events[:5] == head and order.events.count("w") == 12
        assert all(math.isfinite(v) for v in tuner.hparams.values())


def test_older_keywords_never_override_the_new_ones_silently():
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="contradicts strategy= / schedule="):
        make(strategy="unroll", mode="baydin")
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="interval="):
        make(schedule=4, interval=5)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="warm_start="):
        make(schedule=loop.Every(4), warm_start=False)
    with pytest.warns(UserWarning, match=r"Tuner\(solver=\.\.\.\) has no effect"):
        t = make(mode="unroll", solver=ConjugateGradient(3))
    assert isinstance(t.loop.strategy, strategies.Unrolled)
