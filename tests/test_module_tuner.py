"""bilevel.Tuner, the front door, against independent references: plain torch.optim loops, finite differences."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bilevel

D = torch.float64
_g = torch.Generator().manual_seed(0)
X, Y = torch.randn(48, 3, generator=_g, dtype=D), torch.randn(48, 1, generator=_g, dtype=D)
XV, YV = torch.randn(24, 3, generator=_g, dtype=D), torch.randn(24, 1, generator=_g, dtype=D)
XC = torch.randn(48, 3, generator=_g, dtype=D)
YC = (XC[:, 0] > 0).long() + (XC[:, 1] > 0).long()  # 3 classes
XCV = torch.randn(24, 3, generator=_g, dtype=D)
YCV = (XCV[:, 0] > 0).long() + (XCV[:, 1] > 0).long()


def mlp(out=1, seed=1, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(3, 5)] + ([nn.BatchNorm1d(5)] if bn else []) + [nn.Tanh(), nn.Linear(5, out)]
    return nn.Sequential(*layers).double()


def loaders(x=X, y=Y, xv=XV, yv=YV, batch=8, val_batch=8):
    return (
        DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False),
        DataLoader(TensorDataset(xv, yv), batch_size=val_batch, shuffle=False),
    )


def torch_loop(model, opt, loader, epochs, loss=F.mse_loss, extra=None, epoch_means=None):
    """The reference: a plain torch training loop over the same batches (``epoch_means``: gets each epoch's
    mean training loss, without ``extra``)."""
    model.train()
    for _ in range(epochs):
        seen = []
        for x, y in loader:
            opt.zero_grad()
            value = loss(model(x), y)
            seen.append(value.item())
            if extra is not None:
                value = value + extra(model)
            value.backward()
            opt.step()
        if epoch_means is not None:
            epoch_means.append(sum(seen) / len(seen))
    return model


def assert_same_weights(a, b, **tol):
    tol = tol or dict(rtol=1e-12, atol=1e-14)
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------- (a) mode="none" is a plain torch loop


@pytest.mark.parametrize(
    "rule, torch_opt",
    [
        (
            bilevel.optim.SGD(lr=0.05, momentum=0.5, weight_decay=1e-3),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.5, weight_decay=1e-3),
        ),
        (bilevel.optim.Adam(lr=0.01, weight_decay=1e-3), lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)),
    ],
)
def test_mode_none_equals_torch_loop(rule, torch_opt):
    train, val = loaders()
    model = mlp()
    tuner = bilevel.Tuner(model, F.mse_loss, rule, mode="none", progress=False).fit(train, val, epochs=2)
    ref, means = mlp(), []
    torch_loop(ref, torch_opt(ref.parameters()), train, epochs=2, epoch_means=means)
    # equal to round-off: the tuner holds lr as 10 ** log10(lr) and steps w - u instead of w.add_(-lr * buf)
    assert_same_weights(model, ref)
    assert tuner.loop.t == 2 * len(train)
    assert [h["step"] for h in tuner.history] == [6, 12]
    with torch.no_grad():
        ref_val = F.mse_loss(ref(XV), YV).item()
    assert tuner.history[-1]["val_loss"] == pytest.approx(ref_val, rel=1e-10)
    assert [h["train_loss"] for h in tuner.history] == pytest.approx(means, rel=1e-10)
    assert tuner.hparams == {}  # mode="none" without tune=: nothing is a hyperparameter


class _Tied(nn.Module):
    """Two layers sharing one weight (as a language model shares its embedding with its output layer)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.out = nn.Linear(3, 3).double(), nn.Linear(3, 3).double(), nn.Linear(3, 1).double()
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize("tune", [None, ("lr",)])
def test_a_model_with_tied_weights_trains_as_the_torch_loop(tune):
    """The shared weight gets the gradient of both its uses (the front door swaps every name of a tied tensor;
    it skips that search only for models without ties, see ``bilevel.functional.tied``)."""
    train, val = loaders()
    model, ref = _Tied(), _Tied()
    assert bilevel.functional.tied(model) and not bilevel.functional.tied(mlp())
    rule = bilevel.optim.SGD(lr=0.05, momentum=0.5)
    tuner = bilevel.Tuner(model, F.mse_loss, rule, tune=tune, schedule=1000, progress=False).fit(train, val, epochs=2)
    torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5), train, epochs=2)
    assert model.a.weight is model.b.weight
    assert_same_weights(model, ref)
    assert tuner.loop.t == 2 * len(train)


def test_torch_optimizer_is_converted_to_its_twin():
    """A torch.optim.SGD given as optimizer= tunes its differentiable twin; mode="none" steps as torch does."""
    train, val = loaders()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    tuner = bilevel.Tuner(model, F.mse_loss, opt, tune=("lr", "momentum"), mode="none", progress=False)
    assert isinstance(tuner.rule.rule, bilevel.optim.SGD) and tuner.rule.rule.nesterov
    tuner.fit(train, val, epochs=1)
    ref = mlp()
    torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True), train, epochs=1)
    assert_same_weights(model, ref)


# ---------------------------------------------------------------- (b) per-weight learning rates


def test_per_element_learning_rates_have_each_parameters_shape_and_move_apart():
    train, val = loaders()
    model = mlp()
    tuner = bilevel.Tuner(
        model,
        F.mse_loss,
        bilevel.optim.SGD(lr=0.05, momentum=0.5),
        tune={"lr": "element", "momentum": "scalar"},
        interval=3,
        progress=False,
    )
    lr = tuner.hparams["lr"]
    assert set(lr) == {k for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        assert lr[k].shape == p.shape
        torch.testing.assert_close(lr[k], torch.full_like(p, 0.05))
    tuner.fit(train, val, epochs=2)
    lr = tuner.hparams["lr"]
    for k, p in model.named_parameters():
        assert lr[k].shape == p.shape and bool((lr[k] > 0).all())
    flat = torch.cat([v.flatten() for v in lr.values()])
    assert float(flat.std()) > 1e-4  # one value per weight, tuned apart
    assert isinstance(tuner.hparams["momentum"], float)


def test_per_tensor_learning_rates_are_zero_dim():
    train, val = loaders()
    tuner = bilevel.Tuner(
        mlp(), F.mse_loss, bilevel.optim.SGD(lr=0.05), tune={"lr": "tensor"}, interval=3, progress=False
    ).fit(train, val, epochs=1)
    assert all(v.dim() == 0 for v in tuner.hparams["lr"].values())
    assert len({round(float(v), 12) for v in tuner.hparams["lr"].values()}) > 1


# ---------------------------------------------------------------- (c) the hypergradient of lr vs finite differences


def _regression(regime):
    g = torch.Generator().manual_seed(3)
    x, w_true = torch.randn(32, 4, generator=g, dtype=D), torch.randn(4, 1, generator=g, dtype=D)
    xv = torch.randn(16, 4, generator=g, dtype=D)
    # "under": validation agrees with training, w starts at 0 (more training helps, a larger lr lowers L_V);
    # "over": validation optimum is the start, training pulls away from it (a larger lr raises L_V)
    w_val = w_true if regime == "under" else torch.zeros(4, 1, dtype=D)
    w0 = torch.zeros(1, 4, dtype=D) if regime == "under" else w_val.T.clone()
    return x, x @ w_true, xv, xv @ w_val, w0


def _linear(w0):
    m = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(w0)
    return m


@pytest.mark.parametrize("regime, sign", [("under", -1.0), ("over", 1.0)])
def test_first_lr_hypergradient_matches_finite_differences(regime, sign):
    """First hyperparameter step, hyper-optimiser plain SGD(h): Delta log10(lr) = -h dL_V/dlog10(lr).

    Reference: central finite difference of the validation loss after T full-batch steps of a plain
    torch.optim.SGD loop at lr * 10^(+-eps). Diff-through-Opt over the whole window (lookback = T) is the
    exact derivative of that function; the IFT estimate (Neumann, 5 steps) has to agree in sign."""
    x, y, xv, yv, w0 = _regression(regime)
    T, lr, eps, h = 10, 0.02, 1e-4, 1e-3
    train, val = loaders(x, y, xv, yv, batch=32, val_batch=16)

    def val_after(lr_):
        m = _linear(w0)
        opt = torch.optim.SGD(m.parameters(), lr=lr_)
        for _ in range(T):
            opt.zero_grad()
            F.mse_loss(m(x), y).backward()
            opt.step()
        with torch.no_grad():
            return F.mse_loss(m(xv), yv).item()

    fd = (val_after(lr * 10**eps) - val_after(lr * 10**-eps)) / (2 * eps)
    assert math.copysign(1.0, fd) == sign and abs(fd) > 1e-2  # the regimes are what they claim

    measured = {}
    for mode in ("unroll", "ift"):
        tuner = bilevel.Tuner(
            _linear(w0),
            F.mse_loss,
            bilevel.optim.SGD(lr=lr),
            tune="lr",
            mode=mode,
            interval=T,
            lookback=T if mode == "unroll" else 5,
            hyper_optimizer=torch.optim.SGD,
            hyper_lr=h,
            progress=False,
        )
        tuner.fit(train, val, steps=T)
        measured[mode] = (math.log10(lr) - math.log10(tuner.hparams["lr"])) / h
    assert measured["unroll"] == pytest.approx(fd, rel=1e-6)
    assert math.copysign(1.0, measured["ift"]) == sign
    assert 0.2 * abs(fd) < abs(measured["ift"]) < 2 * abs(fd)


def test_default_hyper_optimizer_moves_lr_the_right_way():
    """Clarke et al.'s default Adam(0.05): the first step moves log10(lr) by 0.05 against the hypergradient's sign."""
    for regime, direction in (("under", 1.0), ("over", -1.0)):
        x, y, xv, yv, w0 = _regression(regime)
        train, val = loaders(x, y, xv, yv, batch=32, val_batch=16)
        tuner = bilevel.Tuner(_linear(w0), F.mse_loss, bilevel.optim.SGD(lr=0.02), tune="lr", progress=False)
        tuner.fit(train, val, steps=10)
        moved = math.log10(tuner.hparams["lr"]) - math.log10(0.02)
        assert moved == pytest.approx(direction * 0.05, rel=1e-4)


# ---------------------------------------------------------------- (d) PerWeightDecay with torch.optim.Adam


def test_per_weight_decay_with_torch_adam():
    train, val = loaders()
    model = mlp()
    penalty = bilevel.PerWeightDecay(model, init=1e-3)
    tuner = bilevel.Tuner(
        model, F.mse_loss, torch.optim.Adam(model.parameters(), lr=0.01), penalty=penalty, mode="none", progress=False
    ).fit(train, val, epochs=2)
    assert tuner.loop.strategy.name == "none" and tuner.loop.hyper_opt is None
    ref = mlp()
    l2 = lambda m: 0.5 * sum((1e-3 * p**2).sum() for p in m.parameters())  # noqa: E731
    means = []
    torch_loop(ref, torch.optim.Adam(ref.parameters(), lr=0.01), train, epochs=2, extra=l2, epoch_means=means)
    assert_same_weights(model, ref)
    assert [h["train_loss"] for h in tuner.history] == pytest.approx(means, rel=1e-10)  # the penalty is not in it
    for _k, v in tuner.hparams["l2"].items():
        torch.testing.assert_close(v, torch.full_like(v, 1e-3))

    # mode="ift": the decays move, one per weight, and stay positive
    model = mlp()
    tuner = bilevel.Tuner(
        model,
        F.mse_loss,
        torch.optim.Adam(model.parameters(), lr=0.01),
        penalty=bilevel.PerWeightDecay(model, init=1e-3),
        interval=3,
        hyper_lr=0.2,
        progress=False,
    ).fit(train, val, epochs=2)
    decays = torch.cat([v.flatten() for v in tuner.hparams["l2"].values()])
    assert decays.numel() == sum(p.numel() for p in model.parameters())
    assert bool((decays > 0).all())
    assert float((decays.log10() + 3).abs().max()) > 0.1  # moved by more than 0.1 decade
    assert float(decays.log10().std()) > 0.01  # and differently per weight


def test_per_weight_decay_on_selected_parameters_only():
    model = mlp()
    penalty = bilevel.PerWeightDecay(model, init=1e-2, granularity="tensor", params=["0.weight", "2.weight"])
    train, val = loaders()
    tuner = bilevel.Tuner(
        model, F.mse_loss, torch.optim.SGD(model.parameters(), lr=0.05), penalty=penalty, mode="none", progress=False
    ).fit(train, val, epochs=1)
    assert set(tuner.hparams["l2"]) == {"0.weight", "2.weight"}
    ref = mlp()
    l2 = lambda m: 0.5 * 1e-2 * ((m[0].weight ** 2).sum() + (m[2].weight ** 2).sum())  # noqa: E731
    torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05), train, epochs=1, extra=l2)
    assert_same_weights(model, ref)


# ---------------------------------------------------------------- (e) BatchNorm statistics


class _WeightsSeen:
    """Records the weights after every weight step (so the weights each step started from are known)."""

    def __init__(self, params):
        self.seen = [{k: v.detach().clone() for k, v in params.items()}]

    def on_weight_step(self, loop):
        self.seen.append({k: v.clone() for k, v in loop.params.items()})


@pytest.mark.parametrize("mode", ["none", "ift", "unroll"])
def test_batchnorm_statistics_updated_once_per_weight_step(mode):
    train, val = loaders()
    model = mlp(bn=True)
    seen = _WeightsSeen(dict(model.named_parameters()))
    tuner = bilevel.Tuner(
        model,
        F.mse_loss,
        bilevel.optim.SGD(lr=0.05, momentum=0.5),
        tune=("lr", "momentum"),
        mode=mode,
        interval=3,
        lookback=2,
        callbacks=[seen],
        progress=False,
    ).fit(train, val, epochs=2)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 2 * len(train)  # hypergradient evaluations did not count
    assert model.training  # left as found
    # reference: a fresh module in train mode, run once per weight step on that step's batch at the weights
    # the step started from -- BatchNorm's own running-average update, nothing else
    ref = mlp(bn=True)
    batches = [x for _ in range(2) for x, _ in train]
    assert len(seen.seen) == len(batches) + 1
    with torch.no_grad():
        for w, x in zip(seen.seen, batches):
            for k, p in ref.named_parameters():
                p.copy_(w[k])
            ref(x)
    torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, ref[1].running_var, rtol=1e-12, atol=1e-14)
    if mode == "none":  # and the weights are those of a plain torch loop
        ref = mlp(bn=True)
        torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5), train, epochs=2)
        assert_same_weights(model, ref)
        torch.testing.assert_close(bn.running_mean, ref[1].running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(bn.running_var, ref[1].running_var, rtol=1e-12, atol=1e-14)
        # the validation loss is evaluated in eval mode, with the running statistics
        ref.eval()
        with torch.no_grad():
            assert tuner.history[-1]["val_loss"] == pytest.approx(F.mse_loss(ref(XV), YV).item(), rel=1e-10)
    else:
        assert tuner.hparams["lr"] != pytest.approx(0.05, rel=1e-3)


# ---------------------------------------------------------------- (f) custom losses


def test_custom_train_and_val_losses_on_dict_batches():
    data = [{"x": X[i : i + 8], "y": Y[i : i + 8]} for i in range(0, 48, 8)]
    vdata = [{"x": XV[i : i + 12], "y": YV[i : i + 12]} for i in range(0, 24, 12)]
    calls = {"train": 0, "val": 0}

    def train_loss(model, batch):
        calls["train"] += 1
        return F.smooth_l1_loss(model(batch["x"]), batch["y"])

    def val_loss(model, batch):
        calls["val"] += 1
        return (model(batch["x"]) - batch["y"]).abs().mean()

    model = mlp()
    tuner = bilevel.Tuner(
        model,
        optimizer=bilevel.optim.SGD(lr=0.1, momentum=0.5),
        train_loss=train_loss,
        val_loss=val_loss,
        mode="none",
        progress=False,
    ).fit(data, vdata, epochs=2)
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        for b in data:
            opt.zero_grad()
            F.smooth_l1_loss(ref(b["x"]), b["y"]).backward()
            opt.step()
    assert_same_weights(model, ref)
    with torch.no_grad():
        ref_val = sum((ref(b["x"]) - b["y"]).abs().mean().item() * 12 for b in vdata) / 24
    assert tuner.history[-1]["val_loss"] == pytest.approx(ref_val, rel=1e-10)
    assert calls["train"] == 12 and calls["val"] == 2 * len(vdata)

    # tuned: the hypergradient uses val_loss on the validation batches (it moves lr)
    tuner = bilevel.Tuner(
        mlp(),
        optimizer=bilevel.optim.SGD(lr=0.1, momentum=0.5),
        train_loss=train_loss,
        val_loss=val_loss,
        interval=3,
        progress=False,
    ).fit(data, vdata, epochs=1)
    assert tuner.hparams["lr"] != pytest.approx(0.1, rel=1e-3)


def test_loss_fn_needs_input_target_batches():
    model = mlp()
    tuner = bilevel.Tuner(model, F.mse_loss, bilevel.optim.SGD(lr=0.1), mode="none", progress=False)
    with pytest.raises(ValueError, match="inputs, target"):
        tuner.fit([X[:8]], [XV], epochs=1)


# ---------------------------------------------------------------- (g) population


def test_population_best_and_member_zero():
    train, val = loaders(XC, YC, XCV, YCV)
    rule = bilevel.optim.SGD(lr=0.1, momentum=0.5)
    model = mlp(out=3)
    tuner = bilevel.Tuner(
        model, F.cross_entropy, rule, tune=("lr", "momentum"), population=3, interval=3, progress=False
    ).fit(train, val, epochs=2)
    val_losses = tuner.evaluate(val)
    assert val_losses.shape == (3,) and bool(torch.isfinite(val_losses).all())
    assert len(set(val_losses.tolist())) == 3  # three different members
    assert tuner.best == int(torch.argmin(val_losses))
    assert tuner.history[-1]["val_loss"] == pytest.approx(float(val_losses.min()), rel=1e-12)
    for k, p in model.named_parameters():  # the model holds the best member
        torch.testing.assert_close(p.detach(), tuner.loop.params[k][tuner.best], rtol=0, atol=0)
    with torch.no_grad():
        direct = F.cross_entropy(model(XCV), YCV).item()
    assert direct == pytest.approx(float(val_losses.min()), rel=1e-10)

    # member 0 starts from the model's weights: in mode="none" it is the population-of-one run (BatchNorm
    # statistics included: each member keeps its own)
    many = bilevel.Tuner(mlp(out=3, bn=True), F.cross_entropy, rule, population=3, mode="none", progress=False).fit(
        train, val, epochs=2
    )
    one_model = mlp(out=3, bn=True)
    one = bilevel.Tuner(one_model, F.cross_entropy, rule, mode="none", progress=False).fit(train, val, epochs=2)
    for k, p in one_model.named_parameters():
        torch.testing.assert_close(many.loop.params[k][0], p.detach(), rtol=1e-12, atol=1e-14)
    for k, b in one_model.named_buffers():
        torch.testing.assert_close(many._buffers[k][0], b, rtol=1e-12, atol=1e-14)
    assert int(one_model[1].num_batches_tracked) == 12 and many._buffers["1.num_batches_tracked"].tolist() == [12] * 3
    assert float(many.evaluate(val)[0]) == pytest.approx(one.history[-1]["val_loss"], rel=1e-10)
    # and the other members are different initialisations
    assert not torch.allclose(many.loop.params["0.weight"][1], many.loop.params["0.weight"][0])


# ---------------------------------------------------------------- (h) edges and bad inputs


def test_momentum_zero_warns_and_moves():
    train, val = loaders()
    with pytest.warns(UserWarning, match=r"momentum=0\.0 lies on the edge"):
        tuner = bilevel.Tuner(
            mlp(),
            F.mse_loss,
            bilevel.optim.SGD(lr=0.05, momentum=0.0),
            tune=("lr", "momentum"),
            interval=3,
            progress=False,
        )
    assert tuner.hparams["momentum"] == pytest.approx(0.01, rel=1e-9)
    tuner.fit(train, val, epochs=1)
    assert tuner.hparams["momentum"] != pytest.approx(0.01, rel=1e-3)
    assert 0 < tuner.hparams["momentum"] < 1


def test_no_warning_for_interior_values():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bilevel.Tuner(mlp(), F.mse_loss, bilevel.optim.SGD(lr=0.05, momentum=0.5), progress=False)


@pytest.mark.parametrize(
    "rule, tuned",
    [
        (bilevel.optim.SGD(lr=0.05), ["lr"]),
        (bilevel.optim.SGD(lr=0.05, momentum=0.9), ["lr", "momentum"]),
        (bilevel.optim.SGD(lr=0.05, weight_decay=1e-4), ["lr", "weight_decay"]),
        (bilevel.optim.Adam(lr=0.01), ["lr"]),
        (bilevel.optim.AdamW(lr=0.01), ["lr", "weight_decay"]),
    ],
)
def test_default_tune_is_what_the_optimiser_uses(rule, tuned):
    """By default lr and the non-zero momentum / weight decay are tuned: nothing is moved off a 0 silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuner = bilevel.Tuner(mlp(), F.mse_loss, rule, progress=False)
    assert list(tuner.hparams) == tuned


def test_mode_none_with_defaults_is_the_users_optimiser():
    """SGD without momentum or decay, defaults otherwise: the fixed baseline is exactly that optimiser."""
    train, val = loaders()
    model = mlp()
    bilevel.Tuner(model, F.mse_loss, bilevel.optim.SGD(lr=0.05), mode="none", progress=False).fit(train, val, epochs=1)
    ref = mlp()
    torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05), train, epochs=1)
    assert_same_weights(model, ref)


def test_lr_zero_is_refused():
    with pytest.raises(ValueError, match="lr=0.0.*must be > 0"):
        bilevel.Tuner(mlp(), F.mse_loss, bilevel.optim.SGD(lr=0.0, momentum=0.5), tune="lr", progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tune="betas"), r"cannot tune \['betas'\]"),
        (dict(tune={"lr": "per-weight"}), r"unknown granularity 'per-weight'"),
        (dict(tune=()), "tune is empty"),
        (dict(population=0), "population must be an integer >= 1"),
        (dict(strategy="hyper"), "unknown strategy 'hyper'"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bilevel.Tuner(mlp(), F.mse_loss, bilevel.optim.SGD(lr=0.05, momentum=0.5), progress=False, **kwargs)


def test_bad_fit_inputs_raise():
    train, val = loaders()
    empty = DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=8)
    tuner = bilevel.Tuner(mlp(), F.mse_loss, bilevel.optim.SGD(lr=0.05), interval=3, progress=False)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got 0"):
        tuner.fit(train, val, epochs=0)
    with pytest.raises(ValueError, match="train_loader is empty"):
        tuner.fit(empty, val)
    with pytest.raises(ValueError, match="val_loader is empty"):
        tuner.fit(train, empty)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        tuner.fit(train, val, steps=0)
    with pytest.raises(ValueError, match="no len"):
        tuner.fit((b for b in train), val)
    with pytest.raises(ValueError, match="val_loader must be re-iterable"):  # a one-shot generator
        tuner.fit(train, (b for b in val))
    with pytest.raises(ValueError, match="train_loader must be re-iterable"):
        tuner.fit(iter(train), val, steps=3)
    assert tuner.loop.t == 0  # every check above came before any weight step

    class NoLen:  # re-iterable, without len(), and empty: found when first used
        def __iter__(self):
            return iter([])

    with pytest.raises(ValueError, match="val_loader yielded no batches"):
        tuner.fit(train, NoLen())
    with pytest.raises(TypeError, match="nn.Module"):
        bilevel.Tuner(lambda x: x, F.mse_loss, bilevel.optim.SGD())
    with pytest.raises(ValueError, match="optimizer"):
        bilevel.Tuner(mlp(), F.mse_loss)
    with pytest.raises(ValueError, match="loss_fn"):
        bilevel.Tuner(mlp(), optimizer=bilevel.optim.SGD())
    with pytest.raises(ValueError, match="population > 1"):
        m = mlp()
        bilevel.Tuner(m, F.mse_loss, torch.optim.Adam(m.parameters()), penalty=bilevel.PerWeightDecay(m), population=2)


# ---------------------------------------------------------------- (i) resume


@pytest.mark.parametrize("mode", ["ift", "unroll"])
def test_state_dict_resume_is_bit_for_bit(mode):
    # 6 weight steps per epoch, a hyperparameter step every 4 (it straddles the epoch boundary),
    # 3 validation batches (the validation cycle does not restart with the epoch)
    train, val = loaders(batch=8, val_batch=8)
    kw = dict(
        optimizer=bilevel.optim.SGD(lr=0.05, momentum=0.5, weight_decay=1e-3),
        tune=("lr", "momentum", "weight_decay"),
        interval=4,
        lookback=3,
        mode=mode,
        progress=False,
    )
    whole = mlp(bn=True)
    t_whole = bilevel.Tuner(whole, F.mse_loss, **kw).fit(train, val, epochs=2)

    first = mlp(bn=True)
    t_first = bilevel.Tuner(first, F.mse_loss, **kw).fit(train, val, epochs=1)
    sd = copy.deepcopy(t_first.state_dict())
    resumed = mlp(bn=True)
    t_resumed = bilevel.Tuner(resumed, F.mse_loss, **kw)
    t_resumed.load_state_dict(sd)
    t_resumed.fit(train, val, epochs=1)

    for (k, p), (_, q) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), k
    assert t_whole.hparams == t_resumed.hparams
    assert t_whole.history == t_resumed.history
    assert t_whole.hparams["lr"] != 0.05  # something was tuned


def test_state_dict_resume_with_a_shuffling_loader():
    """The checkpoint holds torch's random state: epoch 2's shuffled order is the uninterrupted run's."""
    train = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
    _, val = loaders()
    kw = dict(optimizer=bilevel.optim.SGD(lr=0.05), interval=4, progress=False)
    whole = mlp()
    t_whole = bilevel.Tuner(whole, F.mse_loss, **kw).fit(train, val, epochs=2)
    first = mlp()
    sd = copy.deepcopy(bilevel.Tuner(first, F.mse_loss, **kw).fit(train, val, epochs=1).state_dict())
    resumed = mlp()  # re-seeds torch: without the saved state, epoch 2 would be shuffled differently
    t_resumed = bilevel.Tuner(resumed, F.mse_loss, **kw)
    t_resumed.load_state_dict(sd)
    t_resumed.fit(train, val, epochs=1)
    for (k, p), (_, q) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), k
    assert t_whole.history == t_resumed.history


# ---------------------------------------------------------------- (j) trust: what the Tuner does to the model


def _digits_like(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=D)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def test_validation_draws_never_touch_the_training_stream():
    """Tuning on, shuffled train and val loaders without generators: the training batches come in exactly the
    order a plain loop over the same loader sees (validation batches are drawn on a stream of their own)."""
    train = DataLoader(TensorDataset(X, Y), batch_size=8, shuffle=True)
    val = DataLoader(TensorDataset(XV, YV), batch_size=8, shuffle=True)
    seen = []

    def train_loss(model, batch):
        seen.append(batch[0][:, 0].clone())
        return F.mse_loss(model(batch[0]), batch[1])

    torch.manual_seed(5)
    tuner = bilevel.Tuner(
        mlp(),
        optimizer=bilevel.optim.SGD(lr=0.05),
        train_loss=train_loss,
        tune=("lr",),
        val_loss=lambda m, b: F.mse_loss(m(b[0]), b[1]),
        interval=2,
        progress=False,
    )
    torch.manual_seed(5)
    tuner.fit(train, val, epochs=3)
    steps = [s for s in seen]  # weight steps and hyperparameter steps' training-loss evaluations
    torch.manual_seed(5)
    plain = [x[:, 0].clone() for _ in range(3) for x, _ in train]
    weight_steps = []
    for s in steps:  # drop the repeats of a hyperparameter step (the same batch evaluated again)
        if not weight_steps or not torch.equal(s, weight_steps[-1]):
            weight_steps.append(s)
    assert len(weight_steps) == len(plain)
    assert all(torch.equal(a, b) for a, b in zip(weight_steps, plain))


def test_nan_in_the_data_names_the_data_and_keeps_the_last_finite_model():
    """A NaN in the 5th training batch: NonFiniteError names the data and the step, and the model (weights and
    BatchNorm statistics) is the plain loop's after 4 steps, not NaN."""
    x = X.clone()
    x[33] = float("nan")  # batch 5 of 8 examples
    train = DataLoader(TensorDataset(x, Y), batch_size=8)
    _, val = loaders()
    model = mlp(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    with pytest.raises(bilevel.NonFiniteError, match=r"data \(the training batch holds NaN or inf\) at weight step 5"):
        bilevel.Tuner(model, F.mse_loss, opt, mode="none", progress=False).fit(train, val, epochs=1)
    ref = mlp(bn=True)
    torch_loop(ref, torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5), list(train)[:4], epochs=1)
    for (k, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=k)


def linear(seed=1):
    torch.manual_seed(seed)
    return nn.Linear(3, 1).double()


def test_a_diverging_tuned_run_keeps_the_last_finite_weights():
    """A learning rate far too large (twin of torch SGD, tuned): the error names the weights or the training
    loss and the step; the model holds finite weights, those of the step before."""
    train, val = loaders()
    model = linear()
    opt = torch.optim.SGD(model.parameters(), lr=0.9)
    tuner = bilevel.Tuner(model, F.mse_loss, opt, tune=("lr",), interval=100, progress=False)
    big = DataLoader(TensorDataset(X * 40, Y * 40), batch_size=8)
    with pytest.raises(bilevel.NonFiniteError, match=r"(weights|training loss) at weight step \d+") as err:
        tuner.fit(big, val, epochs=20)
    assert err.value.step == tuner.loop.t + 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), tuner.loop.params[k])


@pytest.mark.parametrize("how", ["record", "warn"])
def test_a_population_whose_every_member_diverged_is_not_silent(how):
    train, val = loaders()
    big = DataLoader(TensorDataset(X * 40, Y * 40), batch_size=8)
    model = linear()
    initial = copy.deepcopy(model.state_dict())
    tuner = bilevel.Tuner(
        model, F.mse_loss, bilevel.optim.SGD(lr=0.9), population=3, on_divergence=how, interval=100, progress=False
    )
    if how == "record":
        with pytest.raises(bilevel.NonFiniteError, match="every member of the population"):
            tuner.fit(big, val, epochs=20)
    else:
        with pytest.warns(RuntimeWarning, match="every member of the population"):
            tuner.fit(big, val, epochs=20)
    assert sorted(e["member"] for e in tuner.divergences) == [0, 1, 2]
    assert all(e["action"] == "frozen" and isinstance(e["step"], int) for e in tuner.divergences)
    for k, v in model.state_dict().items():  # left at its initial weights (member 0's)
        assert torch.equal(v, initial[k]), k


def test_rollback_continues_and_records():
    """on_divergence="rollback" with a learning rate far too large: training goes on with a halved learning
    rate (each event in divergences and counted in history), and ends finite."""
    big = DataLoader(TensorDataset(X * 40, Y), batch_size=8)
    _, val = loaders()
    model = linear()
    tuner = bilevel.Tuner(
        model, F.mse_loss, bilevel.optim.SGD(lr=1.0), tune=("lr",), on_divergence="rollback", interval=5, progress=False
    ).fit(big, val, epochs=12)
    ev = tuner.divergences
    assert ev and all(e["action"] == "rollback" for e in ev)
    assert sum(h["events"] for h in tuner.history) == len(ev)
    shrinks = [e for e in ev if e.get("lr_factor") is not None]
    assert shrinks and [e["lr_factor"] for e in shrinks] == [0.5 ** (i + 1) for i in range(len(shrinks))]
    assert math.isfinite(tuner.history[-1]["val_loss"]) and len(tuner.history) == 12
    with pytest.raises(bilevel.NonFiniteError):  # the same run without rollback fails
        bilevel.Tuner(linear(), F.mse_loss, bilevel.optim.SGD(lr=1.0), tune=("lr",), interval=5, progress=False).fit(
            big, val, epochs=12
        )
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_only_the_optimisers_parameters_move():
    """SGD(model[2].parameters()) with tune=("lr",) or mode="none": model[0] keeps its weights."""
    train, val = loaders()
    for kw in (dict(tune=("lr",), interval=3), dict(mode="none")):
        model = mlp()
        first = copy.deepcopy(model[0].state_dict())
        bilevel.Tuner(model, F.mse_loss, torch.optim.SGD(model[2].parameters(), lr=0.05), progress=False, **kw).fit(
            train, val, epochs=2
        )
        for k, v in model[0].state_dict().items():
            assert torch.equal(v, first[k]), (kw, k)
    m = mlp()
    m[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        bilevel.Tuner(m, F.mse_loss, torch.optim.SGD(m.parameters(), lr=0.05), progress=False)


def test_parameter_groups_tuned_per_group_and_written_back():
    """Groups differing in lr (and decay): tune={"lr": "group"} starts from each group's value, tunes one value
    per group and writes it back; a scalar tune of a differing lr is refused with a pointer to "group"."""
    train, val = loaders()
    model = mlp()
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters(), "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.5,
        weight_decay=1e-3,
    )
    with pytest.raises(ValueError, match="tune=\\{'lr': 'group'\\}"):
        bilevel.Tuner(model, F.mse_loss, opt, tune=("lr",), progress=False)
    tuner = bilevel.Tuner(model, F.mse_loss, opt, tune={"lr": "group"}, interval=3, hyper_lr=0.1, progress=False)
    start = tuner.hparams["lr"]
    assert start == pytest.approx([0.01, 0.1], rel=1e-12)
    tuner.fit(train, val, epochs=3)
    lr = tuner.hparams["lr"]
    assert lr[0] != pytest.approx(0.01) and lr[1] != pytest.approx(0.1) and lr[0] != pytest.approx(lr[1])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(lr, rel=1e-12)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]  # untuned: untouched


def test_optimiser_state_carries_into_the_twin_and_back():
    """A plain loop runs 4 steps; the Tuner (twin, lr declared tuned, no hyperparameter step) continues 6 steps
    from torch's momentum buffers; a plain loop continues 4 more from the written-back state: the same as 14
    plain steps."""
    train, val = loaders()  # 6 batches
    for make in (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
    ):
        ref = mlp()
        torch_loop(ref, make(ref.parameters()), list(train) * 2 + list(train)[:2], epochs=1)
        model = mlp()
        opt = make(model.parameters())
        torch_loop(model, opt, list(train)[:4], epochs=1)
        tuner = bilevel.Tuner(model, F.mse_loss, opt, tune=("lr",), interval=1000, progress=False)
        tuner.fit(list(train)[4:] + list(train)[:4], val, steps=6)
        torch_loop(model, opt, list(train)[4:] + list(train)[:2], epochs=1)
        assert_same_weights(model, ref, rtol=1e-10, atol=1e-12)


def test_penalty_on_top_of_an_optimiser_decay_warns():
    model = mlp()
    with pytest.warns(UserWarning, match=r"AdamW optimiser also decays the weights \(weight_decay=0.01\)"):
        bilevel.Tuner(
            model,
            F.mse_loss,
            torch.optim.AdamW(model.parameters(), lr=3e-3),
            penalty=bilevel.PerWeightDecay(model),
            progress=False,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bilevel.Tuner(
            model,
            F.mse_loss,
            torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0),
            penalty=bilevel.PerWeightDecay(model),
            progress=False,
        )


def test_a_decay_at_zero_starts_at_the_same_place_on_both_paths_and_moves():
    """weight_decay=0 named in tune= and PerWeightDecay(init=0): the same warning, both start at
    ZERO_DECAY_START, and from there the tuned decay moves (more than a factor 3 in 60 hyperparameter steps on
    a noisy, overparameterised regression whose validation loss wants a large decay)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 1, generator=g, dtype=D)
    x, xv = torch.randn(24, 20, generator=g, dtype=D), torch.randn(200, 20, generator=g, dtype=D)
    y, yv = x @ w * 0.1 + torch.randn(24, 1, generator=g, dtype=D), xv @ w * 0.1
    train = DataLoader(TensorDataset(x, y), batch_size=24)
    val = DataLoader(TensorDataset(xv, yv), batch_size=200)
    start = bilevel.module_tuner.ZERO_DECAY_START
    for build in (
        lambda m: dict(optimizer=bilevel.optim.SGD(lr=0.1, weight_decay=0.0), tune=("weight_decay",)),
        lambda m: dict(
            optimizer=torch.optim.SGD(m.parameters(), lr=0.1),
            penalty=bilevel.PerWeightDecay(m, init=0.0, granularity="scalar"),
        ),
    ):
        torch.manual_seed(0)
        model = nn.Linear(20, 1, bias=False).double()
        with pytest.warns(UserWarning, match=f"starting it at {start:g}"):
            tuner = bilevel.Tuner(model, F.mse_loss, interval=5, hyper_lr=0.1, progress=False, **build(model))
        name = next(iter(tuner.hparams))
        assert tuner.hparams[name] == pytest.approx(start, rel=1e-9)
        tuner.fit(train, val, steps=300)
        assert tuner.hparams[name] > 3 * start, name


def test_evaluate_restores_the_mode_and_the_random_state():
    train, val = loaders()
    model = mlp()
    tuner = bilevel.Tuner(model, F.mse_loss, bilevel.optim.SGD(lr=0.05), progress=False)
    shuffled = DataLoader(TensorDataset(XV, YV), batch_size=8, shuffle=True)
    for mode in (True, False):
        model.train(mode)
        state = torch.get_rng_state()
        tuner.evaluate(shuffled)
        assert model.training is mode
        assert torch.equal(torch.get_rng_state(), state)


def test_bf16_autocast_hypergradient_agrees_with_float32():
    """autocast=torch.bfloat16: the forward passes run in bf16 (the loss differs from float32's in its low bits),
    the weights, hyperparameters and update stay float32, and the first hypergradient points the same way as
    float32's (cosine >= 0.99) on a small CNN on digits-like images."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(96, 1, 8, 8, generator=g), torch.randint(0, 10, (96,), generator=g)
    batch, vbatch = (x[:64], y[:64]), (x[64:], y[64:])

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))

    out = {}
    for dt in (None, torch.bfloat16):
        t = bilevel.Tuner(
            make(),
            F.cross_entropy,
            bilevel.optim.SGD(lr=0.05, momentum=0.5, weight_decay=1e-3),
            tune=("lr", "momentum", "weight_decay"),
            autocast=dt,
            progress=False,
        )
        losses = t.loop.step(batch)
        hg = t.loop.hypergradient(batch, vbatch)
        assert all(v.dtype == torch.float32 for v in [*t.loop.params.values(), *t.loop.raw.values()])
        out[dt] = (float(losses), torch.cat([hg[k].flatten() for k in sorted(hg)]))
    assert out[None][0] != out[torch.bfloat16][0] and out[None][0] == pytest.approx(out[torch.bfloat16][0], rel=2e-2)
    assert float(F.cosine_similarity(out[None][1], out[torch.bfloat16][1], dim=0)) >= 0.99
    with pytest.raises(ValueError, match="autocast must be a floating torch.dtype"):
        bilevel.Tuner(make(), F.cross_entropy, bilevel.optim.SGD(lr=0.05), autocast="bf16", progress=False)


def test_rollback_of_an_untuned_learning_rate_halves_each_group_and_writes_it_back():
    """lr not tuned (tune=("momentum",)) on a torch.optim SGD with two groups: a rollback halves both groups'
    learning rates in the twin, and fit writes the halved values back into param_groups."""
    torch.manual_seed(0)
    x, y = torch.randn(48, 3, dtype=D) * 40, torch.randn(48, 1, dtype=D)
    model = linear()
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.9}, {"params": [model.bias], "lr": 0.5}], momentum=0.5)
    tuner = bilevel.Tuner(
        model, F.mse_loss, opt, tune=("momentum",), on_divergence="rollback", interval=5, progress=False
    )
    tuner.fit(DataLoader(TensorDataset(x, y), batch_size=8), DataLoader(TensorDataset(x[:8], y[:8])), epochs=10)
    n = sum(e.get("lr_factor") is not None for e in tuner.divergences)
    assert n >= 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.9 * 0.5**n, 0.5 * 0.5**n], rel=1e-12)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
