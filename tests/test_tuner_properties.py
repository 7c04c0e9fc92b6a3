"""The front door's promises as properties over a seeded random matrix of cases, against plain PyTorch.

Each case draws a model (MLP, CNN with BatchNorm, MLP with dropout, LSTM), a ``torch.optim`` optimiser (SGD with
momentum / Nesterov / weight decay, Adam, AdamW, RMSprop; one or two parameter groups; sometimes built on a subset
of the parameters), a loader kind (shuffled or not, with or without its own generator) and settings. Checked:

* tuning off is PyTorch: ``mode="none"`` equals the plain loop ``zero_grad; loss.backward(); step``;
* the differentiable twin steps exactly like ``torch.optim`` (hyperparameters declared in ``tune=``, mode none);
* the parameters that change are exactly the optimiser's;
* ``fit(2) == fit(1) + fit(1) == fit(1) + state_dict -> weights_only load -> fresh Tuner -> fit(1)``;
* the default equals ``share_gradient=False`` (exact by default).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel

_g = torch.Generator().manual_seed(0)
XI, YI = torch.randn(40, 1, 4, 4, generator=_g), torch.randint(0, 3, (40,), generator=_g)  # images, 3 classes
XS, YS = torch.randn(40, 5, 3, generator=_g), torch.randint(0, 3, (40,), generator=_g)  # sequences
XV_I, YV_I = torch.randn(16, 1, 4, 4, generator=_g), torch.randint(0, 3, (16,), generator=_g)
XV_S, YV_S = torch.randn(16, 5, 3, generator=_g), torch.randint(0, 3, (16,), generator=_g)


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def make_model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    if kind == "dropout":
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3))
    if kind == "cnn_bn":  # no bias before BatchNorm: its true gradient is 0 (Adam would amplify float noise)
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
        )
    return LSTMNet()


def make_optimizer(kind: str, groups: bool, subset: bool, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if subset:  # the optimiser holds the last layer only (the others must not move)
        params = params[-2:]
    if groups and len(params) > 1:  # weights vs the rest (biases, norms), different lr and decay
        heavy = [p for p in params if p.dim() > 1]
        light = [p for p in params if p.dim() <= 1]
        spec: list = [{"params": heavy}, {"params": light, "lr": 0.02, "weight_decay": 0.0}]
        spec = [g for g in spec if g["params"]]
    else:
        spec = [{"params": params}]
    if kind == "sgd":
        return torch.optim.SGD(spec, lr=0.05, momentum=0.9, weight_decay=1e-3)
    if kind == "nesterov":
        return torch.optim.SGD(spec, lr=0.05, momentum=0.5, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(spec, lr=0.01, weight_decay=1e-3)
    if kind == "adamw":
        return torch.optim.AdamW(spec, lr=0.01)
    return torch.optim.RMSprop(spec, lr=0.005, momentum=0.5, weight_decay=1e-3)


@dataclass
class Case:
    model: str
    opt: str
    groups: bool
    subset: bool
    shuffle: bool
    generator: bool
    batch: int
    seed: int

    def build(self) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, DataLoader]:
        torch.manual_seed(self.seed)
        model = make_model(self.model)
        opt = make_optimizer(self.opt, self.groups, self.subset, model)
        x, y, xv, yv = (XS, YS, XV_S, YV_S) if self.model == "lstm" else (XI, YI, XV_I, YV_I)
        gen = torch.Generator().manual_seed(self.seed + 1) if self.generator else None
        train = DataLoader(TensorDataset(x, y), batch_size=self.batch, shuffle=self.shuffle, generator=gen)
        val = DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=self.shuffle)
        return model, opt, train, val


def draw_cases(n: int, seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        model = ["mlp", "dropout", "cnn_bn", "lstm"][i % 4]
        cases.append(
            Case(
                model=model,
                opt=rng.choice(["sgd", "nesterov", "adam", "adamw", "rmsprop"]),
                groups=rng.random() < 0.5,
                subset=rng.random() < 0.3,
                shuffle=rng.random() < 0.6,
                generator=rng.random() < 0.5,
                batch=rng.choice([7, 8, 13]),
                seed=rng.randrange(1000),
            )
        )
    return cases


CASES = draw_cases(16, seed=2026)


def plain_loop(model: nn.Module, opt: torch.optim.Optimizer, loader: DataLoader, epochs: int) -> None:
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def assert_same_state(a: nn.Module, b: nn.Module, atol: float = 1e-5) -> None:
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=atol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def run_plain(case: Case, epochs: int) -> nn.Module:
    model, opt, train, _ = case.build()
    torch.manual_seed(12345)
    plain_loop(model, opt, train, epochs)
    return model


def run_tuner(case: Case, epochs: int, **kw) -> tuple[nn.Module, bilevel.Tuner]:
    model, opt, train, val = case.build()
    torch.manual_seed(12345)
    tuner = bilevel.Tuner(model, F.cross_entropy, opt, progress=False, **kw).fit(train, val, epochs=epochs)
    return model, tuner


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.model}-{c.opt}-g{int(c.groups)}-s{int(c.subset)}")
def test_tuning_off_is_pytorch(case: Case) -> None:
    """mode="none": the user's own optimiser, stepped like the plain loop (bit for bit up to float32 ties);
    the parameters the optimiser does not hold keep their values."""
    ref = run_plain(case, epochs=2)
    before, _, _, _ = case.build()
    model, _ = run_tuner(case, 2, mode="none")
    assert_same_state(model, ref, atol=1e-6)
    for (k, p), (_, p0) in zip(model.named_parameters(), before.named_parameters()):
        _, q = next((kq, q) for kq, q in ref.named_parameters() if kq == k)
        moved = not torch.equal(p, p0)
        assert moved == (not torch.equal(q, p0)), k  # the same set of parameters changed as in plain PyTorch


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: f"{c.model}-{c.opt}-g{int(c.groups)}")
def test_the_twin_steps_like_torch_optim(case: Case) -> None:
    """Hyperparameters declared in tune= (per group when the groups differ) with mode="none": the differentiable
    twin, started from the optimiser's state, steps like torch.optim; its state is written back."""
    ref = run_plain(case, epochs=2)
    model, tuner = run_tuner(case, 2, mode="none", tune={"lr": "group"})
    assert tuner.rule is not None and not isinstance(tuner.rule, bilevel.optim.TorchOptimizer)
    assert_same_state(model, ref, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:8], ids=lambda c: f"{c.model}-{c.opt}")
def test_split_and_resumed_runs_equal_the_uninterrupted_one(case: Case) -> None:
    """Tuning on (interval 3, a hyperparameter step straddling the epoch end): fit(2) == fit(1); fit(1) ==
    fit(1), state_dict through torch.save / torch.load(weights_only=True), a fresh Tuner, fit(1)."""
    kw = dict(tune={"lr": "group"} if case.groups else ("lr",), interval=3, lookback=2)
    whole, t_whole = run_tuner(case, 2, **kw)

    model, opt, train, val = case.build()
    torch.manual_seed(12345)
    t = bilevel.Tuner(model, F.cross_entropy, opt, progress=False, **kw)
    t.fit(train, val, epochs=1).fit(train, val, epochs=1)
    assert_same_state(model, whole, atol=0)

    model, opt, train, val = case.build()
    torch.manual_seed(12345)
    t = bilevel.Tuner(model, F.cross_entropy, opt, progress=False, **kw).fit(train, val, steps=5)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    model, opt, train, val = case.build()  # a fresh process: new model, optimiser, loaders and generators
    torch.manual_seed(999)  # whatever the global RNG holds now, the checkpoint's state wins
    resumed = bilevel.Tuner(model, F.cross_entropy, opt, progress=False, **kw)
    resumed.load_state_dict(sd)
    resumed.fit(train, val, steps=2 * len(train) - 5)
    assert_same_state(model, whole, atol=0)
    assert resumed.hparams == t_whole.hparams


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"{c.model}-{c.opt}")
def test_the_default_is_exact(case: Case) -> None:
    """The default takes no shortcut: it equals share_gradient=False (sharing is opt-in)."""
    kw = dict(tune={"lr": "group"}, interval=2)
    a, ta = run_tuner(case, 1, **kw)
    b, tb = run_tuner(case, 1, **kw, share_gradient=False)
    assert_same_state(a, b, atol=0)
    assert ta.hparams == tb.hparams
