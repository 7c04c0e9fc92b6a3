"""Tiny end-to-end runs of `bilevel run augment` and `bilevel run lstm`, and the `lstm` study's Fig. 8 overfit check
(Algorithm 1 itself: tests/test_tuner.py)."""

import argparse
import json
import math
from types import SimpleNamespace

import pytest
import torch

from bilevel_studies.cli import main


def test_augment_cli_smoke(tmp_path, data_dir):
    rc = main(
        [
            "run",
            "augment",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--steps",
            "6",
            "--interval",
            "3",
            "--seeds",
            "1",
            "--train-size",
            "64",
            "--val-size",
            "32",
            "--eval-size",
            "32",
            "--aug-samples",
            "2",
            "--batch-size",
            "16",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert set(doc["summary"]) == {"none", "neumann", "unroll", "identity"}
    for m, runs in doc["runs"].items():
        r = runs[0]
        assert r["diverged_at"] is None
        assert 0.0 <= r["test_acc_aug"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0
        assert math.isfinite(r["test_loss"])
        # the augmenter moves only with hyperparameter optimisation
        assert (r["augmenter_change"] == 0.0) == (m == "none")
    assert (tmp_path / "augmentations.png").exists()
    # metrics.<method>: the 10-augmented-sample accuracies as headline numbers, plain ones beside them
    fields = {
        "val_accuracy",
        "test_accuracy",
        "val_accuracy_sd",
        "test_accuracy_sd",
        "val_accuracy_plain",
        "test_accuracy_plain",
        "val_accuracy_plain_sd",
        "test_accuracy_plain_sd",
        "diverged",
        "seeds",
    }
    assert set(doc["metrics"]) == set(doc["summary"])
    for m, met in doc["metrics"].items():
        assert set(met) == fields and met["diverged"] == 0 and met["seeds"] == 1
        assert met["test_accuracy"] == doc["runs"][m][0]["test_acc_aug"] == doc["summary"][m]["test_acc_aug"]["mean"]
        assert met["val_accuracy_plain"] == doc["runs"][m][0]["val_acc"]
        assert met["test_accuracy_sd"] is None  # one seed: no standard deviation


def test_augment_missing_cifar_is_a_clear_error(tmp_path):
    rc = main(
        [
            "run",
            "augment",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(tmp_path),
            "--dataset",
            "cifar10",
            "--steps",
            "1",
            "--seeds",
            "1",
        ]
    )
    assert rc == 2  # FileNotFoundError, printed by the CLI


def test_lstm_cli_smoke(tmp_path, data_dir):
    if not (data_dir / "ptb").is_dir():
        pytest.skip("PTB not available")
    rc = main(
        [
            "run",
            "lstm",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--steps",
            "4",
            "--interval",
            "2",
            "--embed",
            "8",
            "--hidden",
            "8",
            "--bptt",
            "5",
            "--batch-size",
            "4",
            "--eval-windows",
            "3",
            "--record-every",
            "2",
            "--overfit-steps",
            "4",
            "--overfit-interval",
            "2",
            "--overfit-record-every",
            "2",
            "--overfit-sequences",
            "3",
            "--overfit-size",
            "4",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    res = doc["results"]
    assert set(res) == {"none", "scalar", "many", "overfit"}
    assert res["scalar"]["n_hyperparameters"] == 7
    assert res["many"]["n_hyperparameters"] == 10000 + 8 + 8 + 8 + 2 * 32 * 8 + 2
    for s in ("none", "scalar", "many"):
        assert 100 < res[s]["val_ppl"] < 20000 and 100 < res[s]["test_ppl"] < 20000
    assert res["none"]["final_hparams"]["dropouti"] == pytest.approx(0.5)
    assert res["scalar"]["final_hparams"]["dropouti"] != pytest.approx(0.5, abs=1e-6)
    ov = res["overfit"]
    assert len(ov["val_loss"]) == 2 and all(math.isfinite(v) for v in ov["val_loss"] + ov["none_val_loss"])
    assert ov["n_hyperparameters"] == ov["n_weights"]
    assert (tmp_path / "lstm.png").exists()
    met = doc["metrics"]
    assert set(met) == set(res)
    for s in ("none", "scalar", "many"):
        assert {"val_ppl", "test_ppl", "seconds", "num_hyperparameters"} <= set(met[s])
        assert met[s]["val_ppl"] == res[s]["val_ppl"] and met[s]["num_hyperparameters"] == res[s]["n_hyperparameters"]
    assert met["overfit"]["final_val_loss"] == ov["val_loss"][-1]
    assert met["overfit"]["initial_val_loss"] == ov["initial_val_loss"]
    assert met["overfit"]["num_hyperparameters"] == ov["n_weights"] and met["overfit"]["seconds"] > 0
    # item 5 diagnostics: one entry per tuned raw tensor, one record per hyper step (4 steps, interval 2)
    hs = res["scalar"]["hypergradient_stats"]
    assert len(hs) == 7 and all(v["hyper_steps"] == 2 and v["elements"] == 1 for v in hs.values())
    assert sum(v["elements"] for v in res["many"]["hypergradient_stats"].values()) == res["many"]["n_hyperparameters"]
    assert res["none"]["hypergradient_stats"] == {}
    # item 4 diagnostics: the unigram floor of the validation targets and the decays per weight tensor
    assert 0 < ov["val_unigram_entropy"] <= ov["val_log_distinct"] + 1e-12
    assert ov["style"] == "ours" and set(ov["decays_by_tensor"]) == {
        "emb",
        "W_ih0",
        "W_hh0",
        "b0",
        "W_ih1",
        "W_hh1",
        "b1",
        "dec_W",
        "dec_b",
    }


def test_lstm_overfit_signed_decays(tmp_path, data_dir):
    """--overfit-signed: the Fig. 8 decays live in natural space and may turn negative (log10 decays cannot)."""
    if not (data_dir / "ptb").is_dir():
        pytest.skip("PTB not available")
    docs = {}
    for signed in (False, True):
        out = tmp_path / str(signed)
        rc = main(
            [
                "run",
                "lstm",
                "--out",
                str(out),
                "--data-dir",
                str(data_dir),
                "--settings",
                "overfit",
                "--bptt",
                "5",
                "--overfit-steps",
                "3",
                "--overfit-interval",
                "1",
                "--overfit-record-every",
                "1",
                "--overfit-sequences",
                "3",
                "--overfit-size",
                "4",
                "--overfit-hyper-lr",
                "0.01",
                "--threads",
                "1",
                *(["--overfit-signed"] if signed else []),
            ]
        )
        assert rc == 0
        docs[signed] = json.loads((out / "results.json").read_text())["results"]["overfit"]
    log10, signed = docs[False]["weight_decay"], docs[True]["weight_decay"]
    assert log10["min"] > 0 and signed["min"] < 0 < signed["max"] and signed["count"] == log10["count"]
    assert all(math.isfinite(v) for v in docs[True]["val_loss"])
    assert docs[True]["none_val_loss"] == docs[False]["none_val_loss"]  # the baseline does not tune


def _synthetic_corpus():
    g = torch.Generator().manual_seed(0)
    V = 60
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64)  # a skewed unigram distribution, as words are
    return SimpleNamespace(
        ntokens=V,
        train=torch.multinomial(zipf, 400, True, generator=g),
        valid=torch.multinomial(zipf, 400, True, generator=g),
    )


def _overfit_args(**overrides) -> argparse.Namespace:
    """The ``--settings overfit`` options of a tiny Fig. 8 (16 units, 10 sequences of 9 tokens, 120 steps)."""
    defaults = dict(
        dtype="float64",
        device="cpu",
        seed=0,
        layers=1,
        bptt=9,
        overfit_sequences=10,
        overfit_size=16,
        overfit_steps=120,
        overfit_lr=0.02,
        overfit_wd=1e-4,
        overfit_max_decay=10.0,
        overfit_hyper_lr=0.1,
        overfit_interval=1,
        overfit_lookback=0,
        overfit_record_every=20,
        overfit_signed=False,
    )
    return argparse.Namespace(**{**defaults, **overrides})


def test_overfit_lowers_validation_loss():
    """A tiny Fig. 8: per-weight decays tuned online drive the validation loss far below both its start
    and the same training without hyperparameter steps (which over-fits the training sequences)."""
    from bilevel_studies.lorraine.lstm import run_overfit

    corpus = _synthetic_corpus()
    a = _overfit_args()
    r = run_overfit(a, corpus)
    assert r["diverged_at"] is None and r["none_diverged_at"] is None
    assert r["n_hyperparameters"] == r["n_weights"]
    assert r["none_final_train_loss"] < 0.5 * r["initial_val_loss"]  # without HO it memorises training ...
    assert r["none_final_val_loss"] > r["initial_val_loss"]  # ... and validation gets worse
    assert r["final_val_loss"] < 0.85 * r["initial_val_loss"]
    assert r["final_val_loss"] < r["none_final_val_loss"] - 1.0
    assert r["weight_decay_mean"][-1] > 10 * a.overfit_wd


# --------------------------------------------------------------------------- issue 16, items 3-5


def _tiny_lm_problem(seed: int = 0):
    """A tiny LSTM LM (V=7, 1 x 3 units, 133 weights), 3 training and 3 validation sequences of 5 tokens."""
    from bilevel.nets.lstm import lstm_lm_init

    g = torch.Generator().manual_seed(seed)
    V = 7
    p = lstm_lm_init(V, 3, 3, 1, g, torch.float64, init_range=0.5)
    tr = torch.randint(0, V, (6, 3), generator=g)
    va = torch.randint(0, V, (6, 3), generator=g)
    return p, (tr[:-1], tr[1:].reshape(-1)), (va[:-1], va[1:].reshape(-1)), g


def _solve(loss, w0, lbfgs: bool = True):
    """Minimise ``loss(w)`` (a dict of float64 tensors): L-BFGS (unless started next to the minimiser:
    ``lbfgs=False``), then Newton steps with the dense Hessian."""
    keys = list(w0)

    def unflat(x):
        out, i = {}, 0
        for k in keys:
            out[k] = x[i : i + w0[k].numel()].reshape(w0[k].shape)
            i += w0[k].numel()
        return out

    def f(x):
        return loss(unflat(x))

    flat = torch.cat([w0[k].reshape(-1) for k in keys]).clone().requires_grad_()
    if lbfgs:
        opt = torch.optim.LBFGS(
            [flat], lr=1, max_iter=500, tolerance_grad=1e-9, history_size=50, line_search_fn="strong_wolfe"
        )

        def closure():
            opt.zero_grad()
            v = f(flat)
            v.backward()
            return v

        opt.step(closure)
    x = flat.detach()
    grad = torch.autograd.functional.jacobian(f, x)
    for _ in range(6):  # Newton converges quadratically from here: stop at round-off
        if grad.norm() < 1e-12:
            break
        x = x - torch.linalg.solve(torch.autograd.functional.hessian(f, x, vectorize=True), grad)
        grad = torch.autograd.functional.jacobian(f, x)
    return unflat(x), float(grad.norm())


@pytest.mark.parametrize("style", ["ours", "authors"])
def test_fig8_decay_hypergradient_matches_finite_differences(style):
    """Item 4 diagnosis: the per-weight-decay hypergradient of the Fig. 8 set-up is right. At a minimiser w*(l) of
    CE_train + penalty(l, w) (ours: 1/2 sum 10^l w^2; the authors': sum e^l w^2), the IFT hypergradient with the
    exact inverse (a) on dL_T/dw = 0 and (b) on Adam's update map with the decay coupled into the gradient (the
    path `bilevel run lstm --settings overfit` takes) equals central finite differences of L_V(w*(l)) along random
    directions of the 133 log-decays, each w* re-solved (L-BFGS, Newton) to a gradient norm < 1e-10."""
    import torch.nn.functional as F

    from bilevel import hypergradient
    from bilevel.nets.lstm import lstm_lm_forward
    from bilevel.solvers import Exact
    from bilevel.updates import Adam

    p, (xt, yt), (xv, yv), g = _tiny_lm_problem()
    raw = {k: -1.0 + 0.5 * torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in p.items()}
    coef = (lambda r: 0.5 * 10.0**r) if style == "ours" else torch.exp

    def ce(w, x, y):
        return F.cross_entropy(lstm_lm_forward(w, x), y)

    def inner(w, h):
        return ce(w, xt, yt) + sum((coef(h[k]) * w[k] ** 2).sum() for k in w)

    def outer(w, h):
        return ce(w, xv, yv)

    w_star, gn = _solve(lambda w: inner(w, raw), p)
    assert gn < 1e-10
    hg = hypergradient(outer, w_star, raw, inner=inner, solver=Exact())

    # (b) Adam's update map u = lr m_hat / (sqrt(v_hat) + eps), d = dCE/dw + xi w, at a state with m = 0: u(w*) = 0
    rule = Adam(lr=0.01)
    state = rule.init_state(w_star)
    state = {
        **state,
        "step": torch.tensor(7),
        "exp_avg_sq": {k: 0.01 + torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in w_star.items()},
    }

    def update(w, h):
        grads = torch.autograd.grad(ce(w, xt, yt), list(w.values()), create_graph=True)
        xi = {k: 2 * coef(h[k]) for k in w}
        return rule(w, dict(zip(w, grads)), {"weight_decay": xi}, state)[0]

    hg_update = hypergradient(outer, w_star, raw, update=update, solver=Exact())

    for _ in range(2):
        d = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in raw.items()}
        eps, vals = 1e-4, []
        for s in (1, -1):
            r = {k: raw[k] + s * eps * d[k] for k in raw}
            w, gn = _solve(lambda w, r=r: inner(w, r), w_star, lbfgs=False)  # Newton from the nearby w*
            assert gn < 1e-10
            vals.append(float(outer(w, r)))
        fd = (vals[0] - vals[1]) / (2 * eps)
        ift = sum(float((hg[k] * d[k]).sum()) for k in raw)
        ift_update = sum(float((hg_update[k] * d[k]).sum()) for k in raw)
        assert ift == pytest.approx(fd, rel=1e-5, abs=1e-9)
        assert ift_update == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_unigram_floor_closed_form():
    from bilevel_studies.lorraine.lstm import unigram_floor

    r = unigram_floor(torch.tensor([1, 1, 2, 3]), torch.tensor([1, 5, 5]))
    assert r["val_unigram_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert r["val_distinct_targets"] == 3 and r["val_log_distinct"] == pytest.approx(math.log(3))
    assert r["val_targets_unseen_in_train"] == 2 and r["val_targets"] == 4


def test_hypergradient_stats_closed_form():
    """Item 5 diagnostic: |mean| / sd of each element's hypergradients over the hyper steps, and sign agreement."""
    from bilevel_studies.lorraine.lstm import hypergradient_stats

    hgs = [torch.tensor([1.0, 1.0]), torch.tensor([3.0, -1.0])]
    st = [sum(hgs), sum(h**2 for h in hgs), 2, sum(h.sign() for h in hgs)]
    r = hypergradient_stats({"x": st}, {"x": torch.zeros(2)}, {"x": torch.tensor([0.5, -0.1])})["x"]
    # element 0: mean 2, sample sd sqrt(2) -> snr sqrt(2); element 1: mean 0 -> snr 0 (torch's median of two
    # is the lower one)
    assert r["snr_mean"] == pytest.approx(math.sqrt(2) / 2) and r["snr_median"] == pytest.approx(0.0)
    assert r["hyper_steps"] == 2 and r["elements"] == 2 and r["raw_change_max"] == pytest.approx(0.5)


def test_overfit_authors_style():
    """--overfit-style authors: tied decoder (no dec_W), coefficients exp(l) on w^2 in the training loss, IFT on the
    training loss; it runs, tunes one coefficient per weight and beats the same training without HO."""
    from bilevel_studies.lorraine.lstm import run_overfit

    a = _overfit_args(overfit_style="authors")
    r = run_overfit(a, _synthetic_corpus())
    assert r["style"] == "authors" and r["diverged_at"] is None and r["none_diverged_at"] is None
    assert (
        "dec_W" not in r["decays_by_tensor"] and r["n_hyperparameters"] == r["n_weights"] == 60 * 16 + 4 * 16 * 33 + 60
    )
    assert r["final_val_loss"] < r["none_final_val_loss"] - 1.0
    assert r["weight_decay"]["min"] > 0


def test_augment_regulariser_and_init_scale(tmp_path, data_dir):
    """Item 3 options: --unet-init-scale starts a stochastic augmenter (none keeps the identity: std exactly 0),
    --aug-reg adds the authors' regulariser to the validation loss; train accuracy and augmentation spread are
    recorded."""
    rc = main(
        [
            "run",
            "augment",
            "--out",
            str(tmp_path),
            "--data-dir",
            str(data_dir),
            "--methods",
            "none,identity",
            "--steps",
            "4",
            "--interval",
            "2",
            "--seeds",
            "1",
            "--train-size",
            "32",
            "--val-size",
            "32",
            "--eval-size",
            "32",
            "--aug-samples",
            "2",
            "--batch-size",
            "8",
            "--threads",
            "1",
            "--unet-init-scale",
            "1",
            "--aug-reg",
            "1",
            "--aug-reg-samples",
            "2",
        ]
    )
    assert rc == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs["none"][0]["augmentation_std"] == 0.0 and runs["none"][0]["augmenter_change"] == 0.0
    assert runs["identity"][0]["augmentation_std"] > 1e-4 and runs["identity"][0]["augmenter_change"] > 0
    assert all(0 <= r[0]["train_acc"] <= 1 for r in runs.values())


def test_augment_regulariser_values():
    """The regulariser is -sqrt(1e-12) for the identity augmenter and mean|E x~ - x| - mean sd(x~) otherwise."""
    from bilevel.nets.unet import UNet, unet_init
    from bilevel_studies.lorraine.augment import augment_regulariser

    g = torch.Generator().manual_seed(0)
    unet = UNet(1, 4, 2).double()
    params = {k: v.double() for k, v in unet_init(unet, g).items()}
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 1, 8, 8, generator=g, dtype=torch.float64)
    assert float(augment_regulariser(unet, params, x, eps)) == pytest.approx(-1e-6)
    params["out.weight"] = torch.randn(params["out.weight"].shape, generator=g, dtype=torch.float64)
    xs = torch.stack([torch.func.functional_call(unet, params, (x, e)) for e in eps])
    want = (xs.mean(0) - x).abs().mean() - xs.std(0).mean()
    assert float(augment_regulariser(unet, params, x, eps)) == pytest.approx(float(want), rel=1e-6)
