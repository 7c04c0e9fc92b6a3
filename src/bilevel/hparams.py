"""Hyperparameter specifications: transforms, granularities, initialisation and clipping.

Gradient-based hyperparameter optimisation (Lorraine et al., 2020, "Optimizing
Millions of Hyperparameters by Implicit Differentiation"; Clarke et al., 2022,
"Scalable One-Pass Optimisation of High-Dimensional Weight-Update
Hyperparameters by Implicit Differentiation") runs an outer optimiser (e.g.
``torch.optim.Adam``) on an *unconstrained* ("raw" / optimisation-space)
vector ``phi`` and maps it to *natural* hyperparameter values
``lambda = T(phi)`` through a differentiable transform ``T``:

==============  =====================  ====================================
name            natural = T(raw)       raw = T^{-1}(natural)
==============  =====================  ====================================
``identity``    ``raw``                ``natural``
``log10``       ``10 ** raw``          ``log10(natural)``
``log``         ``exp(raw)``           ``log(natural)``
``logit``       ``sigmoid(raw)``       ``logit(natural)``
``softplus``    ``log(1 + exp(raw))``  ``natural + log(-expm1(-natural))``
==============  =====================  ====================================

Clarke et al. (2022), Appendix B.3, Table 5 optimise the learning rate and weight
decay in base-10 logarithmic space and momentum in inverse-sigmoid space, and
initialise by sampling uniformly

* learning rate: ``log10 lr ~ U[-6, -1]`` (natural range 1e-6 .. 0.1),
* weight decay: ``log10 wd ~ U[-7, -2]`` (natural range 1e-7 .. 0.01),
* momentum: ``mu ~ U[0, 1]`` in *natural* space (to explore values near 0 and 1),

and (Section 4) clip learning rates to ``[1e-10, 1]`` throughout. These are
available as :func:`learning_rate`, :func:`weight_decay`, :func:`momentum` and the
ready-made space :data:`CLARKE_TABLE5`.

Granularity
-----------
A hyperparameter is either one scalar for all weights (``"scalar"``), one scalar
per parameter group (``"group"``: like ``torch.optim`` parameter groups, e.g. one
learning rate for a backbone and one for a head), one scalar per parameter tensor
(``"tensor"``) or one value per weight element (``"element"``: Clarke et al.'s
high-dimensional learning rates "HDLR", Lorraine et al.'s per-weight decay). Raw
values live in a *flat* ``dict[str, Tensor]`` so that a ``torch.optim`` optimiser
can update them directly; keys are

* ``"<hp>"`` for a scalar hyperparameter (shape ``()``),
* ``"<hp>/group<i>"`` for group granularity (shape ``()``, ``i`` indexing
  :attr:`HyperParameter.groups`),
* ``"<hp>/<param_name>"`` for tensor / element granularity (shape ``()`` or the
  parameter's shape respectively).

:meth:`HyperParameterSpace.natural` maps such a dict to natural values grouped
by hyperparameter: a ``Tensor`` for scalars and ``{param_name: Tensor}`` for the
other granularities (for ``"group"``: every parameter of group ``i`` maps to the
*same* tensor ``T(raw["<hp>/group<i>"])``, so gradients through all of them
accumulate into the group's raw value) -- the convention consumed by :mod:`bilevel.updates` and
:mod:`bilevel.regularizers`. It uses pure tensor operations, so it also works
under :func:`torch.func.vmap` over a leading population dimension.

Clipping
--------
``clip=(lo, hi)`` is given in natural units but applied in raw space:
``natural = T(clamp(raw, T^{-1}(lo), T^{-1}(hi)))``. Because every transform is
monotone increasing this equals ``clamp(T(raw), lo, hi)`` up to rounding, with
the same gradient (``T'(raw)`` inside the box, ``0`` outside), but it never
evaluates ``T`` at extreme raw values: e.g. ``10 ** 400 = inf`` would otherwise
turn the gradient of a natural-space clamp into ``inf * 0 = nan``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

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
    "Granularity",
    "Groups",
    "InitSpace",
    "NATURAL_INIT_EPS",
    "HyperParameter",
    "HyperParameterSpace",
    "NaturalValue",
    "learning_rate",
    "weight_decay",
    "momentum",
    "per_weight_decay",
    "CLARKE_TABLE5",
    "for_rule",
    "start_value",
    "ZERO_DECAY_START",
]

#: Natural-space samples / values for transforms with an open domain (e.g. the
#: logit's ``(0, 1)``) are clamped this far inside the domain so that the raw
#: value stays finite (``logit(1 - 1e-6) ~ 13.8``).
NATURAL_INIT_EPS = 1e-6

InitSpace = Literal["raw", "natural"]
#: Natural hyperparameter value: one tensor, or one tensor per parameter name.
NaturalValue = Tensor | dict[str, Tensor]


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


# --------------------------------------------------------------------------- hyperparameters


class Granularity(str, Enum):
    """How many values a hyperparameter has.

    * ``SCALAR``: one value shared by all weights;
    * ``GROUP``: one scalar per parameter group (:attr:`HyperParameter.groups`, e.g. the
      ``param_groups`` of a ``torch.optim`` optimiser);
    * ``TENSOR``: one scalar per parameter tensor;
    * ``ELEMENT``: one value per weight element (the parameter's shape) --
      Clarke et al. (2022) high-dimensional learning rates, Lorraine et al. (2020)
      per-weight L2 decay.
    """

    SCALAR = "scalar"
    GROUP = "group"
    TENSOR = "tensor"
    ELEMENT = "element"


def _default_dtype_device(
    params: Mapping[str, Tensor], dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    first = next((p for p in params.values() if p.is_floating_point()), None)
    if dtype is None:
        dtype = first.dtype if first is not None else torch.get_default_dtype()
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


def _check_groups(name: str, groups: object) -> tuple[tuple[str, ...], ...]:
    """``groups`` as a tuple of tuples of names; ``ValueError`` unless it is a non-empty sequence of groups of
    strings in which no name repeats."""
    if groups is None or isinstance(groups, str) or not isinstance(groups, Iterable):
        raise ValueError(
            f"hyperparameter {name!r}: granularity 'group' needs groups=((param names of group 0), ...), got {groups!r}"
        )
    out: list[tuple[str, ...]] = []
    for g in groups:
        if isinstance(g, str) or not isinstance(g, Iterable) or not all(isinstance(p, str) for p in g):
            raise ValueError(f"hyperparameter {name!r}: each group must be a sequence of parameter names, got {g!r}")
        out.append(tuple(g))
    if not out:
        raise ValueError(f"hyperparameter {name!r}: granularity 'group' needs at least one group")
    seen: dict[str, int] = {}
    dups: list[str] = []
    for i, g in enumerate(out):
        for p in g:
            if p in seen:
                dups.append(p)
            seen[p] = i
    if dups:
        raise ValueError(f"hyperparameter {name!r}: parameters {sorted(set(dups))} appear in more than one group")
    return tuple(out)


def _group_values(h: HyperParameter, value: object) -> list[Tensor]:
    """One float64 0-d natural value per group of ``h`` from :meth:`HyperParameterSpace.from_natural`'s ``value``.

    ``value`` is a number / 0-d tensor (all groups), a sequence or 1-d tensor of one value per group, or a
    mapping ``{param_name: value}`` constant within each group.
    """
    groups = h.groups or ()

    def scalar(v: object, what: str) -> Tensor:
        t = v.detach().to(torch.float64) if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
        if t.dim():
            raise ValueError(f"from_natural: {what} for {h.name!r} must be a scalar, got shape {tuple(t.shape)}")
        return t

    if isinstance(value, Mapping):
        out: list[Tensor] = []
        for i, g in enumerate(groups):
            given = [(p, scalar(value[p], f"the value of {p!r}")) for p in g if p in value]
            if not given:
                raise ValueError(
                    f"from_natural: the mapping given for {h.name!r} has no value for group {i} "
                    f"(parameters {list(g)}); give one value per group as a sequence instead"
                )
            differ = [p for p, t in given if not torch.equal(t, given[0][1])]
            if differ:
                raise ValueError(
                    f"from_natural: the mapping given for {h.name!r} (group granularity) is not constant within "
                    f"group {i}: {given[0][0]!r} has {float(given[0][1])}, but {differ} differ"
                )
            out.append(given[0][1])
        return out
    if isinstance(value, Tensor) and value.dim() > 0:
        if value.dim() != 1:
            raise ValueError(
                f"from_natural: a tensor for {h.name!r} (group granularity) must be 0-d or hold one value per "
                f"group ({len(groups)}), got shape {tuple(value.shape)}"
            )
        vals: list[object] = list(value.detach())
    elif isinstance(value, Sequence) and not isinstance(value, str):
        vals = list(value)
    else:  # a number or a 0-d tensor: every group
        t = scalar(value, "the value")
        return [t for _ in groups]
    if len(vals) != len(groups):
        raise ValueError(f"from_natural: {h.name!r} has {len(groups)} groups, but {len(vals)} values were given")
    return [scalar(v, f"the value of group {i}") for i, v in enumerate(vals)]


@dataclass(frozen=True)
class HyperParameter:
    """Specification of one (possibly high-dimensional) hyperparameter.

    Attributes:
        name:
            Unique name, also the raw-dict key prefix; must not contain ``"/"``.
        transform:
            :class:`Transform` (or its name) with ``natural = transform.forward(raw)``.
        init_low, init_high:
            Initialisation range, uniform sampling, in ``init_space`` units.
        init_space:
            ``"raw"``: sample ``raw ~ U[init_low, init_high]`` (e.g. ``log10 lr`` in
            ``[-6, -1]``); ``"natural"``: sample ``natural ~ U[init_low, init_high]``,
            move it :data:`NATURAL_INIT_EPS` inside the transform's domain if it lies on its boundary and map it
            through ``transform.inverse`` (e.g. momentum in ``[0, 1]``). Clarke et al.
            2022, Table 5.
        granularity:
            ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"`` (see :class:`Granularity`).
        clip:
            Optional ``(lo, hi)`` in natural units, applied by :meth:`to_natural` as a
            clamp in raw space ``clamp(raw, T^{-1}(lo), T^{-1}(hi))`` (same values and
            gradients as clamping the natural value, but overflow-free; the gradient
            is zero while clipped).
        params:
            Parameter names a tensor/element hyperparameter applies to (``None``: all).
            Must be ``None`` for scalar and group granularity.
        groups:
            For group granularity (required there, ``None`` otherwise): the parameter names of
            each group, ``groups[i]`` holding those sharing the raw value ``"<name>/group<i>"``.
            A name may appear in one group only; a group may be empty (its value then applies
            to no parameter, which keeps ``i`` aligned with e.g. an optimiser's ``param_groups``).
    """

    name: str
    transform: Transform
    init_low: float
    init_high: float
    init_space: InitSpace = "raw"
    granularity: Granularity = Granularity.SCALAR
    clip: tuple[float, float] | None = None
    params: tuple[str, ...] | None = None
    groups: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"hyperparameter name must be a non-empty string without '/', got {self.name!r}")
        set_(self, "transform", get_transform(self.transform))
        try:
            set_(self, "granularity", Granularity(self.granularity))
        except ValueError:
            raise ValueError(
                f"hyperparameter {self.name!r}: unknown granularity {self.granularity!r}; "
                f"expected one of {[g.value for g in Granularity]}"
            ) from None
        if self.init_space not in ("raw", "natural"):
            raise ValueError(
                f"hyperparameter {self.name!r}: init_space must be 'raw' or 'natural', got {self.init_space!r}"
            )
        low, high = float(self.init_low), float(self.init_high)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"hyperparameter {self.name!r}: need finite init_low <= init_high, got [{low}, {high}]")
        set_(self, "init_low", low)
        set_(self, "init_high", high)
        if self.clip is not None:
            lo, hi = (float(c) for c in self.clip)
            dlo, dhi = self.transform.domain
            if not (lo < hi and lo >= dlo and hi <= dhi):
                raise ValueError(
                    f"hyperparameter {self.name!r}: clip must satisfy lo < hi within the "
                    f"{self.transform.name} domain {self.transform.domain}, got ({lo}, {hi})"
                )
            set_(self, "clip", (lo, hi))
        if self.params is not None:
            if self.granularity in (Granularity.SCALAR, Granularity.GROUP):
                raise ValueError(
                    f"hyperparameter {self.name!r}: params=... needs granularity 'tensor' or 'element' "
                    "(group granularity takes groups=...)"
                )
            if isinstance(self.params, str):
                set_(self, "params", (self.params,))
            else:
                set_(self, "params", tuple(self.params))
        if self.granularity is Granularity.GROUP:
            set_(self, "groups", _check_groups(self.name, self.groups))
        elif self.groups is not None:
            raise ValueError(f"hyperparameter {self.name!r}: groups=... needs granularity 'group'")

    # ------------------------------------------------------------------ maps

    @property
    def raw_clip(self) -> tuple[float | None, float | None]:
        """Clip bounds in raw space, ``(T^{-1}(lo), T^{-1}(hi))``; ``None`` for no bound."""
        if self.clip is None:
            return None, None
        lo, hi = (self.transform.inverse_float(c) for c in self.clip)
        return (lo if math.isfinite(lo) else None), (hi if math.isfinite(hi) else None)

    def to_natural(self, raw: Tensor) -> Tensor:
        """``T(clamp(raw, T^{-1}(lo), T^{-1}(hi)))`` -- differentiable, vmap-safe.

        Args:
            raw: raw values, any shape.

        Returns:
            The clipped natural values, same shape.
        """
        lo, hi = self.raw_clip
        if lo is not None or hi is not None:
            raw = torch.clamp(raw, min=lo, max=hi)
        return self.transform.forward(raw)

    def to_raw(self, natural: float | Tensor) -> Tensor:
        """``T^{-1}(natural)``; values on/outside a finite domain end are first moved
        :data:`NATURAL_INIT_EPS` inside it (see :meth:`Transform.clamp_into_domain`).

        Args:
            natural: natural values, a number or a tensor of any shape.

        Returns:
            The raw values, same shape (float64 for a number).
        """
        return self.transform.inverse(self.transform.clamp_into_domain(_as_tensor(natural)))

    # ------------------------------------------------------------------ layout

    def param_names(self, params: Mapping[str, Tensor]) -> list[str]:
        """Parameter names this hyperparameter covers (empty for scalar granularity; the groups' names in
        group order for group granularity).

        Args:
            params: the model's parameters by name.

        Returns:
            The names, in ``params`` order when ``params``/``groups`` are not set.

        Raises:
            ValueError: when :attr:`params` or :attr:`groups` names a parameter not in ``params``.
        """
        if self.granularity is Granularity.SCALAR:
            return []
        if self.params is None and self.groups is None:
            return list(params)
        names = list(self.params) if self.params is not None else [p for g in self.groups or () for p in g]
        unknown = [p for p in names if p not in params]
        if unknown:
            raise ValueError(
                f"hyperparameter {self.name!r} refers to unknown parameters {unknown}; known: {list(params)}"
            )
        return names

    def key(self, param_name: str | None = None) -> str:
        """The raw-dict key of this hyperparameter (``param_name=None``) or of its entry for ``param_name``.

        Args:
            param_name: a parameter name, or ``None``.

        Returns:
            ``"<name>"`` or ``"<name>/<param_name>"``.
        """
        return self.name if param_name is None else f"{self.name}/{param_name}"

    def group_key(self, index: int) -> str:
        """The raw-dict key ``"<name>/group<index>"`` of parameter group ``index`` (group granularity).

        Args:
            index: the group's position in :attr:`groups`.

        Returns:
            The key, e.g. ``"lr/group0"``.
        """
        return f"{self.name}/group{index}"

    def group_keys(self) -> list[str]:
        """The raw-dict keys of all groups, in group order (empty unless the granularity is ``"group"``)."""
        return [self.group_key(i) for i in range(len(self.groups or ()))]

    def shapes(self, params: Mapping[str, Tensor]) -> dict[str, torch.Size]:
        """Raw-dict keys of this hyperparameter and their shapes.

        Args:
            params: the model's parameters by name (names and shapes).

        Returns:
            ``{key: shape}``: ``()`` for scalar, group and tensor granularity, the parameter's shape for
            element granularity.

        Raises:
            ValueError: when the hyperparameter names a parameter not in ``params``.
        """
        if self.granularity is Granularity.SCALAR:
            return {self.name: torch.Size()}
        if self.granularity is Granularity.GROUP:
            self.param_names(params)  # every grouped name must be a parameter
            return {k: torch.Size() for k in self.group_keys()}
        if self.granularity is Granularity.TENSOR:
            return {self.key(p): torch.Size() for p in self.param_names(params)}
        return {self.key(p): params[p].shape for p in self.param_names(params)}

    def sample_raw(self, shape: Sequence[int] = (), generator: torch.Generator | None = None) -> Tensor:
        """One float64 draw of the raw initial value (see ``init_space``), on the generator's device.

        Args:
            shape: the shape of the draw (one independent value per element).
            generator: the random generator, or ``None`` for the global one (on the CPU).

        Returns:
            A float64 tensor of shape ``shape``.
        """
        dev = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64, device=dev)
        x = self.init_low + (self.init_high - self.init_low) * u
        return x if self.init_space == "raw" else self.to_raw(x)

    def select(self, raw: Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """This hyperparameter's raw entries: a tensor (scalar) or ``{param_name: tensor}``.

        For group granularity every parameter of group ``i`` maps to the raw tensor
        ``raw["<name>/group<i>"]`` itself (one object per group).

        Args:
            raw: the flat raw dict (at least this hyperparameter's keys).

        Returns:
            The raw tensor (scalar granularity) or ``{param_name: raw tensor}``.

        Raises:
            ValueError: when a key of this hyperparameter is missing or unexpected.
        """
        if self.granularity is Granularity.SCALAR:
            if self.name not in raw:
                raise ValueError(f"raw hyperparameters lack key {self.name!r}")
            return raw[self.name]
        if self.granularity is Granularity.GROUP:
            return {p: v for v, group in zip(self._group_raw(raw), self.groups or ()) for p in group}
        prefix = self.name + "/"
        out = {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
        if self.params is not None:
            missing = [self.key(p) for p in self.params if p not in out]
            extra = [self.key(p) for p in out if p not in self.params]
            if missing or extra:
                raise ValueError(f"raw hyperparameter {self.name!r}: missing keys {missing}, unexpected keys {extra}")
            out = {p: out[p] for p in self.params}
        return out

    def _group_raw(self, raw: Mapping[str, Tensor]) -> list[Tensor]:
        """The raw values of the groups, in group order; ``ValueError`` naming missing / unexpected keys."""
        keys = self.group_keys()
        missing = [k for k in keys if k not in raw]
        extra = [k for k in raw if k.startswith(self.name + "/") and k not in keys]
        if missing or extra:
            raise ValueError(f"raw hyperparameter {self.name!r}: missing keys {missing}, unexpected keys {extra}")
        return [raw[k] for k in keys]

    def natural(self, raw: Mapping[str, Tensor]) -> NaturalValue:
        """Natural value(s) of this hyperparameter from a flat raw dict.

        Args:
            raw: the flat raw dict (at least this hyperparameter's keys).

        Returns:
            ``T(clamp(raw))`` (see :meth:`to_natural`): a tensor for scalar granularity, else
            ``{param_name: tensor}``. For group granularity the value of group ``i``,
            ``T(clamp(raw["<name>/group<i>"]))``, is computed once and the same tensor object is
            given to every parameter of the group, so ``d/d raw_i`` sums the contributions of
            all the group's parameters.
        """
        if self.granularity is Granularity.GROUP:
            nats = [self.to_natural(v) for v in self._group_raw(raw)]
            return {p: nat for nat, group in zip(nats, self.groups or ()) for p in group}
        sel = self.select(raw)
        if isinstance(sel, Tensor):
            return self.to_natural(sel)
        return {p: self.to_natural(v) for p, v in sel.items()}


# --------------------------------------------------------------------------- spaces


class HyperParameterSpace:
    """An ordered collection of :class:`HyperParameter` with unique names.

    Converts between a flat raw dict (optimised by ``torch.optim``) and natural
    values grouped by hyperparameter name; see the module docstring for the key
    convention.

    Args:
        hparams: the hyperparameters, in the order of the raw dict's keys.

    Raises:
        TypeError: when an element is not a :class:`HyperParameter`.
        ValueError: when two hyperparameters share a name.
    """

    def __init__(self, hparams: Iterable[HyperParameter]) -> None:
        self._hparams: tuple[HyperParameter, ...] = tuple(hparams)
        for h in self._hparams:
            if not isinstance(h, HyperParameter):
                raise TypeError(f"HyperParameterSpace expects HyperParameter objects, got {type(h).__name__}")
        names = [h.name for h in self._hparams]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"hyperparameter names must be unique; duplicated: {dups}")
        self._by_name = {h.name: h for h in self._hparams}

    # container protocol
    def __iter__(self) -> Iterator[HyperParameter]:
        return iter(self._hparams)

    def __len__(self) -> int:
        return len(self._hparams)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> HyperParameter:
        if name not in self._by_name:
            raise KeyError(f"no hyperparameter {name!r}; known: {self.names}")
        return self._by_name[name]

    def __repr__(self) -> str:
        return f"HyperParameterSpace({list(self._hparams)!r})"

    @property
    def names(self) -> list[str]:
        return [h.name for h in self._hparams]

    def shapes(self, params: Mapping[str, Tensor]) -> dict[str, torch.Size]:
        """All raw keys and their shapes, in space order.

        Args:
            params: the model's parameters by name (names and shapes).

        Returns:
            ``{key: shape}`` (see :meth:`HyperParameter.shapes`).
        """
        out: dict[str, torch.Size] = {}
        for h in self._hparams:
            out.update(h.shapes(params))
        return out

    def keys(self, params: Mapping[str, Tensor]) -> list[str]:
        """All raw keys, in space order.

        Args:
            params: the model's parameters by name.

        Returns:
            The keys of :meth:`shapes`.
        """
        return list(self.shapes(params))

    # ------------------------------------------------------------------ construction

    def init(
        self,
        params: Mapping[str, Tensor],
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        shared_init: bool = True,
        requires_grad: bool = False,
    ) -> dict[str, Tensor]:
        """Sample raw initial values (Clarke et al. 2022, Table 5 ranges for the predefined specs).

        Draws are made in float64 on the generator's device in space order, so
        the result is deterministic given ``generator``. With ``shared_init``
        (default) a tensor/element hyperparameter gets one draw shared by all its
        keys and elements (Clarke et al. initialise HDLR from one sampled
        learning rate); otherwise every key/element is drawn independently.
        ``dtype``/``device`` default to those of the first floating parameter.
        The returned tensors are fresh (not views), optionally ``requires_grad``.

        Args:
            params: the parameters (names and shapes; dtype/device defaults).
            generator: the random generator, or ``None`` for the global one.
            dtype: raw dtype (default: the first floating parameter's).
            device: raw device (default: the first floating parameter's).
            shared_init: one draw per hyperparameter (``True``) or one per key and element.
            requires_grad: make the returned tensors leaves requiring grad.

        Returns:
            ``{key: raw initial value}`` for every raw key of the space.
        """
        dtype, device = _default_dtype_device(params, dtype, device)
        out: dict[str, Tensor] = {}
        for h in self._hparams:
            shapes = h.shapes(params)
            if h.granularity is Granularity.SCALAR or shared_init:
                v = h.sample_raw((), generator)
                vals = {k: v.expand(s) for k, s in shapes.items()}
            else:
                vals = {k: h.sample_raw(s, generator) for k, s in shapes.items()}
            for k, v in vals.items():
                out[k] = v.to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
        return out

    def from_natural(
        self,
        params: Mapping[str, Tensor],
        values: Mapping[str, float | Tensor | Mapping[str, float | Tensor] | Sequence[float | Tensor]],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        requires_grad: bool = False,
    ) -> dict[str, Tensor]:
        """Raw dict for given natural values, one entry per hyperparameter name.

        A value may be a float / 0-d tensor (broadcast to every key and element),
        a tensor of the parameter's shape (element granularity), or a mapping
        ``{param_name: value}`` for tensor/element granularity. For group granularity
        it is a float / 0-d tensor (every group), a sequence (or 1-d tensor) of one
        value per group, or a mapping ``{param_name: value}`` that is constant within
        each group (every group needs at least one of its parameters in it). Values on
        the boundary of an open domain (e.g. momentum 0 or 1) are moved
        :data:`NATURAL_INIT_EPS` inside so the raw value is finite.

        Args:
            params: the parameters (names and shapes; dtype/device defaults).
            values: natural value(s) per hyperparameter name, see above.
            dtype: raw dtype (default: the first floating parameter's).
            device: raw device (default: the first floating parameter's).
            requires_grad: make the returned tensors leaves requiring grad.

        Returns:
            ``{key: T^{-1}(value)}`` for every raw key of the space, fresh tensors.
        """
        missing = [n for n in self.names if n not in values]
        extra = [n for n in values if n not in self._by_name]
        if missing or extra:
            raise ValueError(f"from_natural needs one value per hyperparameter: missing {missing}, unexpected {extra}")
        dtype, device = _default_dtype_device(params, dtype, device)
        out: dict[str, Tensor] = {}
        for h in self._hparams:
            value = values[h.name]
            if h.granularity is Granularity.GROUP:
                for key, t in zip(h.group_keys(), _group_values(h, value)):
                    out[key] = h.to_raw(t).to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
                h.shapes(params)  # every grouped name must be a parameter
                continue
            for key, shape in h.shapes(params).items():
                pname = key.split("/", 1)[1] if "/" in key else None
                v = value
                if isinstance(value, Mapping):
                    if pname is None or pname not in value:
                        raise ValueError(f"from_natural: no value for {key!r} in the mapping given for {h.name!r}")
                    v = value[pname]
                t = (
                    torch.as_tensor(v, dtype=torch.float64)
                    if not isinstance(v, Tensor)
                    else v.detach().to(torch.float64)
                )
                if t.dim() and tuple(t.shape) != tuple(shape):
                    raise ValueError(
                        f"from_natural: value for {key!r} has shape {tuple(t.shape)}, expected () or {tuple(shape)}"
                    )
                out[key] = (
                    h.to_raw(t).expand(shape).to(dtype=dtype, device=device).clone().requires_grad_(requires_grad)
                )
        return out

    # ------------------------------------------------------------------ maps

    def check(self, raw: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> None:
        """Raise ``ValueError`` naming missing / unexpected raw keys (and, given ``params``, bad shapes).

        Args:
            raw: the flat raw dict.
            params: the model's parameters, or ``None`` to check the keys without the shapes.

        Raises:
            ValueError: on a missing or unexpected key, or a wrong shape.
        """
        missing: list[str] = []
        extra: list[str] = []
        for k in raw:
            hname, sep, _ = k.partition("/")
            h = self._by_name.get(hname)
            if h is None or (h.granularity is Granularity.SCALAR) == bool(sep):
                extra.append(k)
        if params is not None:
            expected = self.shapes(params)
            missing = [k for k in expected if k not in raw]
            extra += [k for k in raw if k not in expected and k not in extra]
        else:
            for h in self._hparams:
                if h.granularity is Granularity.SCALAR:
                    if h.name not in raw:
                        missing.append(h.name)
                elif h.granularity is Granularity.GROUP:
                    keys = h.group_keys()
                    missing += [k for k in keys if k not in raw]
                    extra += [k for k in raw if k.startswith(h.name + "/") and k not in keys]
                elif h.params is not None:
                    missing += [h.key(p) for p in h.params if h.key(p) not in raw]
                    extra += [k for k in raw if k.startswith(h.name + "/") and k[len(h.name) + 1 :] not in h.params]
                elif not any(k.startswith(h.name + "/") for k in raw):
                    missing.append(h.key("<param>"))
        if missing or extra:
            raise ValueError(
                f"raw hyperparameters do not match the space {self.names}: "
                f"missing keys {missing}, unexpected keys {extra}"
            )
        if params is not None:
            for k, s in expected.items():
                if tuple(raw[k].shape) != tuple(s):
                    raise ValueError(f"raw hyperparameter {k!r} has shape {tuple(raw[k].shape)}, expected {tuple(s)}")

    def natural(self, raw: Mapping[str, Tensor], params: Mapping[str, Tensor] | None = None) -> dict[str, NaturalValue]:
        """Differentiable map raw -> natural (with clipping), grouped by hyperparameter.

        Scalar hyperparameters give a ``Tensor``, group/tensor/element ones
        ``{param_name: Tensor}`` (group: one shared tensor per group, see
        :meth:`HyperParameter.natural`). Missing or unexpected keys raise ``ValueError``
        naming them; passing ``params`` additionally checks key coverage and shapes.
        Pure tensor ops, so usable under :func:`torch.func.vmap`.

        Args:
            raw: the flat raw dict.
            params: the model's parameters, or ``None`` (no shape check).

        Returns:
            ``{hp_name: natural value}`` (see :meth:`HyperParameter.natural`).

        Raises:
            ValueError: on a missing or unexpected key, or (given ``params``) a wrong shape.
        """
        self.check(raw, params)
        return {h.name: h.natural(raw) for h in self._hparams}

    def describe(self, raw: Mapping[str, Tensor]) -> dict[str, float]:
        """Mean natural value per hyperparameter (over all its keys and elements), for logging.

        Args:
            raw: the flat raw dict.

        Returns:
            ``{hp_name: mean natural value}`` (a group hyperparameter: the mean over its groups).
        """
        with torch.no_grad():
            nat = self.natural(raw)
        out: dict[str, float] = {}
        for name, v in nat.items():
            if self._by_name[name].granularity is Granularity.GROUP:  # mean over groups, not parameters
                groups = [self._by_name[name].to_natural(r) for r in self._by_name[name]._group_raw(raw)]
                out[name] = float(torch.stack([g.detach().to(torch.float64) for g in groups]).mean())
            elif isinstance(v, Tensor):
                out[name] = float(v.detach().to(torch.float64).mean())
            else:
                flat = [t.detach().to(torch.float64).reshape(-1) for t in v.values()]
                out[name] = float(torch.cat(flat).mean()) if flat else float("nan")
        return out


# --------------------------------------------------------------------------- predefined specs


Groups = Sequence[Sequence[str]]
"""Parameter names per group (group granularity), e.g. ``[["w1", "w2"], ["b1", "b2"]]``."""


def _groups_arg(name: str, groups: Groups | None) -> tuple[tuple[str, ...], ...] | None:
    return None if groups is None else _check_groups(name, groups)


def learning_rate(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = (1e-10, 1.0),
    params: Sequence[str] | None = None,
    name: str = "lr",
    groups: Groups | None = None,
) -> HyperParameter:
    """Learning rate, Clarke et al. (2022) Table 5: optimised as ``log10 lr``, init
    ``log10 lr ~ U[-6, -1]``; clipped to ``[1e-10, 1]`` (their Section 4).
    ``granularity="element"`` gives their high-dimensional learning rates (HDLR);
    ``granularity="group"`` with ``groups=`` one learning rate per parameter group.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units, or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return HyperParameter(
        name,
        LOG10,
        -6.0,
        -1.0,
        "raw",
        Granularity(granularity),
        clip,
        tuple(params) if params is not None else None,
        _groups_arg(name, groups),
    )


def weight_decay(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = None,
    params: Sequence[str] | None = None,
    name: str = "weight_decay",
    groups: Groups | None = None,
) -> HyperParameter:
    """Weight decay, Clarke et al. (2022) Table 5: optimised as ``log10 wd``, init
    ``log10 wd ~ U[-7, -2]``; ``groups=`` for ``granularity="group"``.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units, or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return HyperParameter(
        name,
        LOG10,
        -7.0,
        -2.0,
        "raw",
        Granularity(granularity),
        clip,
        tuple(params) if params is not None else None,
        _groups_arg(name, groups),
    )


def momentum(
    granularity: Granularity | str = "scalar",
    clip: tuple[float, float] | None = None,
    params: Sequence[str] | None = None,
    name: str = "momentum",
    groups: Groups | None = None,
) -> HyperParameter:
    """Momentum, Clarke et al. (2022) Table 5: optimised as ``logit mu`` (inverse
    sigmoid), initialised uniformly in *natural* space ``mu ~ U[0, 1]``; ``groups=`` for
    ``granularity="group"``.

    Args:
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        clip: ``(lo, hi)`` in natural units (inside ``(0, 1)``), or ``None`` for no clipping.
        params: parameter names for tensor/element granularity (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).
        groups: parameter names per group for group granularity.

    Returns:
        The :class:`HyperParameter`.
    """
    return HyperParameter(
        name,
        LOGIT,
        0.0,
        1.0,
        "natural",
        Granularity(granularity),
        clip,
        tuple(params) if params is not None else None,
        _groups_arg(name, groups),
    )


def per_weight_decay(params: Sequence[str] | None = None, name: str = "weight_decay") -> HyperParameter:
    """One weight-decay value per weight element (Lorraine et al. 2020, Sec. 5.1 per-weight
    L2; Clarke et al. 2022 Table 5 ranges): ``weight_decay(granularity="element")``.

    Args:
        params: the names of the parameters it applies to (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).

    Returns:
        The :class:`HyperParameter`.
    """
    return weight_decay(granularity="element", params=params, name=name)


#: Clarke et al. (2022) Table 5: scalar learning rate (clipped to [1e-10, 1]),
#: weight decay and momentum.
CLARKE_TABLE5 = HyperParameterSpace([learning_rate(), weight_decay(), momentum()])


def for_rule(
    name: str,
    granularity: Granularity | str = "scalar",
    params: Sequence[str] | None = None,
    groups: Groups | None = None,
) -> HyperParameter:
    """The parametrisation of an optimiser hyperparameter called ``name`` (:mod:`bilevel.updates` names).

    ``lr``: :func:`learning_rate` (log10, clipped to [1e-10, 1]); ``weight_decay`` and ``eps``:
    log10; ``momentum``, ``dampening``, ``beta1``, ``beta2`` and RMSprop's ``alpha``: logit (their
    domain is (0, 1)). Initial ranges are Clarke et al. (2022) Table 5's where they give one.

    Args:
        name: the rule's hyperparameter name.
        granularity: ``"scalar"``, ``"group"``, ``"tensor"`` or ``"element"``.
        params: parameter names for tensor/element granularity (``None``: all).
        groups: parameter names per group for group granularity (e.g. ``TorchTwin.groups`` of
            :func:`bilevel.updates.twin`); raw keys ``"<name>/group<i>"``.

    Returns:
        The :class:`HyperParameter`.
    """
    if name == "lr":
        return learning_rate(granularity, params=params, groups=groups)
    if name == "momentum":
        return momentum(granularity, params=params, groups=groups)
    if name in ("weight_decay", "eps"):
        return weight_decay(granularity, params=params, name=name, groups=groups)
    if name in ("dampening", "beta1", "beta2", "alpha"):  # in (0, 1) like a momentum: logit, U[0, 1] init
        return momentum(granularity, params=params, name=name, groups=groups)
    raise ValueError(
        f"no default parametrisation for an optimiser hyperparameter called {name!r}; "
        "known: lr, momentum, weight_decay, eps, dampening, beta1, beta2, alpha"
    )


#: Where a decay named at 0 starts (an optimiser's ``weight_decay`` or a penalty's ``init``): a log10-space
#: hyperparameter cannot move from 0 (its raw value is -inf), and from much smaller values the hypergradient in
#: raw space, ``lambda * dL_V/dlambda``, is too small to move it against its noise.
ZERO_DECAY_START = 1e-4


def start_value(h: HyperParameter, value: float, *, decay: bool, who: str = "") -> float:
    """Where hyperparameter ``h`` starts from the value ``value`` a user gave (warns when it has to move it).

    A value the transform can move is kept. A decay (``decay``) at 0 starts at :data:`ZERO_DECAY_START`; a
    learning rate (or another log-space value) at 0 is refused; a value on a finite edge of its domain (a
    momentum of 0 or 1) moves 1 % of the domain inside. Used by :class:`bilevel.Tuner` and the integrations, so
    every door starts a hyperparameter the same way.

    Args:
        h: the hyperparameter's specification (its transform's domain and clip).
        value: the natural value given (an optimiser's group value, a penalty's ``init``).
        decay: whether ``h`` is a decay (0 then starts at :data:`ZERO_DECAY_START` instead of being refused).
        who: a prefix for messages, e.g. ``"HyperTuner: "``.

    Returns:
        The natural starting value.

    Raises:
        ValueError: a non-finite value, a non-decay log-space value <= 0, or a value outside ``h.clip``.
    """
    lo, hi = h.transform.domain
    if not math.isfinite(value):
        raise ValueError(f"{who}initial {h.name}={value} is not finite")
    moved = value
    if lo == 0 and math.isinf(hi) and value <= 0:
        if not decay:
            what = "a learning rate" if h.name == "lr" else f"{h.name} (tuned in {h.transform.name} space)"
            raise ValueError(f"{who}initial {h.name}={value}: {what} must be > 0 to be tuned")
        moved = ZERO_DECAY_START
    elif math.isfinite(lo) and math.isfinite(hi) and not lo < value < hi:
        margin = 1e-2 * (hi - lo)
        moved = lo + margin if value <= lo else hi - margin
    if h.clip is not None and not h.clip[0] <= moved <= h.clip[1]:
        raise ValueError(f"{who}initial {h.name}={value} lies outside its range {h.clip}")
    if moved != value:
        warnings.warn(
            f"{who}initial {h.name}={value} lies on the edge of its {h.transform.name} domain {h.transform.domain}, "
            f"where a tuned value cannot move; starting it at {moved:g} instead (pass another start to choose it)",
            UserWarning,
            stacklevel=4,
        )
    return moved
