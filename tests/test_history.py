"""The loop's records (bilevel.history): plain data that round-trips, and what a record holds per member."""

import io
import math

import pytest
import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel.history import History, append_record
from bilevel.tuner import OnlineTuner, TunerConfig
from bilevel.updates import SGD

D = torch.float64


def test_append_record_gives_none_for_dead_members_and_non_finite_values():
    store: list[list[float | None]] = []
    append_record(store, torch.tensor([1.0, math.nan, 3.0, 4.0]), torch.tensor([True, True, False, True]))
    append_record(store, torch.tensor([5.0, 6.0, 7.0, math.inf]), torch.tensor([True, True, False, True]))
    assert store == [[1.0, 5.0], [None, 6.0], [None, None], [4.0, None]]


def test_history_round_trips_through_plain_containers_and_weights_only_load():
    h = History(step=[10, 20], train_loss=[[1.0, 0.5]], hparams={"lr": [[0.1, 0.2]]}, diverged_at=[None])
    h.events.append({"step": 20, "member": 0, "what": "training loss", "action": "rollback", "lr_factor": 0.5})
    buf = io.BytesIO()
    torch.save({"history": h.as_dict()}, buf)
    buf.seek(0)
    back = History.from_dict(torch.load(buf, weights_only=True)["history"])
    assert back == h and back is not h
    assert History.from_dict(h) == h  # an old checkpoint holding the dataclass itself


def test_records_hold_the_losses_and_mean_natural_values_of_each_member():
    """Every record_every steps: each member's training / validation loss (a plain SGD loop by hand) and lr."""
    space = H.HyperParameterSpace([H.learning_rate()])
    loss = pop.vmap_loss(lambda p, x: x @ p["w"], lambda o, y: ((o - y) ** 2).mean())
    x = torch.randn(8, 2, dtype=D, generator=torch.Generator().manual_seed(0))
    y, yv = x.sum(1, keepdim=True), x.sum(1, keepdim=True) + 1
    lrs = torch.tensor([0.1, 0.2, 0.3], dtype=D)
    t = OnlineTuner(
        {"w": torch.zeros(3, 2, 1, dtype=D)}, {"lr": torch.log10(lrs)}, space, SGD(), loss, loss,
        update_form=("lr",), config=TunerConfig(tuned=(), mode="none", record_every=2),
    )  # fmt: skip
    t.run(4, lambda: (x, y), lambda: (x, yv), record_batches=((x, y), (x, yv), None))
    h = t.history
    assert h.step == [2, 4] and h.test_loss == []
    for i, lr in enumerate(lrs.tolist()):
        w = torch.zeros(2, 1, dtype=D, requires_grad=True)
        expected_train, expected_val = [], []
        for s in range(1, 5):
            (g,) = torch.autograd.grad(((x @ w - y) ** 2).mean(), w)
            w = (w - lr * g).detach().requires_grad_()
            if s % 2 == 0:
                expected_train.append(float(((x @ w.detach() - y) ** 2).mean()))
                expected_val.append(float(((x @ w.detach() - yv) ** 2).mean()))
        assert h.train_loss[i] == [pytest.approx(v, rel=1e-12) for v in expected_train]
        assert h.val_loss[i] == [pytest.approx(v, rel=1e-12) for v in expected_val]
        assert h.hparams["lr"][i] == [pytest.approx(lr, rel=1e-12)] * 2
