"""Tests for bilevel.report: bootstrap statistics, Table-1 summaries and figures."""

import json
import math

import numpy as np
import pytest

from bilevel.report import (
    bootstrap,
    bootstrap_curve,
    ecdf,
    fit_landscape,
    format_pm,
    format_table,
    markdown_table,
    plot_cdf,
    plot_landscape,
    plot_lr_trajectories,
    plot_median_curves,
    print_table,
    split_diverged,
    summary_table,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


# ----------------------------------------------------------------- bootstrap
def test_bootstrap_mean_estimate_and_se_match_analytic():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    est, se = bootstrap(x, np.mean, n_resamples=1000, seed=0)
    assert est == pytest.approx(np.mean(x), rel=1e-12)
    analytic = np.std(x, ddof=1) / math.sqrt(x.size)
    assert se == pytest.approx(analytic, rel=0.10)


def test_bootstrap_median_se_matches_asymptotic():
    # The bootstrap s.e. of a median is itself noisy (relative sd ~ n^-1/4, ~16 % at
    # n = 400), so compare the average over 20 independent samples (sd ~ 4 %) with the
    # asymptotic sqrt(pi/2) sigma / sqrt(n).
    sigma, n = 2.0, 400
    ses = []
    for k in range(20):
        x = np.random.default_rng(100 + k).normal(0.0, sigma, size=n)
        est, se = bootstrap(x, np.median, n_resamples=1000, seed=k)
        assert est == np.median(x)
        ses.append(se)
    assert np.mean(ses) == pytest.approx(math.sqrt(math.pi / 2) * sigma / math.sqrt(n), rel=0.15)


def test_bootstrap_deterministic_with_seed():
    x = np.random.default_rng(3).exponential(size=50)
    assert bootstrap(x, np.median, seed=7) == bootstrap(x, np.median, seed=7)
    assert bootstrap(x, np.median, seed=7)[1] != bootstrap(x, np.median, seed=8)[1]


def test_bootstrap_stat_without_axis_argument():
    x = np.random.default_rng(4).normal(size=30)
    a = bootstrap(x, np.mean, n_resamples=200, seed=0)
    b = bootstrap(x, lambda v: float(np.mean(v)), n_resamples=200, seed=0)
    assert a[0] == pytest.approx(b[0]) and a[1] == pytest.approx(b[1])


def test_diverged_runs_excluded_and_counted():
    values = [1.0, None, 3.0, float("nan"), 5.0, float("inf")]
    finite, diverged = split_diverged(values)
    assert finite.tolist() == [1.0, 3.0, 5.0] and diverged == 3
    assert bootstrap(values, np.mean)[0] == 3.0
    assert bootstrap(values, np.median)[0] == 3.0
    assert bootstrap(values, np.mean) == bootstrap([1.0, 3.0, 5.0], np.mean)


def test_bootstrap_degenerate_samples():
    assert bootstrap([2.5]) == (2.5, 0.0)
    est, se = bootstrap([None, float("nan")])
    assert math.isnan(est) and math.isnan(se)
    est, se = bootstrap([])
    assert math.isnan(est) and math.isnan(se)


def test_bootstrap_curve_per_step():
    curves = [[1.0, 2.0, None], [3.0, 4.0, None], [5.0, None, None]]
    med, se = bootstrap_curve(curves, n_resamples=200, seed=0)
    assert med[0] == 3.0 and med[1] == 3.0 and math.isnan(med[2])
    assert se[0] > 0 and math.isnan(se[2])


def test_ecdf_scaled_by_diverged_fraction():
    x, y = ecdf([3.0, None, 1.0, 2.0])
    assert x.tolist() == [1.0, 2.0, 3.0]
    assert y.tolist() == [0.25, 0.5, 0.75]


# ----------------------------------------------------------------- tables
HAND = {
    "experiment": "clarke",
    "dataset": "toy",
    "methods": {
        "random": {"final_test_loss": [4.0, 1.0, None, 2.0, 8.0]},
        "ours-wd-lr": {"final_test_loss": [0.5, 0.25, 1.0]},
        "broken": {"final_test_loss": [None, None]},
        "single": {"final_test_loss": [7.0]},
    },
}


def test_summary_rows_hand_computed():
    rows = {r["method"]: r for r in summary_table(HAND)}
    r = rows["random"]
    assert (r["n"], r["diverged"]) == (5, 1)
    assert r["mean"] == pytest.approx(15.0 / 4)
    assert r["median"] == pytest.approx(3.0)
    assert r["best"] == 1.0
    assert r["mean_se"] > 0 and r["median_se"] > 0
    o = rows["ours-wd-lr"]
    assert (o["n"], o["diverged"], o["best"]) == (3, 0, 0.25)
    assert o["mean"] == pytest.approx(1.75 / 3) and o["median"] == 0.5
    b = rows["broken"]
    assert (b["n"], b["diverged"]) == (2, 2)
    assert all(math.isnan(b[k]) for k in ("mean", "mean_se", "median", "median_se", "best"))
    s = rows["single"]
    assert (s["mean"], s["mean_se"], s["median"], s["median_se"], s["best"]) == (7.0, 0.0, 7.0, 0.0, 7.0)
    assert list(rows) == ["random", "ours-wd-lr", "broken", "single"]


def test_format_pm_like_table_1():
    assert format_pm(24.3, 2.1) == "24 ± 2"
    assert format_pm(8.31, 0.68) == "8.3 ± 0.7"
    assert format_pm(17.1923, 0.0041) == "17.192 ± 0.004"
    assert format_pm(5.0, 0.96) == "5 ± 1"
    assert format_pm(float("nan"), float("nan")) == "—"


def test_rich_and_markdown_tables():
    from rich.console import Console

    rows = summary_table(HAND)
    md = markdown_table(rows, "toy")
    assert md.count("\n| ") == 5 and "| broken | — | — | — | 2/2 |" in md
    assert "| **0.6 ± 0.2** | **0.5 ± 0.3** | **0.250** | 0/3 |" in md  # best in bold
    assert "| random | 4 ± 1 | 3 ± 2 | 1.00 | 1/5 |" in md
    console = Console(record=True, width=120)
    console.print(format_table(rows, "toy"))
    text = console.export_text()
    assert "ours-wd-lr" in text and "#NaN" in text and "1/5" in text
    console = Console(record=True, width=120)
    assert print_table(HAND, console=console)[0]["method"] == "random"
    assert "Final test loss (clarke, toy)" in console.export_text()


# ----------------------------------------------------------------- figures
def loss_surface(lr, wd):
    """Smooth synthetic final loss with a valley at lr = 1e-1, wd = 1e-3."""
    a, b = np.log10(lr) + 1.0, np.log10(wd) + 3.0
    return 0.2 * 10 ** (0.3 * a**2 + 0.1 * b**2)


def synthetic_results(n=24, steps=30, seed=0):
    rng = np.random.default_rng(seed)
    step = list(range(0, steps * 10, 10))
    methods = {}
    for name, attract in (("random", 0.0), ("ours-wd-lr", 0.1), ("all-nan", None)):
        lr0 = 10 ** rng.uniform(-4, 0, n)
        wd0 = 10 ** rng.uniform(-6, 0, n)
        t = np.arange(steps)[None, :]
        if attract is None:
            methods[name] = {"final_test_loss": [None] * n}
            continue
        # hyperparameters relax geometrically towards the valley (constant for random)
        k = 1 - (1 - attract) ** t
        llr = np.log10(lr0)[:, None] * (1 - k) + (-1.0) * k
        lwd = np.log10(wd0)[:, None] * (1 - k) + (-3.0) * k
        final = loss_surface(10 ** llr[:, -1], 10 ** lwd[:, -1])
        curve = final[:, None] * (1 + 5 * np.exp(-t / 5))
        final_l = final.tolist()
        curve_l = curve.tolist()
        for i in range(0, n, 7):  # a few diverged runs
            final_l[i] = None
            curve_l[i] = curve_l[i][: steps // 2] + [None] * (steps - steps // 2)
        methods[name] = {
            "final_test_loss": final_l,
            "final_val_loss": final_l,
            "seconds": [1.0] * n,
            "curves": {"step": step, "test_loss": curve_l, "val_loss": curve_l, "train_loss": curve_l},
            "hparams": {
                "step": step,
                "lr": (10**llr).tolist(),
                "weight_decay": (10**lwd).tolist(),
                "momentum": np.full((n, steps), 0.9).tolist(),
            },
        }
    return {"experiment": "clarke", "dataset": "synthetic", "config": {}, "methods": methods}


@pytest.fixture(scope="module")
def results():
    return synthetic_results()


@pytest.mark.parametrize(
    "fn, name",
    [
        (plot_median_curves, "median.png"),
        (plot_cdf, "cdf.png"),
        (plot_lr_trajectories, "lr.png"),
        (plot_landscape, "land.png"),
    ],
)
def test_figures_write_png(results, tmp_path, fn, name):
    path = fn(results, tmp_path / name)
    assert path == tmp_path / name and is_png(path)


def test_figure_into_directory(results, tmp_path):
    path = plot_cdf(results, tmp_path / "figs")
    assert path == tmp_path / "figs" / "cdf.png" and is_png(path)


def test_figures_skip_without_curves_or_hparams(tmp_path):
    assert plot_median_curves(HAND, tmp_path / "a.png") is None
    assert plot_lr_trajectories(HAND, tmp_path / "b.png") is None
    assert plot_landscape(HAND, tmp_path / "c.png") is None
    assert is_png(plot_cdf(HAND, tmp_path / "d.png"))  # CDF needs only final losses


def test_landscape_gp_interpolates_smooth_function():
    rng = np.random.default_rng(0)
    lr = 10 ** rng.uniform(-4, 0, 60)
    wd = 10 ** rng.uniform(-6, 0, 60)
    loss = loss_surface(lr, wd)
    gp = fit_landscape(lr, wd, loss)
    X = np.column_stack([np.log10(lr), np.log10(wd)])
    assert np.max(np.abs(gp.predict(X) - np.log10(loss))) < 0.05
    # and generalises to unseen points inside the hull
    lt, wt = 10 ** rng.uniform(-3.5, -0.5, 20), 10 ** rng.uniform(-5.5, -0.5, 20)
    pred = gp.predict(np.column_stack([np.log10(lt), np.log10(wt)]))
    assert np.max(np.abs(pred - np.log10(loss_surface(lt, wt)))) < 0.15


def test_landscape_diverged_filled_with_large_loss():
    lr = np.array([1e-3, 1e-2, 1e-1, 1.0, 1e-3, 1e-1])
    wd = np.array([1e-4, 1e-3, 1e-2, 1e-1, 1e-1, 1e-4])
    gp = fit_landscape(lr, wd, [1.0, 1.0, 1.0, None, 1.0, 1.0], nan_fill=150.0)
    assert gp.y_train_.shape == (6,)
    assert gp.predict(np.log10([[1.0, 1e-1]]))[0] > 1.0  # pulled towards log10(150)


def test_write_report(results, tmp_path):
    from rich.console import Console

    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    written = write_report(path, tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    names = sorted(p.name for p in written)
    assert names == ["cdf.png", "landscape.png", "lr_trajectories.png", "median_curves.png", "table.md"]
    assert all(is_png(p) for p in written if p.suffix == ".png")
    assert "| all-nan |" in (tmp_path / "out" / "table.md").read_text()


def test_write_report_robust_single_init_and_no_curves(tmp_path):
    from rich.console import Console

    res = synthetic_results(n=1, steps=5)
    del res["methods"]["ours-wd-lr"]["curves"]
    written = write_report(res, tmp_path, console=Console(file=open("/dev/null", "w")))
    assert {p.name for p in written} >= {"table.md", "cdf.png", "lr_trajectories.png"}


# ----------------------------------------------------------------- other experiments (metrics tables)
def _quiet():
    import io

    from rich.console import Console

    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def test_write_report_rejects_unknown_or_malformed_files(tmp_path):
    console, _ = _quiet()
    bad = {
        "no experiment": ({"metrics": {"a": 1.0}}, "no 'experiment' field"),
        "other without metrics": ({"experiment": "my-study", "results": {}}, "'my-study' has no 'metrics'"),
        "no metrics": ({"experiment": "val-split", "results": {}}, "has no 'metrics' mapping"),
        "empty metrics": ({"experiment": "val-split", "metrics": {}}, "'metrics' is empty"),
        "clarke without methods": ({"experiment": "clarke"}, "needs a 'methods' mapping"),
        "not an object": ([1, 2], "must hold a JSON object"),
    }
    for name, (doc, message) in bad.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=message):
            write_report(path, tmp_path / "out", console=console)
    # any experiment (a user's own too) with a metrics mapping is rendered; the library does not list them
    (tmp_path / "mine.json").write_text(json.dumps({"experiment": "my-study", "metrics": {"a": {"loss": 0.25}}}))
    assert write_report(tmp_path / "mine.json", tmp_path / "out", console=console) == [tmp_path / "out" / "table.md"]
    assert "0.25" in (tmp_path / "out" / "table.md").read_text()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        write_report(tmp_path / "broken.json", tmp_path / "out", console=console)


def test_flatten_metrics_layouts():
    from bilevel.report.generic import flatten_metrics, metrics_table

    m = {"a": {"x": 1.0, "y": None}, "b": {"x": 2.5, "flag": True}, "grid": [[1, 2], [3, 4]]}
    assert flatten_metrics(m)[:2] == [(("a", "x"), 1.0), (("a", "y"), None)]
    assert (("grid", "1", "0"), 3) not in flatten_metrics(m) and (("grid", "1"), [3, 4]) in flatten_metrics(m)
    cols, rows = metrics_table(m)
    assert cols == ["", "x", "y", "flag", "0", "1"]
    assert rows == [
        ["a", "1", "-", "", "", ""],
        ["b", "2.5", "", "yes", "", ""],
        ["grid", "", "", "", "[1, 2]", "[3, 4]"],
    ]
    cols, rows = metrics_table({f"k{i}": {f"c{j}": float(j) for j in range(12)} for i in range(2)})
    assert cols == ["metric", "value"] and rows[0] == ["k0 / c0", "0"] and len(rows) == 24
