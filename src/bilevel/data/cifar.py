"""CIFAR-10 and CIFAR-100 from the python-version pickle batches (Krizhevsky 2009).

Files: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}`` and
``<data_dir>/cifar-100-python/{train,test}`` (fine labels, 100 classes).  When the
folder is missing (and downloading is allowed) the official tarball is fetched to
``<data_dir>/cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, MD5-checked and
extracted.  The batch files themselves are not checksummed (users may supply their own copies).

Note: the batches are Python pickles; only load files from a source you trust.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._files import data_dir as _data_dir
from ._files import fetch
from ._types import ClassificationData

__all__ = [
    "CIFAR10_URL",
    "CIFAR100_URL",
    "FOLDER",
    "TRAIN_BATCHES",
    "TEST_BATCH",
    "CLASSES",
    "load_cifar10",
    "load_cifar100",
    "load_cifar10_splits",
    "load_cifar100_splits",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class _Layout:
    name: str  # "CIFAR-10" / "CIFAR-100", for messages
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str


_CIFAR10 = _Layout("CIFAR-10", "cifar-10-python.tar.gz", FOLDER, TRAIN_BATCHES, TEST_BATCH, "labels")
_CIFAR100 = _Layout("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",), "test", "fine_labels")


def _extract(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or (target != dest and dest not in target.parents):
                raise ValueError(f"refusing to extract suspicious member {m.name!r} from {archive}")
            members.append(m)
        extra: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def _read_batch(path: Path, layout: _Layout = _CIFAR10) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    key = layout.label_key
    data = d.get(b"data", d.get("data"))
    labels = d.get(key.encode(), d.get(key))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a {layout.name} batch (no 'data'/'{key}' entries)")
    data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(labels, dtype=np.int64)
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _load(
    layout: _Layout, url: str, data_dir: str | os.PathLike | None, download: bool | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    root = _data_dir(data_dir)
    folder = root / layout.folder
    needed = [*layout.train, layout.test]
    if not all((folder / b).exists() for b in needed):
        try:
            archive = fetch(layout.archive, root, urls=[url], download_if_missing=download)
        except FileNotFoundError as exc:
            missing = [str(folder / b) for b in needed if not (folder / b).exists()]
            raise FileNotFoundError(f"{layout.name} batch files not found: {', '.join(missing)}. {exc}") from None
        _extract(archive, root)
    train = [_read_batch(folder / b, layout) for b in layout.train]
    Xte, yte = _read_batch(folder / layout.test, layout)
    Xtr = np.concatenate([x for x, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return torch.from_numpy(Xtr), torch.from_numpy(ytr), torch.from_numpy(Xte), torch.from_numpy(yte)


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The official CIFAR-10 train and test sets.

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: uint8 (N, 3, 32, 32) images, int64 labels (50000 / 10000).

    Raises:
        FileNotFoundError: the python batches are absent and cannot be downloaded.
    """
    return _load(_CIFAR10, CIFAR10_URL, data_dir, download)


def load_cifar100(
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The official CIFAR-100 train and test sets, fine labels.

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).

    Returns:
        ``(X_train, y_train, X_test, y_test)``: uint8 (N, 3, 32, 32), int64 fine labels 0..99 (50000 / 10000).

    Raises:
        FileNotFoundError: the python batches are absent and cannot be downloaded.
    """
    return _load(_CIFAR100, CIFAR100_URL, data_dir, download)


def load_cifar10_splits(
    data_dir: str | os.PathLike | None = None, download: bool | None = None, **kw: Any
) -> ClassificationData:
    """:func:`load_cifar10` then :func:`~bilevel.data.mnist.image_splits`.

    Default: the official 10000-image test set is kept and a seeded 20% of the 50000
    training images is the validation set (``fractions=None``); pass ``fractions``
    to pool and re-split instead.

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).
        **kw: passed to :func:`~bilevel.data.mnist.image_splits` (``fractions``, ``seed``, ``flatten``, ...).

    Returns:
        The :class:`~bilevel.data.ClassificationData` (10 classes).
    """
    return _splits(load_cifar10(data_dir, download=download), "cifar10", kw)


def load_cifar100_splits(
    data_dir: str | os.PathLike | None = None, download: bool | None = None, **kw: Any
) -> ClassificationData:
    """:func:`load_cifar100` then :func:`~bilevel.data.mnist.image_splits` (same defaults as CIFAR-10).

    Args:
        data_dir: the data directory (default: ``$BILEVEL_DATA``, else ``~/.cache/bilevel``; :func:`data_dir`).
        download: fetch missing files from their official sources (default: ``$BILEVEL_DOWNLOAD``, on).
        **kw: passed to :func:`~bilevel.data.mnist.image_splits`.

    Returns:
        The :class:`~bilevel.data.ClassificationData` (100 classes).
    """
    return _splits(load_cifar100(data_dir, download=download), "cifar100", kw)


def _splits(arrays: tuple[Tensor, Tensor, Tensor, Tensor], name: str, kw: dict[str, Any]) -> ClassificationData:
    from .mnist import image_splits

    kw.setdefault("fractions", None)
    data = image_splits(*arrays, **kw)
    data.metadata["name"] = name
    return data
