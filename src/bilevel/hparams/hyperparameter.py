"""One (possibly high-dimensional) hyperparameter and its granularity.

A :class:`~bilevel.hparams.HyperParameter` has a transform, an initialisation range, a
:class:`~bilevel.hparams.Granularity` (one scalar, one per parameter group, per parameter tensor or per
weight element), an optional clip and the keys of its raw values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import torch
from torch import Tensor

from .transforms import Transform, _as_tensor, get_transform

__all__ = [
    "Granularity",
    "InitSpace",
    "NaturalValue",
    "HyperParameter",
]

InitSpace = Literal["raw", "natural"]
#: Natural hyperparameter value: one tensor, or one tensor per parameter name.
NaturalValue = Tensor | dict[str, Tensor]


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
