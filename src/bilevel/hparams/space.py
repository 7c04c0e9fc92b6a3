"""A collection of hyperparameters, between the flat raw dict and natural values.

Defines :class:`~bilevel.hparams.HyperParameterSpace`, re-exported by :mod:`bilevel.hparams`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .hyperparameter import Granularity, HyperParameter, NaturalValue

__all__ = [
    "HyperParameterSpace",
]


def _default_dtype_device(
    params: Mapping[str, Tensor], dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[torch.dtype, torch.device]:
    first = next((p for p in params.values() if p.is_floating_point()), None)
    if dtype is None:
        dtype = first.dtype if first is not None else torch.get_default_dtype()
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    return dtype, torch.device(device)


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

    def natural_reused(self, raw: Mapping[str, Tensor]) -> dict[str, NaturalValue]:
        """:meth:`natural`, reusing the last call's values while the raw tensors are unchanged and need no graph.

        A weight step reads the natural values twice (losses and update rule), and nothing between two
        hyperparameter steps moves the raw values; their map (clipping, transforms) is recomputed only when a raw
        tensor's storage or version changed (the tensors of the last call are held, so their storage is never
        reused meanwhile). A raw tensor that requires grad, or one inside ``vmap``, is always mapped afresh.

        Args:
            raw: the flat raw dict.

        Returns:
            The values :meth:`natural` returns (the same tensors while ``raw`` is unchanged).
        """
        if any(v.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(v) for v in raw.values()):
            return self.natural(raw)
        last = getattr(self, "_last_natural", None)
        if last is None or not _unchanged(last[0], raw):
            # the tensors are held and their addresses read live (never stored as numbers), so a copy or pickle of
            # this space can never match tensors that merely landed at an old address
            last = self._last_natural = ({k: (v, v._version) for k, v in raw.items()}, self.natural(raw))
        return dict(last[1])

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


def _unchanged(held: Mapping[str, tuple[Tensor, int]], raw: Mapping[str, Tensor]) -> bool:
    """Whether every raw tensor is a held one (same storage, offset and shape) at the version it was mapped at."""
    if list(held) != list(raw):
        return False
    return all(
        h.data_ptr() == v.data_ptr() and h.shape == v.shape and version == v._version
        for (h, version), v in zip(held.values(), raw.values())
    )
