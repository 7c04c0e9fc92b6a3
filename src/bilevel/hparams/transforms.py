"""The transforms ``natural = T(raw)`` between raw (optimisation-space) and natural hyperparameter values.

Each :class:`~bilevel.hparams.Transform` is a monotone increasing bijection from the real line onto its
natural domain, with its inverse, both differentiable torch functions: :data:`~bilevel.hparams.IDENTITY`,
:data:`~bilevel.hparams.LOG10`, :data:`~bilevel.hparams.LOG`, :data:`~bilevel.hparams.LOGIT`,
:data:`~bilevel.hparams.SOFTPLUS` (by name in :data:`~bilevel.hparams.TRANSFORMS`,
:func:`~bilevel.hparams.get_transform`) and :func:`~bilevel.hparams.scaled_tanh`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Transform",
    "IDENTITY",
    "LOG10",
    "LOG",
    "LOGIT",
    "SOFTPLUS",
    "ScaledTanh",
    "scaled_tanh",
    "TRANSFORMS",
    "get_transform",
    "NATURAL_INIT_EPS",
]

#: Natural-space samples / values for transforms with an open domain (e.g. the
#: logit's ``(0, 1)``) are clamped this far inside the domain so that the raw
#: value stays finite (``logit(1 - 1e-6) ~ 13.8``).
NATURAL_INIT_EPS = 1e-6


# --------------------------------------------------------------------------- transforms


def _as_tensor(x: float | Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


@dataclass(frozen=True)
class Transform:
    """A monotone increasing bijection ``forward: R -> domain`` with its inverse.

    ``forward(raw)`` gives the natural value, ``inverse(natural)`` the raw
    (optimisation-space) value; both are differentiable torch functions.
    ``domain`` is the (open, where finite) natural interval that ``forward`` maps onto.

    Args:
        name: the transform's name (the key of :data:`TRANSFORMS` for the predefined ones).
        domain: ``(lo, hi)``, the natural interval ``forward`` maps onto (ends may be infinite).
    """

    name: str
    domain: tuple[float, float]

    def forward(self, raw: Tensor) -> Tensor:  # pragma: no cover - overridden
        """The natural value ``T(raw)`` (differentiable).

        Args:
            raw: raw (optimisation-space) values, any shape.

        Returns:
            The natural values, same shape, inside :attr:`domain`.
        """
        raise NotImplementedError

    def inverse(self, natural: float | Tensor) -> Tensor:  # pragma: no cover - overridden
        """The raw value ``T^{-1}(natural)`` (differentiable).

        Args:
            natural: natural values inside :attr:`domain`, a number or a tensor of any shape.

        Returns:
            The raw values, same shape (float64 for a number).
        """
        raise NotImplementedError

    def __call__(self, raw: Tensor) -> Tensor:
        return self.forward(raw)

    def inverse_float(self, natural: float) -> float:
        """``inverse`` of a Python float (computed in float64); may be ``+-inf`` at the domain's ends.

        Args:
            natural: a natural value.

        Returns:
            Its raw value as a float.
        """
        return float(self.inverse(torch.tensor(float(natural), dtype=torch.float64)))

    def clamp_into_domain(self, natural: Tensor, eps: float = NATURAL_INIT_EPS) -> Tensor:
        """Move values at or beyond a finite end of the (open) domain ``eps`` inside it.

        Values strictly inside the domain are returned unchanged (so e.g. a weight
        decay of ``1e-9`` is kept, while ``0`` becomes ``eps`` and a momentum of ``1``
        becomes ``1 - eps``), keeping ``inverse`` finite.

        Args:
            natural: natural values, any shape.
            eps: how far inside a finite end the values at or beyond it are moved.

        Returns:
            The values, same shape, inside the open domain.
        """
        lo, hi = self.domain
        if math.isfinite(lo):
            natural = torch.where(natural <= lo, torch.full_like(natural, lo + eps), natural)
        if math.isfinite(hi):
            natural = torch.where(natural >= hi, torch.full_like(natural, hi - eps), natural)
        return natural


@dataclass(frozen=True)
class _Identity(Transform):
    def forward(self, raw: Tensor) -> Tensor:
        return raw

    def inverse(self, natural: float | Tensor) -> Tensor:
        return _as_tensor(natural)


@dataclass(frozen=True)
class _Log10(Transform):
    """natural = 10 ** raw (Clarke et al. 2022, Table 5, "Logarithmic")."""

    def forward(self, raw: Tensor) -> Tensor:
        return torch.pow(10.0, raw)

    def inverse(self, natural: float | Tensor) -> Tensor:
        return torch.log10(_as_tensor(natural))


@dataclass(frozen=True)
class _Log(Transform):
    """natural = exp(raw)."""

    def forward(self, raw: Tensor) -> Tensor:
        return torch.exp(raw)

    def inverse(self, natural: float | Tensor) -> Tensor:
        return torch.log(_as_tensor(natural))


@dataclass(frozen=True)
class _Logit(Transform):
    """natural = sigmoid(raw) (Clarke et al. 2022, Table 5, "Sigmoidal")."""

    def forward(self, raw: Tensor) -> Tensor:
        return torch.sigmoid(raw)

    def inverse(self, natural: float | Tensor) -> Tensor:
        return torch.logit(_as_tensor(natural))


@dataclass(frozen=True)
class _Softplus(Transform):
    """natural = log(1 + exp(raw)); inverse x + log(-expm1(-x)) (stable for small and large x)."""

    def forward(self, raw: Tensor) -> Tensor:
        return F.softplus(raw)

    def inverse(self, natural: float | Tensor) -> Tensor:
        x = _as_tensor(natural)
        return x + torch.log(-torch.expm1(-x))


@dataclass(frozen=True)
class ScaledTanh(Transform):
    """natural = bound * tanh(raw / bound): a bijection R -> (-bound, bound) with slope 1 at 0.

    Keeps a value inside a box while steps near the origin are those of the identity
    (e.g. learned datapoints kept inside the data's range, :class:`bilevel.distill.DistilledData`).

    Args:
        name: the transform's name.
        domain: ``(-bound, bound)``.
        bound: the half-width of the natural interval (> 0); :func:`scaled_tanh` fills all three fields.
    """

    bound: float = 1.0

    def forward(self, raw: Tensor) -> Tensor:
        """``bound * tanh(raw / bound)``.

        Args:
            raw: raw values, any shape.

        Returns:
            The natural values, same shape, in ``(-bound, bound)``.
        """
        return self.bound * torch.tanh(raw / self.bound)

    def inverse(self, natural: float | Tensor) -> Tensor:
        """``bound * atanh(natural / bound)``.

        Args:
            natural: natural values in ``(-bound, bound)``, a number or a tensor of any shape.

        Returns:
            The raw values, same shape.
        """
        return self.bound * torch.atanh(_as_tensor(natural) / self.bound)


def scaled_tanh(bound: float) -> ScaledTanh:
    """The :class:`ScaledTanh` transform onto ``(-bound, bound)`` (``bound`` finite and > 0).

    Args:
        bound: the half-width of the natural interval.

    Returns:
        The transform, named ``"tanh(<bound>)"``.

    Raises:
        ValueError: unless ``bound`` is finite and > 0.
    """
    bound = float(bound)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"scaled_tanh: bound must be finite and > 0, got {bound}")
    return ScaledTanh(f"tanh({bound:g})", (-bound, bound), bound)


IDENTITY: Transform = _Identity("identity", (-math.inf, math.inf))
LOG10: Transform = _Log10("log10", (0.0, math.inf))
LOG: Transform = _Log("log", (0.0, math.inf))
LOGIT: Transform = _Logit("logit", (0.0, 1.0))
SOFTPLUS: Transform = _Softplus("softplus", (0.0, math.inf))

TRANSFORMS: dict[str, Transform] = {t.name: t for t in (IDENTITY, LOG10, LOG, LOGIT, SOFTPLUS)}


def get_transform(name: str | Transform) -> Transform:
    """Look a transform up by name (``"identity"``, ``"log10"``, ``"log"``, ``"logit"``, ``"softplus"``).

    A :class:`Transform` is returned unchanged. Unknown names raise ``ValueError``
    listing the known ones.

    Args:
        name: a transform's name (case-insensitive) or a :class:`Transform`.

    Returns:
        The transform.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(name, Transform):
        return name
    key = str(name).lower()
    if key not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; known transforms: {sorted(TRANSFORMS)}")
    return TRANSFORMS[key]
