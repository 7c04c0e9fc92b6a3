"""Bootstrap statistics over random hyperparameter initialisations.

Clarke et al. (2022), Table 1 and Fig. 8, report the mean and the median of
the final test loss over many initialisations, each with a standard error
taken as the standard deviation of the statistic over 1000 bootstrap
resamples.  Runs that diverged (``None``/NaN/inf in ``results.json``) are, as
in the paper ("NaN final losses, which our averages ignore"), **excluded from
the statistic and counted separately**.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

__all__ = ["as_array", "split_diverged", "bootstrap", "bootstrap_curve"]


def as_array(values: Iterable | None) -> np.ndarray:
    """Floats from a JSON list.

    Args:
        values: numbers and ``None`` (``None`` itself: an empty list).

    Returns:
        A float64 array, ``None`` entries as NaN (a diverged run).
    """
    if values is None:
        return np.empty(0)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def split_diverged(values: Iterable[float | None] | np.ndarray | None) -> tuple[np.ndarray, int]:
    """The finite values and how many diverged (``None``, NaN and +-inf count as diverged).

    Args:
        values: per-run values.

    Returns:
        ``(finite values, number diverged)``.
    """
    arr = as_array(values) if not isinstance(values, np.ndarray) else values.astype(float).ravel()
    finite = np.isfinite(arr)
    return arr[finite], int((~finite).sum())


def _apply(stat: Callable, samples: np.ndarray) -> np.ndarray:
    """``stat`` along axis 1 of ``samples``; falls back to a loop for stats without ``axis``."""
    try:
        out = np.asarray(stat(samples, axis=1), dtype=float)
        if out.shape == (samples.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(row)) for row in samples])


def bootstrap(
    values: Sequence[float | None] | np.ndarray, stat: Callable = np.mean, n_resamples: int = 1000, seed: int | None = 0
) -> tuple[float, float]:
    """Bootstrap estimate and standard error of ``stat`` over ``values``.

    Diverged entries (None, NaN, inf) are excluded; count them with :func:`split_diverged`.

    Args:
        values: per-run values.
        stat: the statistic, e.g. ``np.mean`` or ``np.median``.
        n_resamples: resamples with replacement, each the size of the sample.
        seed: makes the resampling deterministic.

    Returns:
        ``(estimate, standard_error)``: ``estimate`` is ``stat`` of the finite values themselves (so
        ``bootstrap(x, np.mean)[0] == np.mean(x)``); ``standard_error`` is the standard deviation
        (``ddof=1``) of ``stat`` over the resamples. With no finite value both are NaN; with one, the
        standard error is 0.
    """
    x, _ = split_diverged(values)
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    estimate = float(_apply(stat, x[None, :])[0])
    if n == 1 or n_resamples < 2:
        return estimate, 0.0
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))
    stats = _apply(stat, x[idx])
    return estimate, float(np.std(stats, ddof=1))


def bootstrap_curve(
    curves: Iterable[Iterable[float | None] | None] | np.ndarray,
    stat: Callable = np.nanmedian,
    n_resamples: int = 1000,
    seed: int | None = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step bootstrap of ``stat`` over initialisations (Clarke et al. Fig. 8).

    Initialisations are resampled jointly (whole curves), and at each step the statistic ignores
    non-finite entries.

    Args:
        curves: one list per initialisation of per-step losses, ``None`` where diverged; ragged lists are
            padded with NaN.
        stat: the statistic (NaN-aware, e.g. ``np.nanmedian``).
        n_resamples: bootstrap resamples.
        seed: makes the resampling deterministic.

    Returns:
        ``(estimate, standard_error)`` arrays over steps; steps where every run has diverged give NaN.
    """
    rows = [as_array(c) for c in curves]
    if not rows:
        return np.empty(0), np.empty(0)
    width = max(r.size for r in rows)
    data = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        data[i, : r.size] = r
    data[~np.isfinite(data)] = np.nan
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps
        est = np.asarray(stat(data, axis=0), dtype=float)
        n = data.shape[0]
        if n < 2 or n_resamples < 2:
            return est, np.where(np.isfinite(est), 0.0, np.nan)
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_resamples, n))
        boot = np.asarray(stat(data[idx], axis=1), dtype=float)  # (n_resamples, steps)
        se = np.nanstd(boot, axis=0, ddof=1)
    se[~np.isfinite(est)] = np.nan
    return est, se
