"""The optional dependencies (Ray, Optuna): imported when needed, or an ``ImportError`` naming the extra."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["require"]


def require(module: str = "ray.tune") -> Any:
    """Import an optional dependency or raise an ``ImportError`` that names the extra to install.

    Args:
        module: the module, e.g. ``"ray.tune"`` or ``"optuna"``.

    Returns:
        The module.

    Raises:
        ImportError: it is not installed (``pip install 'bilevel[ray]'``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module} is needed for this (population search on Ray Tune / Bayesian optimisation): "
            f"pip install 'bilevel[ray]'  ({e})"
        ) from e
