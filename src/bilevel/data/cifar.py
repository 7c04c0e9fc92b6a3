"""CIFAR-10 from the python-version pickle batches.

Files: ``<data_dir>/cifar-10-batches-py/{data_batch_1..5,test_batch}``.  When the
folder is missing (and downloading is allowed) the official tarball is fetched to
``<data_dir>/cifar-10-python.tar.gz``, MD5-checked and extracted.  The batch files
themselves are not checksummed (users may supply their own copies).

Note: the batches are Python pickles; only load files from a source you trust.
"""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ._files import data_dir as _data_dir, fetch

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _extract(archive: Path, dest: Path) -> None:
    dest = dest.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()) or (target != dest and dest not in target.parents):
                raise ValueError(f"refusing to extract suspicious member {m.name!r} from {archive}")
            members.append(m)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **extra)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no 'data'/'labels' entries)")
    data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(labels, dtype=np.int64)
    if len(data) != len(labels):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    download: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(X_train, y_train, X_test, y_test)``: uint8 (N, 3, 32, 32) images, int64 labels (50000 / 10000)."""
    root = _data_dir(data_dir)
    folder = root / FOLDER
    needed = [*TRAIN_BATCHES, TEST_BATCH]
    if not all((folder / b).exists() for b in needed):
        try:
            archive = fetch("cifar-10-python.tar.gz", root, urls=[CIFAR10_URL], download_if_missing=download)
        except FileNotFoundError as exc:
            missing = [str(folder / b) for b in needed if not (folder / b).exists()]
            raise FileNotFoundError(f"CIFAR-10 batch files not found: {', '.join(missing)}. {exc}") from None
        _extract(archive, root)
    train = [_read_batch(folder / b) for b in TRAIN_BATCHES]
    Xte, yte = _read_batch(folder / TEST_BATCH)
    Xtr = np.concatenate([x for x, _ in train])
    ytr = np.concatenate([y for _, y in train])
    return torch.from_numpy(Xtr), torch.from_numpy(ytr), torch.from_numpy(Xte), torch.from_numpy(yte)


def load_cifar10_splits(data_dir=None, download: bool | None = None, **kw):
    """:func:`load_cifar10` then :func:`~bilevel.data.mnist.image_splits`.

    Default: the official 10000-image test set is kept and a seeded 20% of the 50000
    training images is the validation set (``fractions=None``); pass ``fractions``
    to pool and re-split instead.
    """
    from .mnist import image_splits

    kw.setdefault("fractions", None)
    data = image_splits(*load_cifar10(data_dir, download=download), **kw)
    data.metadata["name"] = "cifar10"
    return data
