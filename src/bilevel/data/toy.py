"""Small data sets shipped with scikit-learn (no files, no network): diabetes and digits."""

from __future__ import annotations

import numpy as np
import torch

from ._split import fractions_to_sizes, seeded_permutation, standardise
from ._types import ClassificationData, RegressionData

__all__ = ["SKLEARN_DATASETS", "load_sklearn"]

SKLEARN_DATASETS = ("diabetes", "digits")


def load_sklearn(
    name: str,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    normalise: bool = True,
) -> RegressionData | ClassificationData:
    """Seeded train / validation / test split of a scikit-learn toy data set.

    Args:
        name: ``"diabetes"`` (442 x 10 regression; inputs and target standardised with training statistics
            when ``normalise``) or ``"digits"`` (1797 8x8 images, 10 classes; pixels scaled from 0..16 to
            [0, 1] when ``normalise``, flattened to 64 features).
        fractions: train / validation / test shares.
        seed: the split's seed.
        dtype: the inputs' floating dtype.
        normalise: as above.

    Returns:
        :class:`~bilevel.data.RegressionData` (diabetes) or :class:`~bilevel.data.ClassificationData` (digits).

    Raises:
        ValueError: an unknown name.
    """
    key = str(name).strip().lower()
    if key not in SKLEARN_DATASETS:
        raise ValueError(f"unknown scikit-learn data set {name!r}; known: {', '.join(SKLEARN_DATASETS)}")
    from sklearn import datasets  # imported lazily: slow

    X, y = (datasets.load_diabetes if key == "diabetes" else datasets.load_digits)(return_X_y=True)
    n_tr, n_val, _ = fractions_to_sizes(len(X), tuple(fractions))
    p = seeded_permutation(len(X), seed).numpy()
    idx = (p[:n_tr], p[n_tr : n_tr + n_val], p[n_tr + n_val :])
    meta = {"name": key, "fractions": tuple(fractions), "seed": seed, "normalise": normalise}

    if key == "diabetes":
        Xs = [torch.as_tensor(X[i], dtype=torch.float64) for i in idx]
        ys = [torch.as_tensor(y[i], dtype=torch.float64).reshape(-1, 1) for i in idx]
        stats = {}
        if normalise:
            x_mean, x_std, Xs = standardise(*Xs)
            y_mean, y_std, ys = standardise(*ys)
            stats = {k: v.to(dtype) for k, v in dict(x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std).items()}
        Xs = [a.to(dtype) for a in Xs]
        ys = [a.to(dtype) for a in ys]
        return RegressionData(Xs[0], ys[0], Xs[1], ys[1], Xs[2], ys[2], metadata=meta, **stats)

    Xf = X.astype(np.float64) / (16.0 if normalise else 1.0)
    Xs = [torch.as_tensor(Xf[i], dtype=dtype) for i in idx]
    ys = [torch.as_tensor(y[i], dtype=torch.long) for i in idx]
    return ClassificationData(Xs[0], ys[0], Xs[1], ys[1], Xs[2], ys[2], metadata=meta, num_classes=10)
