"""Figures after Clarke et al. (2022): Fig. 3 (landscape), 8 (median curves),
9 (CDF of final losses) and 10 (learning-rate trajectories).

Figures are drawn on :class:`matplotlib.figure.Figure` objects rendered with
the Agg canvas, so no pyplot state or interactive backend is touched.  Each
function takes ``results`` (the ``results.json`` dict) and ``path`` (a ``.png``
file, or a directory to receive the default file name) and returns the
written :class:`~pathlib.Path`, or ``None`` when the data do not allow the
figure (e.g. no ``curves``/``hparams``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..rundir import atomic_savefig
from .stats import as_array, bootstrap_curve, split_diverged

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from sklearn.gaussian_process import GaussianProcessRegressor

__all__ = [
    "plot_median_curves",
    "plot_cdf",
    "plot_lr_trajectories",
    "plot_landscape",
    "fit_landscape",
    "initial_hparams",
    "trajectories",
    "ecdf",
]


def _methods(results: dict) -> dict:
    return results.get("methods", {})


def _target(path: str | os.PathLike[str], default: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        path = path / default
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _new_figure(size: tuple[float, float] = (6.4, 4.4)) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    return atomic_savefig(fig, path, format="png", dpi=120)


def _title(results: dict, what: str) -> str:
    ds = results.get("dataset")
    return f"{what} ({ds})" if ds else what


def _matrix(rows: Iterable[Iterable[float | None] | None] | None) -> np.ndarray:
    """Ragged per-init lists (None where diverged) -> NaN-padded float matrix."""
    arrays = [as_array(r) for r in (rows or [])]
    if not arrays:
        return np.empty((0, 0))
    out = np.full((len(arrays), max(r.size for r in arrays)), np.nan)
    for i, r in enumerate(arrays):
        out[i, : r.size] = r
    out[~np.isfinite(out)] = np.nan
    return out


def _steps(block: dict, width: int) -> np.ndarray:
    steps = as_array(block.get("step")) if block.get("step") is not None else np.empty(0)
    return steps[:width] if steps.size >= width else np.arange(width, dtype=float)


def _log_if_positive(ax: Axes, axis: str, values: npt.ArrayLike) -> None:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and (v > 0).all():
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


# --------------------------------------------------------------------------- Fig. 8
def plot_median_curves(
    results: dict, path: str | os.PathLike[str], key: str = "test_loss", n_resamples: int = 1000, seed: int = 0
) -> Path | None:
    """Bootstrapped median ``key`` (default test loss) against training step, one line per method with a
    ±1 s.e. band; log y-scale. Diverged entries are ignored at each step.

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        path: the PNG to write (atomically).
        key: the recorded curve, ``curves[key]`` of each method.
        n_resamples: bootstrap resamples.
        seed: the bootstrap's seed.

    Returns:
        ``path``, or ``None`` when no method recorded curves.
    """
    fig, ax = _new_figure()
    drawn = []
    for name, m in _methods(results).items():
        block = m.get("curves") or {}
        data = _matrix(block.get(key))
        if data.size == 0 or not np.isfinite(data).any():
            continue
        med, se = bootstrap_curve(data, np.nanmedian, n_resamples, seed)
        steps = _steps(block, med.size)
        (line,) = ax.plot(steps, med, label=name, lw=1.5)
        lo, hi = med - se, med + se
        lo = np.where(lo > 0, lo, med)  # keep the band drawable on a log axis
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.25, lw=0)
        drawn.append(med)
    if not drawn:
        return None
    _log_if_positive(ax, "y", np.concatenate(drawn))
    ax.set_xlabel("training step")
    ax.set_ylabel(f"median {key.replace('_', ' ')}")
    ax.set_title(_title(results, f"Bootstrapped median {key.replace('_', ' ')}"))
    ax.legend(fontsize="small")
    return _save(fig, _target(path, "median_curves.png"))


# --------------------------------------------------------------------------- Fig. 9
def ecdf(values: Iterable[float | None] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Empirical CDF of the finite values, scaled by the fraction of runs that did not diverge.

    Args:
        values: final losses, ``None``/NaN/inf for diverged runs.

    Returns:
        Sorted ``x`` and ``y = i / n_total`` (its maximum is ``< 1`` if any run diverged).
    """
    finite, diverged = split_diverged(values)
    x = np.sort(finite)
    total = finite.size + diverged
    return x, (np.arange(1, x.size + 1) / total if total else np.empty(0))


def plot_cdf(results: dict, path: str | os.PathLike[str], key: str = "final_test_loss") -> Path | None:
    """Empirical CDFs of final test loss per method (log x); each CDF tops out at the fraction of non-diverged
    runs (Clarke et al. Fig. 9, App. B.4). Methods whose runs all diverged are listed in the legend with no curve.

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        path: the PNG to write.
        key: the per-run values of each method.

    Returns:
        ``path``, or ``None`` when no method has values.
    """
    present = {name: m[key] for name, m in _methods(results).items() if m.get(key) is not None}
    if not present:
        return None
    fig, ax = _new_figure()
    all_x = []
    for name, raw in present.items():
        x, y = ecdf(raw)
        if x.size == 0:
            ax.plot([], [], label=f"{name} (all diverged)")
            continue
        ax.step(np.r_[x[0], x], np.r_[0.0, y], where="post", label=name)
        all_x.append(x)
    if all_x:
        _log_if_positive(ax, "x", np.concatenate(all_x))
    ax.set_ylim(0.0, 1.02)
    ax.axhline(1.0, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel(key.replace("_", " "))
    ax.set_ylabel("cumulative fraction of runs")
    ax.set_title(_title(results, "Empirical CDF of " + key.replace("_", " ")))
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, _target(path, "cdf.png"))


# --------------------------------------------------------------------------- Fig. 10
def trajectories(method: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The trajectories of one hyperparameter of a method over its initialisations.

    Args:
        method: one method's results (``hparams[name]``, one list per initialisation, and ``hparams["step"]``).
        name: the hyperparameter.

    Returns:
        ``(steps, matrix[init, step])`` (NaN where missing).
    """
    block = method.get("hparams") or {}
    data = _matrix(block.get(name))
    return _steps(block, data.shape[1] if data.ndim == 2 else 0), data


def plot_lr_trajectories(
    results: dict, path: str | os.PathLike[str], n: int = 5, seed: int = 0, name: str = "lr"
) -> Path | None:
    """``n`` randomly chosen learning-rate trajectories per method (log y), one colour per method (Clarke et al.
    Fig. 10). Prefers initialisations whose trajectory is finite.

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        path: the PNG to write.
        n: trajectories per method.
        seed: the choice's seed.
        name: the hyperparameter drawn.

    Returns:
        ``path``, or ``None`` when no method recorded that hyperparameter.
    """
    fig, ax = _new_figure()
    rng = np.random.default_rng(seed)
    drawn = []
    for i, (mname, m) in enumerate(_methods(results).items()):
        steps, data = trajectories(m, name)
        if data.size == 0:
            continue
        ok = np.flatnonzero(np.isfinite(data).any(axis=1))
        if ok.size == 0:
            continue
        good = np.flatnonzero(np.isfinite(data).all(axis=1))
        pool = good if good.size >= min(n, ok.size) else ok
        pick = np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))
        color = f"C{i % 10}"
        for j, k in enumerate(pick):
            ax.plot(steps, data[k], color=color, alpha=0.8, lw=1.2, label=mname if j == 0 else None)
        drawn.append(data[pick].ravel())
    if not drawn:
        return None
    _log_if_positive(ax, "y", np.concatenate(drawn))
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate" if name == "lr" else name.replace("_", " "))
    ax.set_title(_title(results, f"Sample {'learning rate' if name == 'lr' else name} trajectories"))
    ax.legend(fontsize="small")
    return _save(fig, _target(path, "lr_trajectories.png"))


# --------------------------------------------------------------------------- Fig. 3
def initial_hparams(
    method: dict, x: str = "lr", y: str = "weight_decay", key: str = "final_test_loss"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The initial hyperparameters and final loss of every initialisation of a method.

    Args:
        method: one method's results.
        x: the first hyperparameter.
        y: the second hyperparameter.
        key: the per-run final loss.

    Returns:
        ``(x0, y0, loss)``: the first entry of each hyperparameter trajectory and the final loss (NaN where
        diverged).
    """
    _, X = trajectories(method, x)
    _, Y = trajectories(method, y)
    loss = as_array(method.get(key))
    k = min(X.shape[0], Y.shape[0], loss.size)
    if k == 0 or X.shape[1] == 0 or Y.shape[1] == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    return X[:k, 0], Y[:k, 0], loss[:k]


def fit_landscape(
    x0: npt.ArrayLike, y0: npt.ArrayLike, loss: npt.ArrayLike, nan_fill: float = 150.0, seed: int = 0
) -> GaussianProcessRegressor | None:
    """Gaussian process on ``(log10 x0, log10 y0) -> log10 loss`` (Clarke et al. App. B: RBF + white-noise
    kernel, sklearn's automatic kernel-hyperparameter fit).

    Points with non-positive or non-finite hyperparameters are dropped.

    Args:
        x0: initial values of the first hyperparameter.
        y0: initial values of the second.
        loss: final losses (NaN: diverged).
        nan_fill: the large loss that replaces a diverged run's.
        seed: the optimiser restarts' seed.

    Returns:
        The fitted ``GaussianProcessRegressor``, whose ``predict`` takes log10 inputs and returns log10 loss;
        ``None`` with fewer than 2 usable points.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    from threadpoolctl import threadpool_limits

    x0, y0, loss = (np.asarray(a, dtype=float) for a in (x0, y0, loss))
    loss = np.where(np.isfinite(loss) & (loss > 0), loss, nan_fill)
    ok = np.isfinite(x0) & np.isfinite(y0) & (x0 > 0) & (y0 > 0)
    if ok.sum() < 2:
        return None
    X = np.column_stack([np.log10(x0[ok]), np.log10(y0[ok])])
    t = np.log10(loss[ok])
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(
        length_scale=[1.0, 1.0], length_scale_bounds=(1e-2, 1e2)
    ) + WhiteKernel(1e-2, (1e-8, 1e1))
    gp = GaussianProcessRegressor(kernel=kernel, normalize_y=True, n_restarts_optimizer=2, random_state=seed)
    # one BLAS thread: the fit's small (n x n) factorisations lose badly to thread oversubscription
    # (200 points: 9.4 s of CPU time with the default BLAS threads on 2 busy cores, 0.6 s with one;
    # docs/benchmarks.md)
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(X, t)
    return gp


def plot_landscape(
    results: dict,
    path: str | os.PathLike[str],
    baseline: str = "random",
    method: str = "ours-wd-lr",
    x: str = "lr",
    y: str = "weight_decay",
    n_traj: int | None = 20,
    grid: int = 80,
    nan_fill: float = 150.0,
    seed: int = 0,
) -> Path | None:
    """Clarke et al. Fig. 3: GP-interpolated final test loss of the fixed-hyperparameter ``baseline`` runs,
    indexed by their initial ``(x, y)``, as log-log background shading, overlaid with (up to ``n_traj``)
    hyperparameter trajectories of ``method`` (circle = start, cross = end).

    Args:
        results: a Clarke-style results dict (``results["methods"][NAME]``).
        path: the PNG to write.
        baseline: the method whose final losses make the landscape.
        method: the method whose trajectories are drawn over it.
        x: the hyperparameter on the x axis.
        y: the hyperparameter on the y axis.
        n_traj: trajectories drawn (``None``: all).
        grid: the landscape's resolution per axis.
        nan_fill: the loss of a diverged run in the fit (:func:`fit_landscape`).
        seed: the fit's and the trajectories' seed.

    Returns:
        ``path``, or ``None`` if the baseline lacks usable hyperparameters.
    """
    methods = _methods(results)
    if baseline not in methods:
        return None
    x0, y0, loss = initial_hparams(methods[baseline], x, y)
    gp = fit_landscape(x0, y0, loss, nan_fill=nan_fill, seed=seed)
    if gp is None:
        return None
    Xtr = gp.X_train_
    lx = np.array([Xtr[:, 0].min(), Xtr[:, 0].max()])
    ly = np.array([Xtr[:, 1].min(), Xtr[:, 1].max()])

    traj = []
    if method in methods:
        _, TX = trajectories(methods[method], x)
        _, TY = trajectories(methods[method], y)
        k = min(TX.shape[0], TY.shape[0])
        w = min(TX.shape[1], TY.shape[1]) if k else 0
        rng = np.random.default_rng(seed)
        idx = np.arange(k)
        if n_traj is not None and k > n_traj:
            idx = np.sort(rng.choice(k, n_traj, replace=False))
        with np.errstate(divide="ignore", invalid="ignore"):
            for i in idx:
                a, b = np.log10(TX[i, :w]), np.log10(TY[i, :w])
                good = np.isfinite(a) & np.isfinite(b)
                if good.any():
                    traj.append((a[good], b[good]))
        for a, b in traj:  # widen the plotting window to hold the trajectories
            lx = np.array([min(lx[0], a.min()), max(lx[1], a.max())])
            ly = np.array([min(ly[0], b.min()), max(ly[1], b.max())])
    pad = lambda r: r + np.array([-1, 1]) * max(0.05 * (r[1] - r[0]), 0.1)  # noqa: E731
    lx, ly = pad(lx), pad(ly)

    gx, gy = np.meshgrid(np.linspace(lx[0], lx[1], grid), np.linspace(ly[0], ly[1], grid))
    z = gp.predict(np.column_stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)

    fig, ax = _new_figure((6.4, 5.0))
    mesh = ax.pcolormesh(gx, gy, z, shading="auto", cmap="viridis_r")
    fig.colorbar(mesh, ax=ax, label=f"log10 final test loss ({baseline}, GP mean)")
    ax.scatter(Xtr[:, 0], Xtr[:, 1], s=4, c="k", alpha=0.3, lw=0, label=f"{baseline} initialisations")
    for j, (a, b) in enumerate(traj):
        ax.plot(a, b, color="w", lw=1.0, alpha=0.9, label=f"{method} trajectories" if j == 0 else None)
        ax.plot(a[0], b[0], "o", color="w", ms=3)
        ax.plot(a[-1], b[-1], "x", color="r", ms=5)
    ax.set_xlim(*lx)
    ax.set_ylim(*ly)
    ax.set_xlabel(f"log10 {x}")
    ax.set_ylabel(f"log10 {y}")
    ax.set_title(_title(results, f"{method} over {baseline} landscape"))
    ax.legend(fontsize="small", loc="upper right")
    return _save(fig, _target(path, "landscape.png"))
