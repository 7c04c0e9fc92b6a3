"""The module side of the front door (bilevel.module_bridge): evaluation and write-back against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bilevel


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x[i : i + 7], x[i : i + 7].sum(1, keepdim=True)) for i in range(0, n, 7)]  # the last batch is short


def test_evaluate_is_the_size_weighted_mean_and_leaves_mode_and_rng_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    tuner = bilevel.Tuner(model, F.mse_loss, bilevel.optim.SGD(lr=0.01), tune="lr", progress=False)
    val = _data(30, 1)
    model.train()
    state = torch.get_rng_state()
    got = float(tuner.evaluate(val)[0])
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()
    with torch.no_grad():
        ref = sum(F.mse_loss(model(x), y, reduction="sum").item() for x, y in val) / 30
    assert got == pytest.approx(ref, rel=1e-6)


def test_fit_writes_the_weights_state_and_per_group_values_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.02}, {"params": model[2].parameters(), "lr": 0.05}], momentum=0.5
    )
    tuner = bilevel.Tuner(model, F.mse_loss, opt, tune={"lr": "group"}, progress=False)
    tuner.fit(_data(42, 2), _data(21, 3), epochs=2)
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), tuner.loop.params[k])
    lrs = tuner.hparams["lr"]
    assert isinstance(lrs, list) and len(lrs) == 2 and lrs != [0.02, 0.05]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lrs, rel=1e-12)
    for p in model.parameters():  # the twin's momentum buffers, continued by a plain loop
        assert "momentum_buffer" in opt.state[p]
