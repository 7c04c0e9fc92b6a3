"""The implicit-function-theorem hypergradient (Lorraine et al. 2020, eq. 2-3; Clarke et al. 2022, eq. 4-7).

At a fixed point r(lambda, w*) = 0 of the residual,

    dL_V/dlambda = dL_V/dlambda|_w - dL_V/dw J^{-1} dr/dlambda,    J = dr/dw,

with J^{-1} v from any :mod:`bilevel.solvers` solver (Neumann, CG, identity, exact; damped by
``(J + eps I)^{-1}`` for Vicol et al.'s proximal best response). Two residuals:

* ``implicit="update"``: r = u(lambda, w) the weight update (Clarke et al.: any differentiable update, so
  learning rates, momenta and decoupled decays are tuned; the optimiser state is constant, their A.4);
* ``implicit="loss"``: r = dL_T/dw the training loss's stationarity, J its Hessian (Lorraine et al. Alg. 2-3):
  every tuned hyperparameter must be loss-form, and the weights may be stepped by any optimiser, even a
  ``torch.optim`` one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor

from ..hypergradient import hypergradient
from ..solvers import AutoNeumann, Neumann, Solver
from ..tree import Tree
from .base import Strategy

if TYPE_CHECKING:
    from ..tuner import OnlineTuner

__all__ = ["IFT", "default_solver"]


def default_solver(lookback: int, implicit: str, population: bool) -> Solver:
    """The IFT's solver when none is given: the library's one default, for every door.

    One model: :class:`~bilevel.solvers.AutoNeumann` (``lookback`` Neumann steps, alpha = 1 / lambda_max by
    power iteration, at most 1 on the update map, which already carries the learning rate; refreshed when the
    series grows). A stacked population: ``Neumann(lookback, alpha=1)`` (Clarke et al. 2022's i steps at
    alpha 1), because one alpha chosen from the whole population would couple members that must stay
    independent (each member's result must equal its run alone).

    Args:
        lookback: i, the Neumann steps.
        implicit: the residual, ``"update"`` or ``"loss"``.
        population: whether the tensors carry a population axis (``OnlineTuner(stacked=True)``).

    Returns:
        A new solver.
    """
    if population:
        return Neumann(lookback, alpha=1.0, divergence="ignore")
    return AutoNeumann(lookback, max_alpha=1.0 if implicit == "update" else None)


#: ``observe(params, tuned, batch)`` is called before the residual's training gradient and returns
#: ``done(grads, losses)``, called after it (:class:`bilevel.strategies.SharedGradient` keeps the gradient)
Observer = Callable[[Tree, Mapping[str, Tensor], Any], Callable[[list[Tensor], Tensor], None]]


class IFT(Strategy):
    """The IFT hypergradient at the current weights, with ``solver`` for J^{-1} (see the module docstring).

    Args:
        solver: the linear solver (``None``: :func:`default_solver` with the tuner config's ``lookback``).
        implicit: the residual: ``"update"`` (the update map) or ``"loss"`` (the training loss's gradient).
        solver_at: called with the tuner before each hypergradient, returns the solver to use this time (e.g.
            a Neumann step size from the current curvature, Lorraine et al.'s alpha); overrides ``solver``.
    """

    name = "ift"

    def __init__(
        self,
        solver: Solver | None = None,
        implicit: Literal["update", "loss"] = "update",
        solver_at: Callable[[OnlineTuner], Solver] | None = None,
    ) -> None:
        if implicit not in ("update", "loss"):
            raise ValueError(f"implicit must be 'update' or 'loss', got {implicit!r}")
        self.solver = solver
        self.implicit = implicit
        self.solver_at = solver_at
        self.differentiable_rule = implicit == "update"

    def check(self, tuner: OnlineTuner) -> None:
        """Refuse update-form tuned hyperparameters with ``implicit="loss"``; fill in the default solver."""
        if self.solver is None:
            self.solver = default_solver(tuner.cfg.lookback, self.implicit, tuner.stacked)
        if self.implicit == "loss":
            in_rule = [n for n in tuner.cfg.tuned if n in tuner.update_form]
            if in_rule:
                raise ValueError(
                    "implicit='loss' differentiates dL_T/dw = 0, so tuned hyperparameters must be "
                    f"loss-form; {in_rule} are update-form and would get no implicit term"
                )

    def hypergradient(
        self, tuner: OnlineTuner, train_batch: Any, val_batch: Any, observe: Observer | None = None
    ) -> Tree:
        """The IFT estimate at ``tuner.params`` (see :meth:`Strategy.hypergradient`).

        Args:
            tuner: the loop.
            train_batch: the training context of the residual (the last weight step's).
            val_batch: the validation context of L_V.
            observe: see ``Observer`` (``None``: nothing observes the residual's gradient).

        Returns:
            ``{raw key: hypergradient}`` for every tuned raw key.
        """
        if self.solver_at is not None:
            self.solver = self.solver_at(tuner)
        solver = self.solver
        if solver is None:
            raise ValueError("IFT has no solver: build the tuner with it (OnlineTuner(strategy=...) calls check)")
        tuned, fixed = tuner.split()
        check = tuner.cfg.on_divergence == "raise"

        def outer(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
            return tuner.val_loss(p, tuner.natural({**fixed, **h}), val_batch).sum()

        if self.implicit == "loss":

            def inner(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
                return tuner.training_objective(p, {**fixed, **h}, train_batch)[0]

            return hypergradient(outer, tuner.params, tuned, inner=inner, solver=solver, check=check)
        state = tuner.state

        def update(p: Tree, h: Mapping[str, Tensor]) -> Tree:
            raw = {**fixed, **h}
            done = observe(p, h, train_batch) if observe is not None else None
            grads, losses = tuner.training_gradient(p, raw, train_batch, create_graph=True)
            if done is not None:
                done(grads, losses)
            return tuner.apply_rule(p, grads, raw, state)[0]

        return hypergradient(outer, tuner.params, tuned, update=update, solver=solver, check=check)

    def state_dict(self) -> dict[str, Any]:
        """The solver's state, if it keeps one (e.g. a warm-started CG)."""
        state_dict = getattr(self.solver, "state_dict", None)
        return {"solver": state_dict()} if state_dict is not None else {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        if sd.get("solver") is not None:
            self.solver.load_state_dict(sd["solver"])  # type: ignore[union-attr]
