"""Schedules (bilevel.schedules): Every, HyperFirst and Adaptive as values, Adaptive against Every bit for bit."""

import io

import pytest
import torch
from problems import linear_population

from bilevel.schedules import Adaptive, Every, HyperFirst

BUILD, (X, Y), (Xv, Yv) = linear_population(seed=5, shift=0.2)


class Steps:
    def __init__(self):
        self.at = []

    def on_hyper_step(self, tuner):
        self.at.append(tuner.t)


def tuner(schedule, hyper_lr=0.05, callbacks=()):
    return BUILD(callbacks=callbacks, schedule=schedule, hyper_lr=hyper_lr)


def test_due_steps_of_every_and_hyper_first():
    assert [t for t in range(1, 13) if Every(4).due(t, 0)] == [4, 8, 12]
    assert [t for t in range(1, 13) if HyperFirst(4).due(t, 0)] == [1, 5, 9]
    assert not Every(4, limit=2).due(8, 2) and Every(4, limit=2).due(8, 1)


def test_adaptive_doubles_the_gap_once_the_values_settle():
    """A tiny hyper learning rate: every step moves the values by far less than 1 %, so the gaps double."""
    log = Steps()
    t = tuner(Adaptive(5, max_interval=20, settle=0.01), hyper_lr=1e-6, callbacks=[log])
    t.run(80, lambda: (X, Y), lambda: (Xv, Yv))
    assert log.at == [5, 15, 35, 55, 75]  # gaps 10, 20, 20, 20 (capped)


def test_adaptive_is_every_while_the_values_move():
    """A large hyper learning rate (every step moves a value by more than 1e-12 of it): the same run as Every."""
    log_a, log_e = Steps(), Steps()
    a = tuner(Adaptive(5, max_interval=40, settle=1e-12), callbacks=[log_a])
    e = tuner(Every(5), callbacks=[log_e])
    for u in (a, e):
        u.run(30, lambda: (X, Y), lambda: (Xv, Yv))
    assert log_a.at == log_e.at == [5, 10, 15, 20, 25, 30]
    for k in a.raw:
        assert torch.equal(a.raw[k], e.raw[k])


def test_adaptive_state_is_checkpointed():
    a = tuner(Adaptive(5, max_interval=20), hyper_lr=1e-6)
    a.run(17, lambda: (X, Y), lambda: (Xv, Yv))
    b = tuner(Adaptive(5, max_interval=20), hyper_lr=1e-6)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=False))
    assert (b.schedule.gap, b.schedule.next) == (a.schedule.gap, a.schedule.next) == (20, 35)
    for u in (a, b):
        u.run(30, lambda: (X, Y), lambda: (Xv, Yv))
    for k in a.raw:
        assert torch.equal(a.raw[k], b.raw[k])


@pytest.mark.parametrize("kw", [dict(interval=0), dict(interval=10, max_interval=5), dict(settle=0.0)])
def test_bad_adaptive_settings_are_refused(kw):
    with pytest.raises(ValueError):
        Adaptive(**kw)
