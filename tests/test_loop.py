"""The one loop (bilevel.loop): schedules as values, callbacks on every path, the same run as a hand-written loop."""

import io

import pytest
import torch
from problems import linear_population

from bilevel import loop
from bilevel.solvers import Neumann
from bilevel.strategies import IFT, Baydin, NoTuning

BUILD, (X, Y), (Xv, Yv) = linear_population(seed=1, shift=0.1)


class Log:
    """Every event the loop fires, in order, with the step it fired at."""

    def __init__(self):
        self.events = []

    def on_weight_step(self, t):
        self.events.append(("w", t.t))

    def on_interval(self, t):
        self.events.append(("i", t.t))

    def on_hyper_step(self, t):
        assert t.last_hypergradient is not None and set(t.last_hypergradient) == set(t.tuned_keys)
        self.events.append(("h", t.t))

    def on_record(self, t):
        self.events.append(("r", t.t))


def tuner(callbacks=(), strategy=None, schedule=None, **cfg):
    return BUILD(callbacks=callbacks, strategy=strategy, schedule=schedule, **cfg)


def test_every_fires_interval_then_hyper_step_at_each_boundary():
    log = Log()
    t = tuner([log], interval=3, record_every=4)
    t.run(7, lambda: (X, Y), lambda: (Xv, Yv), record_batches=((X, Y), None, None))
    assert log.events == [
        ("w", 1), ("w", 2), ("w", 3), ("i", 3), ("h", 3), ("w", 4), ("r", 4),
        ("w", 5), ("w", 6), ("i", 6), ("h", 6), ("w", 7),
    ]  # fmt: skip
    assert t.hyper_steps == 2


def test_run_equals_the_hand_written_algorithm_1():
    """The loop's run and the same steps called by hand give the same numbers bit for bit."""
    a, b = tuner(interval=4), tuner(interval=4)
    a.run(12, lambda: (X, Y), lambda: (Xv, Yv))
    for s in range(1, 13):
        b.step((X, Y))
        if s % 4 == 0:
            b.hyper_step((X, Y), (Xv, Yv))
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    for k in a.raw:
        assert torch.equal(a.raw[k], b.raw[k])


def test_limit_stops_hyperparameter_steps_but_not_the_intervals():
    log = Log()
    t = tuner([log], schedule=loop.Every(2, limit=2))
    t.run(8, lambda: (X, Y), lambda: (Xv, Yv))
    assert [e for e in log.events if e[0] == "h"] == [("h", 2), ("h", 4)]
    assert t.hyper_steps == 2
    raw = {k: v.clone() for k, v in t.raw.items()}
    t.run(4, lambda: (X, Y), lambda: (Xv, Yv))
    assert all(torch.equal(raw[k], t.raw[k]) for k in raw)


def test_hyper_first_steps_before_each_block():
    log = Log()
    t = tuner([log], strategy=BeforeAny(), schedule=loop.HyperFirst(3))
    t.run(6, lambda: (X, Y), lambda: (Xv, Yv))
    assert [e for e in log.events if e[0] in "ih"] == [("i", 0), ("h", 0), ("i", 3), ("h", 3)]
    assert t.strategy.batches == [(X, Y), (X, Y)]  # each on the batch of the weight step that follows it


class BeforeAny(IFT):
    """IFT that records the training contexts it was given (the first hyper-first step has none)."""

    def __init__(self):
        super().__init__(Neumann(2, alpha=1.0))
        self.batches = []

    def hyper_step(self, tuner, train_batch, val_batches):
        self.batches.append(train_batch)
        hg = {k: torch.zeros_like(v) for k, v in tuner.raw.items() if k in tuner.tuned_keys}
        tuner.apply_hypergradient(hg)
        return hg


def test_cold_start_retrains_from_the_initial_weights_before_each_step():
    """Every(T, cold_steps=N): at a boundary the weights are the initial ones after N uncounted steps."""
    t = tuner(schedule=loop.Every(5, cold_steps=3), on_divergence="record")
    ref = tuner()
    t.run(5, lambda: (X, Y), lambda: (Xv, Yv))
    assert t.t == 5 and t.hyper_steps == 1
    for _ in range(3):  # the reference: 3 weight steps from the initial weights, at the initial hyperparameters
        ref.step((X, Y))
    hg = ref.hypergradient((X, Y), (Xv, Yv))
    hg_cold = t.last_hypergradient
    for k in hg:
        torch.testing.assert_close(hg_cold[k], hg[k], rtol=0, atol=0)


def test_baydin_steps_after_every_weight_step_and_none_never():
    log = Log()
    t = tuner([log], strategy=Baydin())
    t.run(3, lambda: (X, Y), lambda: (Xv, Yv))
    assert [e for e in log.events if e[0] == "h"] == [("h", 1), ("h", 2), ("h", 3)]
    log2 = Log()
    t2 = tuner([log2], strategy=NoTuning(), interval=2)
    raw = {k: v.clone() for k, v in t2.raw.items()}
    t2.run(4, lambda: (X, Y), lambda: (Xv, Yv))
    assert [e for e in log2.events if e[0] in "ih"] == [("i", 2), ("i", 4)] and t2.hyper_opt is None
    assert all(torch.equal(raw[k], t2.raw[k]) for k in raw)


@pytest.mark.parametrize("bad", [dict(interval=0), dict(interval=2, cold_steps=-1), dict(interval=2, limit=-1)])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        loop.Every(**bad)


def test_strategy_state_survives_a_checkpoint():
    """The unrolled window lives in the strategy and is saved and restored with the loop."""
    a = tuner(mode="unroll", interval=4, lookback=3)
    a.run(6, lambda: (X, Y), lambda: (Xv, Yv))
    b = tuner(mode="unroll", interval=4, lookback=3)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert len(b.strategy.window) == 3
    for t in (a, b):
        t.run(6, lambda: (X, Y), lambda: (Xv, Yv))
    for k in a.raw:
        assert torch.equal(a.raw[k], b.raw[k])
