"""Benchmark data loaders: UCI regression, (Fashion-)MNIST, Penn Treebank, CIFAR-10, scikit-learn toys.

Files are looked up under a data directory: the ``data_dir`` argument, else the
``BILEVEL_DATA`` environment variable, else ``~/.cache/bilevel``.  Every file with
a known hash (:data:`CHECKSUMS`) is verified on first use in a process (``ValueError``
on mismatch); missing files are downloaded from their official sources with pooch,
checked against :data:`REGISTRY`, unless ``download=False`` or ``BILEVEL_DOWNLOAD=0``
(``FileNotFoundError`` naming the path otherwise).

``load(name, **kw)`` dispatches through :data:`DATASETS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._checksums import CHECKSUMS, REGISTRY
from ._files import clear_verification_cache, data_dir, download, fetch, file_digest, verify
from ._split import standardise
from ._types import ClassificationData, RegressionData, SplitData
from .cifar import load_cifar10, load_cifar10_splits, load_cifar100, load_cifar100_splits
from .mnist import image_splits, load_fashion_mnist, load_mnist, load_mnist_splits, parse_idx, read_idx
from .ptb import Corpus, Dictionary, batchify, get_batch, load_ptb
from .toy import load_sklearn
from .uci import UCI_ALIASES, UCI_DATASETS, load_uci, load_uci_raw, uci_name


@dataclass(frozen=True)
class DatasetInfo:
    """One entry of :data:`DATASETS`.

    Args:
        name: the registry name (:func:`dataset_name` maps aliases to it).
        kind: ``"regression"``, ``"classification"`` or ``"language-model"``.
        loader: what :func:`load` calls (a function of this module, possibly with fixed arguments).
        description: one line on the data.
    """

    name: str
    kind: str  # "regression", "classification" or "language-model"
    loader: Callable[..., Any]
    description: str

    @property
    def loader_call(self) -> str:
        """The public loader call that :func:`load` makes, e.g. ``bilevel.data.load_mnist_splits(fashion=True)``.

        Returns:
            The call as text: ``bilevel.data.FUNCTION(fixed arguments)``; further keyword arguments of
            :func:`load` are added to it.
        """
        fn: Any = self.loader
        args: tuple[Any, ...] = ()
        kwargs: dict[str, Any] = {}
        if isinstance(fn, partial):
            fn, args, kwargs = fn.func, fn.args, fn.keywords
        shown = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
        return f"bilevel.data.{fn.__name__}({', '.join(shown)})"


#: The registry :func:`load` and ``bilevel datasets`` read: name -> :class:`DatasetInfo`
#: (the eight UCI sets, MNIST, Fashion-MNIST, CIFAR-10/100, PTB, diabetes, digits).
DATASETS: dict[str, DatasetInfo] = {}
for _n, (_folder, _clarke, _rows, _ntv) in UCI_DATASETS.items():
    DATASETS[_n] = DatasetInfo(
        _n, "regression", partial(load_uci, _n), f"UCI {_folder}: {_rows} rows (Clarke train+val N={_ntv})"
    )
DATASETS["mnist"] = DatasetInfo(
    "mnist",
    "classification",
    partial(load_mnist_splits, fashion=False),
    "MNIST 70000 28x28 digits, seeded 60/20/20 split",
)
DATASETS["fashion-mnist"] = DatasetInfo(
    "fashion-mnist",
    "classification",
    partial(load_mnist_splits, fashion=True),
    "Fashion-MNIST 70000 28x28 images, seeded 60/20/20 split",
)
DATASETS["cifar10"] = DatasetInfo(
    "cifar10", "classification", load_cifar10_splits, "CIFAR-10 50000+10000 32x32 colour images"
)
DATASETS["cifar100"] = DatasetInfo(
    "cifar100",
    "classification",
    load_cifar100_splits,
    "CIFAR-100 50000+10000 32x32 colour images, 100 fine classes",
)
DATASETS["ptb"] = DatasetInfo("ptb", "language-model", load_ptb, "Penn Treebank word-level LM corpus")
DATASETS["diabetes"] = DatasetInfo(
    "diabetes", "regression", partial(load_sklearn, "diabetes"), "scikit-learn diabetes, 442 x 10 regression"
)
DATASETS["digits"] = DatasetInfo(
    "digits", "classification", partial(load_sklearn, "digits"), "scikit-learn digits, 1797 8x8 images, 10 classes"
)
del _n, _folder, _clarke, _rows, _ntv

_ALIASES: dict[str, str] = {
    **UCI_ALIASES,
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "penntreebank": "ptb",
    "penn-treebank": "ptb",
    "penn_treebank": "ptb",
}


def dataset_name(name: str) -> str:
    """Canonical registry name for ``name`` (case-insensitive, aliases accepted).

    Args:
        name: a registry name or an alias (``fmnist``, ``cifar-10``, ``penn_treebank``, UCI folder names, ...).

    Returns:
        The key of :data:`DATASETS`.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return key


def load(name: str, **kwargs: Any) -> SplitData | Corpus:
    """Load a data set of :data:`DATASETS` through its loader (:attr:`DatasetInfo.loader_call`).

    Args:
        name: the data set (:func:`dataset_name`: aliases accepted).
        **kwargs: passed to the loader (``data_dir``, split fractions, ...).

    Returns:
        The loader's result: a :class:`SplitData` (train/validation/test tensors) or a PTB :class:`Corpus`.
    """
    return DATASETS[dataset_name(name)].loader(**kwargs)


__all__ = [
    "DATASETS",
    "DatasetInfo",
    "load",
    "dataset_name",
    "SplitData",
    "RegressionData",
    "ClassificationData",
    "load_uci",
    "load_uci_raw",
    "uci_name",
    "UCI_DATASETS",
    "load_mnist",
    "load_fashion_mnist",
    "load_mnist_splits",
    "image_splits",
    "parse_idx",
    "read_idx",
    "load_ptb",
    "Corpus",
    "Dictionary",
    "batchify",
    "get_batch",
    "load_cifar10",
    "load_cifar10_splits",
    "load_cifar100",
    "load_cifar100_splits",
    "load_sklearn",
    "standardise",
    "data_dir",
    "fetch",
    "download",
    "verify",
    "file_digest",
    "clear_verification_cache",
    "CHECKSUMS",
    "REGISTRY",
]
