"""MNIST and Fashion-MNIST from the original idx ``.gz`` files (no torchvision).

Files: ``<data_dir>/mnist/`` and ``<data_dir>/fashion-mnist/``, each holding
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ._files import fetch
from ._split import fractions_to_sizes, n_split, seeded_permutation
from ._types import ClassificationData

__all__ = [
    "MNIST_URLS",
    "FASHION_URLS",
    "FILES",
    "parse_idx",
    "read_idx",
    "load_mnist",
    "load_fashion_mnist",
    "image_splits",
    "load_mnist_splits",
]

MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/{file}", "http://yann.lecun.com/exdb/mnist/{file}")
FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{file}",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/{file}",
)
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

_IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def parse_idx(raw: bytes) -> np.ndarray:
    """Parse idx-format bytes (LeCun's format: 2 zero bytes, type code, ndim, big-endian dims).

    Args:
        raw: the file's content (already gunzipped).

    Returns:
        The array, with the dtype and shape the header gives.

    Raises:
        ValueError: not an idx header, or a size that does not match it.
    """
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError("not an idx file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(f"idx file size {len(raw)} does not match its header dims {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file, gunzipping it when its name ends in ``.gz``.

    Args:
        path: the file.

    Returns:
        The array (:func:`parse_idx`).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        return parse_idx(f.read())


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    fashion: bool = False,
    download: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The official MNIST (or Fashion-MNIST) train and test sets, checksum-verified.

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        fashion: Fashion-MNIST instead of MNIST.
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: uint8 images (N, 28, 28) and int64 labels, 60000 / 10000.
    """
    folder, urls = ("fashion-mnist", FASHION_URLS) if fashion else ("mnist", MNIST_URLS)
    arrays = []
    for file in FILES:
        path = fetch(
            f"{folder}/{file}", data_dir, urls=[u.format(file=file) for u in urls], download_if_missing=download
        )
        arrays.append(read_idx(path))
    Xtr, ytr, Xte, yte = arrays
    if len(Xtr) != len(ytr) or len(Xte) != len(yte):
        raise ValueError(f"{folder}: image and label counts differ")
    return (
        torch.from_numpy(Xtr.copy()),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(Xte.copy()),
        torch.from_numpy(yte.astype(np.int64)),
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None, download: bool | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The official Fashion-MNIST train and test sets: :func:`load_mnist` with ``fashion=True``.

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: uint8 images (N, 28, 28) and int64 labels, 60000 / 10000.
    """
    return load_mnist(data_dir, fashion=True, download=download)


def image_splits(
    X_train: Tensor,
    y_train: Tensor,
    X_test: Tensor,
    y_test: Tensor,
    fractions: tuple[float, float, float] | None = (0.6, 0.2, 0.2),
    seed: int = 0,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
    val_fraction: float = 0.2,
    scale: float | None = 255.0,
) -> ClassificationData:
    """Train / validation / test split of an image classification set, as floats in [0, 1].

    Args:
        X_train: the official training images, (N, H, W) or (N, C, H, W).
        y_train: their labels.
        X_test: the official test images.
        y_test: their labels.
        fractions: (default 60/20/20, Clarke et al. 2022) the official train and test sets are pooled
            (70000 images for MNIST) and shuffled with ``seed`` before splitting; ``None`` keeps the official
            test set and carves a seeded ``val_fraction`` of the training set off as validation.
        seed: the shuffle's seed.
        flatten: flatten the images to (N, C*H*W); else shape them (N, C, H, W) (a channel axis is added to
            (N, H, W) images).
        dtype: the images' floating dtype.
        val_fraction: the validation share of the training set when ``fractions`` is ``None``.
        scale: the images are divided by it (``None``: left as they are).

    Returns:
        The :class:`~bilevel.data.ClassificationData`.
    """

    def prep(X: Tensor) -> Tensor:
        X = X.to(dtype)
        if scale is not None:
            X = X / scale
        if X.ndim == 3:
            X = X.unsqueeze(1)
        return X.reshape(len(X), -1) if flatten else X

    if fractions is not None:
        X = torch.cat([X_train, X_test])
        y = torch.cat([y_train, y_test]).long()
        n_tr, n_val, _ = fractions_to_sizes(len(X), tuple(fractions))
        p = seeded_permutation(len(X), seed)
        idx = (p[:n_tr], p[n_tr : n_tr + n_val], p[n_tr + n_val :])
        parts = [(X[i], y[i]) for i in idx]
    else:
        n_val = n_split(len(X_train), val_fraction)
        p = seeded_permutation(len(X_train), seed)
        tr, va = p[: len(p) - n_val], p[len(p) - n_val :]
        parts = [(X_train[tr], y_train[tr].long()), (X_train[va], y_train[va].long()), (X_test, y_test.long())]
    num_classes = int(max(int(t.max()) for _, t in parts if len(t)) + 1)
    (Xa, ya), (Xb, yb), (Xc, yc) = parts
    meta = {
        "fractions": fractions,
        "seed": seed,
        "val_fraction": val_fraction if fractions is None else None,
        "image_shape": tuple(X_train.shape[1:]),
    }
    return ClassificationData(prep(Xa), ya, prep(Xb), yb, prep(Xc), yc, metadata=meta, num_classes=num_classes)


def load_mnist_splits(
    data_dir: str | os.PathLike | None = None, fashion: bool = False, download: bool | None = None, **kw: Any
) -> ClassificationData:
    """:func:`load_mnist` followed by :func:`image_splits` (what ``bilevel.data.load("mnist")`` and
    ``load("fashion-mnist")`` call).

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        fashion: Fashion-MNIST instead of MNIST.
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).
        **kw: passed to :func:`image_splits`.

    Returns:
        The :class:`~bilevel.data.ClassificationData` (10 classes).
    """
    data = image_splits(*load_mnist(data_dir, fashion=fashion, download=download), **kw)
    data.metadata["name"] = "fashion-mnist" if fashion else "mnist"
    return data
