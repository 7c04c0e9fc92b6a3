"""Any ``torch.optim`` optimiser as a (non-differentiable) update rule.

Defines :class:`~bilevel.updates.TorchOptimizer`, re-exported by :mod:`bilevel.updates`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import HValue, State

__all__ = [
    "TorchOptimizer",
]


class TorchOptimizer:
    """A ``torch.optim`` optimiser as a (non-differentiable) weight update ``u = w - step(w)``.

    Lets any ``torch.optim`` optimiser step the weights of an online loop whose hypergradient does
    not differentiate the update: the IFT on the training loss's stationarity (Lorraine et al.
    2020, Alg. 2-3: ``implicit="loss"``), which holds whatever optimiser found the weights.
    ``named`` maps the loop's parameter names to the tensors the optimiser was built on; each call
    copies the weights in, sets ``.grad``, calls ``optimizer.step()`` and returns the change. The
    optimiser's own state (momenta, moments) is the state of this rule (:meth:`state_dict`). The
    weights it stepped to are kept as ``stepped``, so a loop takes them exactly (not ``w - u``).

    Args:
        optimizer: the ``torch.optim`` optimiser, built on the tensors of ``named``.
        named: the loop's parameter names and the tensors the optimiser holds.

    Raises:
        ValueError: when the optimiser does not hold a tensor of ``named``.
    """

    hyperparameters: ClassVar[tuple[str, ...]] = ()
    differentiable: ClassVar[bool] = False

    def __init__(self, optimizer: torch.optim.Optimizer, named: Mapping[str, Tensor]) -> None:
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [k for k, p in named.items() if id(p) not in held]
        if missing:
            raise ValueError(
                f"the {type(optimizer).__name__} optimiser does not hold the parameters {missing}; "
                "build it on model.parameters()"
            )
        self.optimizer, self.named = optimizer, dict(named)

    def init_state(self, params: Mapping[str, Tensor]) -> State:
        """No state of the loop's own: the optimiser keeps it (see :meth:`state_dict`).

        Args:
            params: the weights by name (not used).

        Returns:
            ``{}``.
        """
        return {}

    def __call__(
        self,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        hparams: Mapping[str, HValue] | None = None,
        state: State | None = None,
    ) -> tuple[dict[str, Tensor], State]:
        if hparams:
            raise ValueError(f"a torch.optim optimiser takes no tuned hyperparameters, got {list(hparams)}")
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(params[k])
                p.grad = grads[k].detach().clone()
        self.optimizer.step()
        with torch.no_grad():
            self.stepped = {k: p.detach().clone() for k, p in self.named.items()}
            u = {k: params[k].detach() - self.stepped[k] for k in self.named}
        for p in self.named.values():
            p.grad = None
        return u, {}

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's own state dict (momenta, moments, step counts).

        Returns:
            ``optimizer.state_dict()``.
        """
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the optimiser's state.

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self.optimizer.load_state_dict(sd)
