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
        "--max-steps",
        "15",
        "--train-steps",
        "30",
        "--hidden",
        "3",
        "--neumann-terms",
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
        "--max-steps",
        "2",
        "--train-steps",
        "30",
        "--hidden",
        "3",
        "--neumann-terms",
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
        "--max-steps",
        "2",
        "--hidden",
        "3",
        "--neumann-terms",
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
        "--steps",
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
        "--steps",
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
        "--steps",
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
