"""Loss-form hyperparameters: (per-weight) L2 penalties.

Lorraine et al. (2020, Sec. 5.1) tune one L2 weight-decay coefficient per
weight by adding the penalty to the training loss and differentiating the
validation loss through the implicit function theorem. We use the 1/2
convention

    R(w; lambda) = 1/2 * sum_k sum_i lambda_{k,i} * w_{k,i}^2,

so that ``dR/dw = lambda * w`` -- exactly the term SGD's ``weight_decay``
adds to the gradient. ``lambda`` follows the natural-value conventions of
:mod:`bilevel.hparams`: one tensor (a scalar for all weights) or a mapping
``{param_name: tensor}`` with a 0-d tensor (one per parameter tensor) or a
tensor of the parameter's shape (one per element).

Do not apply the same weight decay both here and as a weight-update
hyperparameter in :mod:`bilevel.updates`, or it is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .hparams import Granularity, HyperParameter, HyperParameterSpace, per_weight_decay, weight_decay

__all__ = ["l2_penalty", "PerWeightL2", "PerWeightDecay"]


def _check_value(name: str, wd: Tensor, param: Tensor) -> None:
    if wd.dim() and tuple(wd.shape) != tuple(param.shape):
        raise ValueError(
            f"weight decay for parameter {name!r} has shape {tuple(wd.shape)}; "
            f"expected () or the parameter's shape {tuple(param.shape)}"
        )


def l2_penalty(
    params: Mapping[str, Tensor],
    weight_decay: float | Tensor | Mapping[str, float | Tensor],
    names: Sequence[str] | None = None,
) -> Tensor:
    """``0.5 * sum_k sum(wd_k * w_k ** 2)`` over the selected parameters (gradient ``wd * w``).

    ``weight_decay`` is a float / 0-d tensor (same value for every weight), or a
    mapping ``{param_name: value}`` with 0-d (per-tensor) or parameter-shaped
    (per-element) values. ``names`` selects the penalised parameters; by
    default all of ``params`` for a single value, or the mapping's keys for a
    mapping (so e.g. biases can be left out). Raises ``ValueError`` naming the
    parameter on unknown names, missing values or shape mismatches.
    Differentiable in both ``params`` and ``weight_decay``; vmap-safe.

    Args:
        params: the weights by name.
        weight_decay: one value for every weight, or ``{param_name: value}`` with 0-d or
            parameter-shaped values.
        names: the parameters to penalise (default: see above).

    Returns:
        The penalty, a 0-d tensor (zero when no parameter is selected).

    Raises:
        ValueError: on an unknown parameter name, a missing value or a shape mismatch.
    """
    if isinstance(weight_decay, Mapping):
        unknown = [k for k in weight_decay if k not in params]
        if unknown:
            raise ValueError(f"weight decay given for unknown parameters {unknown}; known: {list(params)}")
        selected = list(weight_decay) if names is None else list(names)
        lacking = [n for n in selected if n not in weight_decay]
        if lacking:
            raise ValueError(f"no weight decay given for parameters {lacking}")
        values = {n: weight_decay[n] for n in selected}
    else:
        selected = list(params) if names is None else list(names)
        values = {n: weight_decay for n in selected}
    unknown = [n for n in selected if n not in params]
    if unknown:
        raise ValueError(f"cannot penalise unknown parameters {unknown}; known: {list(params)}")

    total: Tensor | None = None
    for n in selected:
        w = params[n]
        wd = values[n]
        if not isinstance(wd, Tensor):
            wd = torch.as_tensor(wd, dtype=w.dtype, device=w.device)
        _check_value(n, wd, w)
        term = (wd * w.square()).sum()
        total = term if total is None else total + term
    if total is None:
        ref = next(iter(params.values()), None)
        return torch.zeros(
            (), dtype=ref.dtype if ref is not None else None, device=ref.device if ref is not None else None
        )
    return 0.5 * total


@dataclass(frozen=True)
class PerWeightL2:
    """An L2 penalty whose coefficients are a raw-space hyperparameter.

    ``penalty(params, raw)`` reads this hyperparameter's entries from the flat
    raw dict (see :class:`bilevel.hparams.HyperParameterSpace`), maps them to
    natural values (``10 ** raw`` for :func:`~bilevel.hparams.per_weight_decay`)
    and returns :func:`l2_penalty`. Default: Lorraine et al. (2020) per-weight decay.

    Args:
        hparam: the decay hyperparameter whose natural values are the coefficients.
    """

    hparam: HyperParameter = per_weight_decay()

    @classmethod
    def from_space(cls, space: HyperParameterSpace, name: str = "weight_decay") -> PerWeightL2:
        """Bind the hyperparameter called ``name`` in ``space``.

        Args:
            space: the hyperparameter space holding the decay.
            name: the decay hyperparameter's name in ``space``.

        Returns:
            The penalty on that hyperparameter.

        Raises:
            ValueError: when ``space`` has no hyperparameter ``name``.
        """
        if name not in space:
            raise ValueError(f"space has no hyperparameter {name!r}; known: {space.names}")
        return cls(space[name])

    def penalty(self, params: Mapping[str, Tensor], raw_hparams: Mapping[str, Tensor]) -> Tensor:
        """The L2 penalty with the natural values of this hyperparameter's raw entries.

        Args:
            params: the weights by name.
            raw_hparams: the flat raw dict (at least this hyperparameter's keys).

        Returns:
            :func:`l2_penalty` of ``params``, a 0-d tensor.
        """
        return l2_penalty(params, self.hparam.natural(raw_hparams))

    __call__ = penalty


class PerWeightDecay:
    """A tuned L2 penalty ``1/2 sum_i lambda_i w_i^2`` on a module's weights (Lorraine et al. 2020, sec. 5.2).

    ``PerWeightDecay(model, init=1e-3)`` gives one decay per weight (``granularity="element"``;
    ``"tensor"``: one per parameter tensor, ``"scalar"``: one for all), optimised in log10 space
    (so a decay stays positive), starting from ``init``; ``init=0`` starts at
    :data:`bilevel.hparams.ZERO_DECAY_START` with a warning, as an optimiser's zero weight decay does.
    ``params`` restricts it to some parameter names (e.g. weights but not biases). Pass it as ``penalty=``
    to :class:`bilevel.Tuner`: the weights may then be stepped by any ``torch.optim`` optimiser, the
    hypergradient being the IFT on the penalised training loss's stationarity. Called as
    ``penalty(params, natural_hparams)``.

    Args:
        model: the module (its parameters that require grad) or a dict of parameters by name.
        init: the initial natural decay (finite, >= 0).
        granularity: ``"element"``, ``"tensor"`` or ``"scalar"``.
        params: the names of the parameters to penalise (``None``: all).
        name: the hyperparameter's name (the raw-dict key prefix).

    Raises:
        ValueError: on an unknown parameter name, or an ``init`` that is negative or not finite.
    """

    def __init__(
        self,
        model: torch.nn.Module | Mapping[str, Tensor],
        init: float = 1e-3,
        granularity: Granularity | str = "element",
        params: Sequence[str] | None = None,
        name: str = "l2",
    ) -> None:
        named = dict(model.named_parameters()) if isinstance(model, torch.nn.Module) else dict(model)
        names = [k for k, v in named.items() if v.requires_grad or not isinstance(model, torch.nn.Module)]
        if params is not None:
            unknown = [p for p in params if p not in named]
            if unknown:
                raise ValueError(f"PerWeightDecay: unknown parameters {unknown}; the model has {list(named)}")
            names = list(params)
        if not (isinstance(init, (int, float)) and init >= 0 and math.isfinite(init)):
            raise ValueError(f"PerWeightDecay: init must be a finite decay >= 0, got {init!r}")
        g = Granularity(granularity)
        self.name, self.init, self.names = name, float(init), names
        self.hparam = weight_decay(g, params=None if g is Granularity.SCALAR else names, name=name)

    @property
    def hyperparameters(self) -> list[HyperParameter]:
        return [self.hparam]

    def initial(self) -> dict[str, float]:
        """Natural initial values by hyperparameter name."""
        return {self.name: self.init}

    def __call__(self, params: Mapping[str, Tensor], nat: Mapping[str, object]) -> Tensor:
        value = nat[self.name]
        return l2_penalty(params, value, names=None if isinstance(value, Mapping) else self.names)  # type: ignore[arg-type]
