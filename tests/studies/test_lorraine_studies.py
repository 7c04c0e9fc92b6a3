"""Lorraine et al. (2020) studies: shared helpers, the new networks, and a CLI smoke test per experiment."""

import json
import math

import pytest
import torch

import bilevel as B
from bilevel.hypergradient import linearise
from bilevel.nets.convnets import AlexNet, CifarResNet, LeNet, module_init, resnet44
from bilevel_studies import cli
from bilevel_studies.lorraine.inverse_study import solver_matrix

# --------------------------------------------------------------------------- helpers


def _quadratic(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    inner = lambda p, h: 0.5 * p["w"] @ H @ p["w"] - (b + h["c"]) @ p["w"]  # noqa: E731
    return H, inner, {"w": torch.zeros(n, dtype=torch.float64)}, {"c": torch.zeros(n, dtype=torch.float64)}


def test_solver_matrix_matches_dense_inverse_and_neumann_series():
    H, inner, p, h = _quadratic()
    op, _, _ = linearise(p, h, inner=inner)
    torch.testing.assert_close(solver_matrix(B.Exact(), op, p), torch.linalg.inv(H))
    a, k = 0.2, 5
    eye = torch.eye(6, dtype=torch.float64)
    series = a * sum(torch.linalg.matrix_power(eye - a * H, j) for j in range(k + 1))
    torch.testing.assert_close(solver_matrix(B.Neumann(k, alpha=a), op, p), series)
    torch.testing.assert_close(solver_matrix(B.Identity(), op, p), eye)


# --------------------------------------------------------------------------- networks


def test_alexnet_and_resnet44_shapes_depth_and_seeded_init():
    x = torch.randn(2, 3, 32, 32)
    a = AlexNet(3, 10, 32)
    assert a(x).shape == (2, 10) and AlexNet(1, 7, 28, width=0.25)(torch.randn(3, 28, 28)[:, None]).shape == (3, 7)
    r = resnet44(3, 10, width=4)
    assert isinstance(r, CifarResNet) and r.depth == 44 and r(x).shape == (2, 10)
    convs = [m for m in r.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 43  # stem + 2 * 21 blocks; + the head = 44 layers
    p1 = module_init(r, torch.Generator().manual_seed(3))
    p2 = module_init(r, torch.Generator().manual_seed(3))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert LeNet()(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="at least 8x8"):
        AlexNet(image_size=4)
    with pytest.raises(ValueError, match="n >= 1"):
        CifarResNet(n=0)


# --------------------------------------------------------------------------- CLI smoke tests


def _run(tmp_path, *argv):
    assert cli.main(["run", *argv, "--out", str(tmp_path), "--threads", "1"]) in (0, None)
    return json.loads((tmp_path / "results.json").read_text())


def test_inverse_study_cli(tmp_path, data_dir):
    doc = _run(
        tmp_path,
        "inverse-study",
        "--data-dir",
        str(data_dir),
        "--hyper-steps",
        "2",
        "--interval",
        "5",
        "--compare-every",
        "1",
        "--max-lookback",
        "15",
        "--train-steps",
        "30",
        "--hidden",
        "3",
        "--lookbacks",
        "1,5",
    )
    cos, l2 = doc["metrics"]["cosine"], doc["metrics"]["l2"]
    assert set(cos) == {"neumann", "cg"} and set(cos["cg"]) == {str(k) for k in range(16)}
    # 14 weights: CG is exact after 14 iterations; Neumann with 0 terms is alpha * v, a positive multiple of
    # the identity (T1-T2) approximation, so it has the identity's direction
    assert cos["cg"]["15"] > 1 - 1e-9 and l2["cg"]["15"] < 1e-8
    assert cos["cg"]["0"] is None and -1 <= cos["neumann"]["0"] <= 1
    assert doc["metrics"]["inverse_relative_error"]["exact"] == 0.0
    assert (tmp_path / "inverse_hessian.png").exists() and (tmp_path / "hypergradient_approximations.png").exists()
    # the linear model's Hessian (the exact reference) is positive definite and reported so
    m = doc["metrics"]
    assert m["reference_hessian_positive_definite"] is True and m["reference_hessian_min_eigenvalue"] > 0


def test_inverse_study_warns_when_the_hessian_is_not_positive_definite(tmp_path, data_dir, capsys):
    """30 Adam steps leave the Fig. 4 network far from a minimum: its Hessian has a negative eigenvalue, which
    the study must say (console and results.json) instead of inverting it silently."""
    doc = _run(
        tmp_path,
        "inverse-study",
        "--data-dir",
        str(data_dir),
        "--hyper-steps",
        "1",
        "--interval",
        "2",
        "--compare-every",
        "1",
        "--max-lookback",
        "2",
        "--train-steps",
        "30",
        "--hidden",
        "3",
        "--lookbacks",
        "1",
    )
    m = doc["metrics"]
    assert m["hessian_positive_definite"] is False and m["hessian_min_eigenvalue"] < 0
    assert m["hessian_min_eigenvalue"] == doc["hessian"]["eig_min"] and doc["hessian"]["negative_eigenvalues"] >= 1
    out = capsys.readouterr().out
    assert "warning: Hessian not positive definite" in out
    # trained to its minimum (the default 3000 steps) the same network's Hessian is positive definite: no warning
    doc = _run(
        tmp_path / "ok",
        "inverse-study",
        "--data-dir",
        str(data_dir),
        "--hyper-steps",
        "1",
        "--interval",
        "2",
        "--compare-every",
        "1",
        "--max-lookback",
        "2",
        "--hidden",
        "3",
        "--lookbacks",
        "1",
    )
    assert doc["metrics"]["hessian_positive_definite"] is True and doc["metrics"]["hessian_min_eigenvalue"] > 0
    assert "not positive definite" not in capsys.readouterr().out


def test_distill_cli(tmp_path, data_dir):
    doc = _run(
        tmp_path,
        "distill",
        "--data-dir",
        str(data_dir),
        "--hyper-steps",
        "3",
        "--interval",
        "5",
        "--val-size",
        "500",
        "--eval-steps",
        "30",
        "--solver",
        "cg",
        "--lookback",
        "5",
    )
    m = doc["metrics"]
    assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["baseline_test_accuracy"] <= 1
    assert doc["num_hyperparameters"] == 7840 and len(doc["curves"]["val_loss"]) == 3
    assert (tmp_path / "distilled.png").exists()


def test_overfit_validation_cli(tmp_path, data_dir):
    doc = _run(
        tmp_path,
        "overfit-validation",
        "--data-dir",
        str(data_dir),
        "--models",
        "linear",
        "--iterations",
        "20",
        "--eval-every",
        "10",
        "--test-size",
        "200",
        "--lookback",
        "3",
    )
    final = doc["metrics"]["linear"]
    assert set(final) == {"train", "val", "test"} and all(0 <= v <= 1 for v in final.values())
    assert doc["models"]["linear"]["num_hyperparameters"] == 7850
    assert doc["models"]["linear"]["curves"]["step"] == [0, 10, 20]


def test_val_split_cli(tmp_path, data_dir):
    doc = _run(
        tmp_path,
        "val-split",
        "--data-dir",
        str(data_dir),
        "--pool",
        "300",
        "--fractions",
        "0.5",
        "--iterations",
        "20",
        "--test-size",
        "200",
        "--lookback",
        "2",
    )
    for regime in ("global", "per-weight"):
        (r,) = doc["results"][regime]
        assert r["n_val"] == 150 and 0 <= r["test_accuracy"] <= 1 and 0 <= r["retrained_test_accuracy"] <= 1
    assert doc["results"]["per-weight"][0]["weight_decay"]["count"] == 7850
    # metrics.<regime>.<fraction>, beside the older best_val_fraction
    m = doc["metrics"]
    assert set(m) == {"best_val_fraction", "global", "per-weight"}
    for regime in ("global", "per-weight"):
        (r,) = doc["results"][regime]
        assert set(m[regime]) == {"0.5"}
        assert m[regime]["0.5"] == {k: r[k] for k in ("test_accuracy", "retrained_test_accuracy", "val_accuracy")}
        assert 0 <= m[regime]["0.5"]["val_accuracy"] <= 1
    assert m["best_val_fraction"]["global"]["test_accuracy"] == 0.5


def test_distill_cifar100_has_307200_pixel_hyperparameters(tmp_path, monkeypatch):
    """Fake CIFAR-100 files (2 images per class): one learned 3x32x32 image per class = 307,200 hyperparameters."""
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("test", 100)):
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                    b"fine_labels": [j % 100 for j in range(n)],
                },
                f,
            )
    doc = _run(
        tmp_path / "o",
        "distill",
        "--dataset",
        "cifar100",
        "--data-dir",
        str(tmp_path),
        "--hyper-steps",
        "2",
        "--interval",
        "2",
        "--val-size",
        "100",
        "--eval-steps",
        "5",
        "--solver",
        "identity",
    )
    assert doc["num_hyperparameters"] == 307200 and len(doc["curves"]["val_loss"]) == 2
    assert all(math.isfinite(v) for v in doc["curves"]["val_loss"])
    (tmp_path / "none").mkdir()  # an existing folder without the data (a missing --data-dir is refused at parse time)
    with pytest.raises(SystemExit, match="CIFAR-100 data are not available"):
        monkeypatch.setenv("BILEVEL_DOWNLOAD", "0")
        cli.main(
            [
                "run",
                "distill",
                "--dataset",
                "cifar100",
                "--data-dir",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "o2"),
            ]
        )
    assert not (tmp_path / "o2").exists()  # a run that fails before its first result leaves nothing behind


def test_missing_cifar_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BILEVEL_DOWNLOAD", "0")
    with pytest.raises(SystemExit, match="CIFAR-10 data are not available"):
        cli.main(["run", "distill", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="CIFAR-10 data are not available"):
        cli.main(
            [
                "run",
                "overfit-validation",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )


# ------------------------------------------------------------------ issue 16: overfit-validation, inverse-study


class _TinyConvNet(torch.nn.Module):
    """conv -> activation -> pooling -> linear, small enough for a dense Hessian. ``smooth``: tanh and average
    pooling (a minimiser w*(lambda) where finite differences of L_V(w*(lambda)) exist); else ReLU and max-pooling
    as LeNet."""

    def __init__(self, smooth=True):
        super().__init__()
        self.smooth = smooth
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.fc = torch.nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        F = torch.nn.functional
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2) if self.smooth else F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def _tiny_data():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 3
    return (X[:6], y[:6]), (X[6:], y[6:])


@pytest.mark.parametrize("implicit", ["update", "loss"])
def test_overfit_validation_conv_hypergradient_matches_finite_differences(implicit):
    """The study's loop (vmap-ed functional_call of a conv net, per-weight log10 decays) at a minimiser w*(lambda)
    gives dL_V(w*(lambda))/dlog10(lambda) of every layer: central differences re-solving the inner problem."""
    from bilevel.population import module_forward
    from bilevel_studies.lorraine.overfit_fd_check import check

    torch.set_num_threads(1)  # hundreds of tiny solves: threads only add overhead (the autouse fixture restores)
    module = _TinyConvNet().to(torch.float64)
    params = module_init(module, torch.Generator().manual_seed(1))
    train, val = _tiny_data()
    res = check(
        module_forward(module), params, train, val, init_decay=0.05, implicit=implicit, solver="exact", warmup=50
    )
    assert set(res) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    for layer, r in res.items():
        assert abs(r["fd"]) > 1e-4, (layer, r)
        assert r["rel_error"] < 1e-5, (layer, r)


def test_overfit_validation_relu_conv_hypergradient_is_the_neumann_formula():
    """With ReLU and max-pooling (no smooth minimiser), the loop's hypergradient after SGD steps equals the same
    Neumann formula computed on one model with plain autograd, layer by layer."""
    from bilevel.population import module_forward
    from bilevel_studies.lorraine.overfit_fd_check import formula_check

    module = _TinyConvNet(smooth=False).to(torch.float64)
    params = module_init(module, torch.Generator().manual_seed(1))
    train, val = _tiny_data()
    res = formula_check(module_forward(module), params, train, val, init_decay=0.05, warmup=30, steps=5)
    for layer, r in res.items():
        assert r["reference_norm"] > 1e-8, (layer, r)
        assert r["rel_error"] < 1e-10, (layer, r)


def test_overfit_validation_stop_at_perfect_preset_and_layer_summary(tmp_path, data_dir):
    doc = _run(
        tmp_path,
        "overfit-validation",
        "--data-dir",
        str(data_dir),
        "--models",
        "linear",
        "--iterations",
        "400",
        "--eval-every",
        "20",
        "--test-size",
        "100",
        "--n-train",
        "10",
        "--n-val",
        "10",
        "--lookback",
        "2",
        "--stop-at-perfect",
    )
    r = doc["models"]["linear"]
    # stopped at the first evaluation with 100% training and validation accuracy, before --iterations
    assert r["steps"] < 400 and r["curves"]["step"][-1] == r["steps"]
    assert r["final"]["train"] == 1.0 and r["final"]["val"] == 1.0
    assert all(
        r["curves"]["val"][i] < 1.0 or r["curves"]["train"][i] < 1.0 for i in range(len(r["curves"]["step"]) - 1)
    )
    layers = r["by_layer"]
    assert set(layers) == {"W0", "b0"} and layers["W0"]["count"] == 7840
    assert 0 <= layers["W0"]["share_moved_0.1_decade"] <= 1 and layers["W0"]["hypergradient_rms"] >= 0
    # --preset authors sets the options left at their defaults, and keeps the ones given
    from bilevel_studies.lorraine import overfit_validation as OV

    ns = argparse_namespace(OV, ["--preset", "authors", "--lr", "0.001"])
    OV.apply_preset(ns)
    assert ns.optimizer == "adam" and ns.lr == 0.001 and ns.solver == "identity" and ns.interval == 5
    assert ns.init_decay == pytest.approx(2 * math.exp(-4)) and ns.hyper_lr == pytest.approx(0.01 / math.log(10))


def argparse_namespace(module, argv):
    import argparse

    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_authors_inverse_comparison_solvers_match_their_definitions():
    """inverse_comparison.py's Neumann series runs on alpha g g^T (stopping when a term stops shrinking) and its CG
    solves v v^T x = v from x0 = v: closed forms on a 5-vector."""
    from bilevel_studies.lorraine.inverse_study import AuthorsCG, AuthorsNeumann

    gen = torch.Generator().manual_seed(0)
    v = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    a, k = 0.05, 4
    M = torch.eye(5, dtype=torch.float64) - a * torch.outer(g, g)
    ref = sum(torch.linalg.matrix_power(M, j) @ v["w"] for j in range(k + 1))
    torch.testing.assert_close(AuthorsNeumann(k, a, g)(None, v)["w"], ref)
    # a term that does not shrink stops the series: g orthogonal to v leaves every term equal to v
    g_perp = g - (g @ v["w"]) / (v["w"] @ v["w"]) * v["w"]
    torch.testing.assert_close(AuthorsNeumann(k, a, g_perp)(None, v)["w"], v["w"])
    # CG on the rank-one v v^T from x0 = v reaches the minimum-residual solution v / |v|^2 in one iteration
    torch.testing.assert_close(AuthorsCG(1)(None, v)["w"], v["w"] / (v["w"] @ v["w"]))
    torch.testing.assert_close(AuthorsCG(0)(None, v)["w"], v["w"])


def test_inverse_study_net_and_authors_options(tmp_path, data_dir):
    common = ["--data-dir", str(data_dir), "--hyper-steps", "1", "--interval", "2", "--compare-every", "1"]
    common += ["--max-lookback", "3", "--train-steps", "20", "--hidden", "2", "--lookbacks", "1"]
    # (cg: 2 SGD steps leave the net far from a minimum, where a Neumann hyper step diverges)
    net = ["--fig3-model", "net", "--fig3-hidden", "3", "--solver", "cg", "--lookback", "3"]
    doc = _run(tmp_path / "net", "inverse-study", *common, *net)
    assert doc["fig3_model"] == {"kind": "net", "weights": 13 * 3 + 3 + 3 + 1, "approximations": "hessian"}
    assert set(doc["metrics"]["cosine"]["cg"]) == {"0", "1", "2", "3"}
    doc = _run(tmp_path / "authors", "inverse-study", *common, "--approximations", "authors")
    c = doc["metrics"]["cosine"]
    # both of the authors' inversions start from v itself (x0 = v; the series' first term), so at 0 steps they agree
    assert c["neumann"]["0"] == pytest.approx(c["cg"]["0"])


@pytest.mark.parametrize(
    "argv, message",
    [(["--n", "0"], "--n: must be an integer >= 1"), (["--image-size", "8"], "at least 12x12 pixels")],
)
def test_overfit_fd_check_bad_input_is_one_error_line(argv, message, capsys, data_dir):
    from bilevel_studies.lorraine.overfit_fd_check import main

    with pytest.raises(SystemExit) as e:
        main([*argv, "--data-dir", str(data_dir)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)
