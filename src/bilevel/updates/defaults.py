"""An update rule whose untuned hyperparameters take fixed (e.g. per-group) values.

Defines :class:`~bilevel.updates.WithDefaults`, re-exported by :mod:`bilevel.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import HValue, State, UpdateRule

__all__ = [
    "WithDefaults",
]


class WithDefaults:
    """An update rule whose hyperparameters missing from ``hparams`` take fixed (e.g. per-group) values.

    ``WithDefaults(rule, values)(params, grads, hparams, state)`` calls
    ``rule(params, grads, hparams', state)`` with

    .. math::  \\text{hparams}'_h = \\text{hparams}_h \\text{ if given, else } \\text{values}_h,

    and, where both ``hparams[h]`` and ``values[h]`` are per-parameter mappings, parameters missing from
    ``hparams[h]`` take ``values[h][name]``. So a ``torch.optim`` optimiser's parameter groups keep their own
    learning rate, weight decay, ... (:attr:`TorchTwin.per_param`) for every hyperparameter that is not
    tuned, while a tuned one (a tensor or mapping, possibly requiring grad) replaces them; the update
    ``u`` and its graph to the tuned tensors, the weights and the gradients are the wrapped rule's.

    Fixed Python numbers become 0-d tensors of each parameter's dtype and device (made once and cached,
    no ``.item()`` at call time); tensors in ``values`` are passed as they are. Everything else
    (``hyperparameters``, :meth:`init_state`, fields such as ``lr`` or ``nesterov``, ``differentiable``,
    and ``state_dict`` where the wrapped rule has one) is the wrapped rule's.

    Args:
        rule: the wrapped update rule.
        values: ``{hyperparameter: value}``, each a number or tensor (every parameter) or a mapping
            ``{param_name: number or tensor}``; names must be hyperparameters of ``rule``.
    """

    def __init__(self, rule: UpdateRule, values: Mapping[str, float | Tensor | Mapping[str, float | Tensor]]) -> None:
        unknown = [h for h in values if h not in rule.hyperparameters]
        if unknown:
            raise ValueError(
                f"WithDefaults: {unknown} are not hyperparameters of {type(rule).__name__} "
                f"(it has {list(rule.hyperparameters)})"
            )
        self.rule = rule
        self.values: dict[str, float | Tensor | dict[str, float | Tensor]] = {
            h: dict(v) if isinstance(v, Mapping) else v for h, v in values.items()
        }
        self._cache: dict[tuple[str, str, torch.dtype, torch.device], Tensor] = {}

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        """The wrapped rule's hyperparameter names."""
        return self.rule.hyperparameters

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """The wrapped rule's fresh state for ``params``.

        Args:
            params: the weights by name.

        Returns:
            ``rule.init_state(params)``.
        """
        return self.rule.init_state(params)

    def _const(self, h: str, name: str, value: float | Tensor, like: Tensor) -> Tensor:
        if isinstance(value, Tensor):
            return value
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        key = (h, name, dtype, like.device)
        out = self._cache.get(key)
        if out is None:
            out = self._cache[key] = torch.tensor(float(value), dtype=dtype, device=like.device)
        return out

    def fill(self, params: Mapping[str, Tensor], hparams: Mapping[str, HValue] | None = None) -> dict[str, HValue]:
        """``hparams`` completed with the fixed values (see the class docstring).

        Args:
            params: the parameters the rule is called on (names, dtypes and devices).
            hparams: the given (tuned) hyperparameters, or ``None``.

        Returns:
            A new dict: ``hparams`` plus, for every hyperparameter in ``values`` that it lacks, the fixed
            value as a per-parameter mapping of tensors (only the parameters in ``params``); mappings in
            ``hparams`` lacking some parameters get those parameters' fixed values.
        """
        out: dict[str, HValue] = dict(hparams or {})
        for h, v in self.values.items():
            given = out.get(h)
            if given is None:
                if isinstance(v, Mapping):
                    out[h] = {k: self._const(h, k, v[k], p) for k, p in params.items() if k in v}
                elif isinstance(v, Tensor):
                    out[h] = v
                else:
                    out[h] = {k: self._const(h, "", v, p) for k, p in params.items()}
            elif isinstance(given, Mapping) and isinstance(v, Mapping):
                fixed = {k: self._const(h, k, v[k], p) for k, p in params.items() if k not in given and k in v}
                if fixed:
                    out[h] = {**fixed, **given}
        return out

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        """Return the wrapped rule's ``(u, new_state)`` with ``hparams`` completed by :meth:`fill`."""
        return self.rule(params, grads, self.fill(params, hparams), self.init_state(params) if state is None else state)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("rule", "values", "_cache"):
            raise AttributeError(name)
        return getattr(self.rule, name)

    def __repr__(self) -> str:
        return f"WithDefaults({self.rule!r}, {self.values!r})"
