"""Errors that name the problem: non-finite quantities, diverging series, bad shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "NeumannDivergenceError", "NotSymmetricError", "check_finite", "check_like"]


class NonFiniteError(FloatingPointError):
    """A loss, Jacobian-vector product or hypergradient contains NaN or inf.

    ``quantity`` names what was non-finite (e.g. ``"validation loss"``); ``step`` is the weight step it
    happened at (or the one a hyperparameter step followed), where the online loop knows it.

    Args:
        quantity: what was non-finite, e.g. ``"validation loss"``.
        detail: appended to the message after a colon (e.g. how many values), or ``""``.
        step: the weight step it happened at, or ``None`` where unknown.
    """

    def __init__(self, quantity: str, detail: str = "", step: int | None = None) -> None:
        self.quantity = quantity
        self.step = step
        msg = f"non-finite {quantity}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class NeumannDivergenceError(FloatingPointError):
    """The Neumann series sum_j (I - alpha J)^j v is growing instead of shrinking.

    It converges only when every eigenvalue of alpha (J + eps I) lies in (0, 2);
    the message suggests an alpha from a power-iteration estimate of lambda_max.

    Args:
        message: the error message.
        suggested_alpha: an alpha for which the series would converge, or ``None``.
    """

    def __init__(self, message: str, suggested_alpha: float | None = None) -> None:
        self.suggested_alpha = suggested_alpha
        super().__init__(message)


class NotSymmetricError(ValueError):
    """Conjugate gradient was asked to invert a Jacobian that is not symmetric."""


def check_finite(quantity: str, value: Tensor | Mapping[str, Tensor]) -> None:
    """Raise :class:`NonFiniteError` naming ``quantity`` (and the offending key) if needed.

    The fast path is one reduction and one host sync: a sum of finite numbers is finite
    unless it overflows, in which case the exact per-entry check below decides.

    Args:
        quantity: the name used in the error message, e.g. ``"validation loss"``.
        value: a tensor, or a dict of tensors (the message then names the first non-finite key).

    Raises:
        NonFiniteError: when any entry of ``value`` is NaN or inf.
    """
    items = value.items() if isinstance(value, Mapping) else [("", value)]
    tensors = [t for _, t in items]
    if tensors and bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in tensors]).sum())):
        return
    for key, tensor in items:
        if not bool(torch.isfinite(tensor).all()):
            where = f" (entry {key!r})" if key else ""
            raise NonFiniteError(quantity + where, f"{int((~torch.isfinite(tensor)).sum())} of {tensor.numel()} values")


def check_like(name: str, got: Mapping[str, Tensor], like: Mapping[str, Tensor], like_name: str) -> None:
    """Raise ``ValueError`` if ``got`` does not have exactly the keys and shapes of ``like``.

    Args:
        name: the name of ``got`` in the error message.
        got: the dict of tensors to check.
        like: the dict of tensors whose keys and shapes ``got`` must have.
        like_name: the name of ``like`` in the error message.

    Raises:
        ValueError: when a key is missing or extra, or a shape differs.
    """
    missing = [k for k in like if k not in got]
    extra = [k for k in got if k not in like]
    if missing or extra:
        raise ValueError(f"{name} must have the keys of {like_name}: missing {missing}, unexpected {extra}")
    for k, v in like.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{name}[{k!r}] has shape {tuple(got[k].shape)} but {like_name}[{k!r}] has shape {tuple(v.shape)}"
            )
