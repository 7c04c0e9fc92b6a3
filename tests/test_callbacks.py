"""Callbacks of the online loop: Random (x LR) and live TensorBoard curves, read back from the event files."""

import pytest
import torch

from bilevel import hparams as H
from bilevel import population as pop
from bilevel import updates
from bilevel.callbacks import RandomLRMultiplier, TensorBoardLogger
from bilevel.tuner import OnlineTuner, TunerConfig

D = torch.float64
g0 = torch.Generator().manual_seed(0)
X, Xv = torch.randn(32, 3, generator=g0, dtype=D), torch.randn(16, 3, generator=g0, dtype=D)
Y, Yv = X.sum(1, keepdim=True), Xv.sum(1, keepdim=True)
LOSS = pop.vmap_loss(lambda p, x: x @ p["w"], lambda o, y: ((o - y) ** 2).mean())
SPACE = H.HyperParameterSpace([H.learning_rate(), H.momentum()])


def _tuner(n, callbacks, mode="ift"):
    params, raw = pop.init_population(
        lambda g: {"w": torch.randn(3, 1, generator=g, dtype=D)}, n, 0, lambda p, g: SPACE.init(p, g)
    )
    return OnlineTuner(
        params,
        raw,
        SPACE,
        updates.SGD(),
        LOSS,
        LOSS,
        update_form=SPACE.names,
        config=TunerConfig(tuned=SPACE.names, interval=4, record_every=4, mode=mode),
        callbacks=callbacks,
    )


def test_random_lr_multiplier_draws_factors_in_range_and_resumes():
    cb = RandomLRMultiplier(0.5, 0.6, seed=3)
    t = _tuner(4, [cb], mode="none")
    lr0 = t.describe()["lr"].clone()
    t.run(4, lambda: (X, Y), lambda: (Xv, Yv))
    ratio = t.describe()["lr"] / lr0
    assert bool(((ratio >= 0.5 - 1e-12) & (ratio <= 0.6 + 1e-12)).all()) and ratio.std() > 0
    sd = cb.state_dict()
    a = torch.rand(4, generator=cb.generator, dtype=D)
    cb2 = RandomLRMultiplier(0.5, 0.6, seed=99)
    cb2.load_state_dict(sd)
    assert torch.equal(torch.rand(4, generator=cb2.generator, dtype=D), a)
    with pytest.raises(ValueError, match="low <= high"):
        RandomLRMultiplier(0.9, 0.5)


def test_tensorboard_logger_writes_losses_quantiles_and_members(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = TensorBoardLogger(str(tmp_path), every=2, members=2)
    t = _tuner(5, [log])
    t.run(8, lambda: (X, Y), lambda: (Xv, Yv), record_batches=((X, Y), (Xv, Yv), None))
    log.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/val/member_0", "loss/val/member_1", "hparam/lr/member_0", "loss/train_step/member_0"} <= tags
    assert "loss/val/member_2" not in tags
    # the logged member values are the history's, at the recorded steps
    got = [(e.step, e.value) for e in acc.Scalars("loss/val/member_1")]
    assert [s for s, _ in got] == t.history.step
    assert [v for _, v in got] == pytest.approx([v for v in t.history.val_loss[1]], rel=1e-6)
    # the median lives in its own run directory written by add_scalars
    import os

    runs = [d for d in os.listdir(tmp_path) if d.startswith("loss_val_")]
    assert sorted(runs) == ["loss_val_median", "loss_val_q25", "loss_val_q75"]
    med = EventAccumulator(str(tmp_path / "loss_val_median"))
    med.Reload()
    expect = torch.tensor([m[-1] for m in t.history.val_loss], dtype=D).median()
    # torch.quantile interpolates; with 5 members the median is the middle value
    assert med.Scalars("loss/val")[-1].value == pytest.approx(float(expect), rel=1e-6)


def test_tensorboard_logger_on_the_front_door(tmp_path):
    pytest.importorskip("tensorboard")
    import torch.nn.functional as F
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    import bilevel

    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    batches = [(X[i : i + 8], Y[i : i + 8]) for i in range(0, 32, 8)]
    tuner = bilevel.Tuner(
        model,
        loss_fn=F.mse_loss,
        optimizer=bilevel.optim.SGD(lr=0.05),
        interval=2,
        progress=False,
        callbacks=[TensorBoardLogger(str(tmp_path))],
    )
    tuner.fit(batches, [(Xv, Yv)], epochs=2)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    val = acc.Scalars("loss/val_epoch")
    assert [e.step for e in val] == [4, 8]
    assert [e.value for e in val] == pytest.approx([h["val_loss"] for h in tuner.history], rel=1e-6)
    assert [e.value for e in acc.Scalars("hparam/lr")] == pytest.approx(
        [h["hparams"]["lr"] for h in tuner.history], rel=1e-6
    )


def test_autolog_gives_every_loop_created_inside_a_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from bilevel.callbacks import autolog

    with autolog(tmp_path, every=1):
        a, b = _tuner(2, []), _tuner(3, [])
    outside = _tuner(2, [])
    assert [type(c).__name__ for c in a.callbacks] == ["TensorBoardLogger"] and not outside.callbacks
    for t in (a, b):
        t.run(4, lambda: (X, Y), lambda: (Xv, Yv), record_batches=((X, Y), (Xv, Yv), None))
    for c in a.callbacks + b.callbacks:
        c.writer.flush()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("loop-")) == ["loop-0", "loop-1"]
