"""Opt-in: the weight step after a hyperparameter step reuses that step's training gradient.

:class:`SharedGradient` wraps an :class:`~bilevel.strategies.IFT` strategy (update-map residual); see its
docstring for when the reuse is exact, bit for bit, and what its checks cannot see.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..tree import Tree
from .base import Strategy
from .ift import IFT

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..tuner import OnlineTuner

__all__ = ["SharedGradient", "SharedEntry"]


class SharedGradient(Strategy):
    """IFT whose residual's training gradient is handed to the next weight step when it is that step's.

    The IFT residual at step t is built on ``g = dL_T(w_t; c_t)/dw`` (``create_graph=True``), and the next
    weight step needs ``dL_T(w_t; c_{t+1})/dw`` at the updated lambda. The two are the same numbers when

    * the weights are the same tensors, unchanged (no step, restart, freeze or in-place edit in between; on
      the sync-free path, where every marking rebuilds the weights, the entry follows them: :meth:`follow`),
    * the next context is the same: the same tensor objects, unchanged (full-batch training),
    * neither ``g`` nor the losses depend on the tuned hyperparameters (their graphs do not reach them: the
      tuned hyperparameters are update-form, e.g. Clarke et al.'s learning rate, momentum and decay),
    * no random numbers were drawn while computing them (no dropout or noise inside the loss), and the
      hyperparameters that were not tuned are unchanged.

    Then the weight step reuses ``g`` and its losses: one training gradient fewer every T steps (of about
    ``T + 2 i + 1`` gradient-equivalents per T steps in Clarke et al.'s full-batch UCI protocol). Anything
    else and the weight step computes its gradient as usual.

    **Opt-in** (``SharedGradient(IFT(...))``, ``TunerConfig(share_gradient=True)``), because the
    checks above cannot see everything that makes two evaluations of the training loss differ. The result
    is the same bit for bit only when, in addition:

    * the loss is a pure function of the weights and the batch tensors: it draws no random numbers from a
      generator of its own (a module's ``torch.Generator``, numpy's or Python's RNG; torch's global RNG is
      checked), reads no state that changes between calls (closure counters, a module that counts its
      calls, buffers such as BatchNorm's running statistics updated by the forward pass);
    * nothing edits the weights behind autograd's back (``.data`` writes in a projection callback);
    * the gradient with ``create_graph=True`` equals the one without it to the last bit: true for the
      element-wise and matrix-multiply networks of the studies, not guaranteed for fused kernels (an LSTM's
      full-batch float32 gradient differs in the last bits).

    Batch tensors are compared by identity, version counter *and* value (a copy is kept), so a batch
    refilled in place (``.data.copy_``, a numpy staging buffer) is recomputed.

    Args:
        inner: the IFT strategy whose residual gradient is shared (``implicit="update"``).
    """

    name = "ift"

    def __init__(self, inner: IFT | None = None) -> None:
        self.inner = inner if inner is not None else IFT()
        self.differentiable_rule = self.inner.differentiable_rule
        self.entry: SharedEntry | None = None  # the last hyperparameter step's gradient, for the next step

    @property
    def solver(self) -> Any:
        """The inner IFT strategy's solver."""
        return self.inner.solver

    @solver.setter
    def solver(self, value: Any) -> None:
        self.inner.solver = value

    @property
    def implicit(self) -> str:
        """The inner IFT strategy's residual."""
        return self.inner.implicit

    def check(self, tuner: OnlineTuner) -> None:
        """As the inner strategy's."""
        self.inner.check(tuner)

    def reuse(self, tuner: OnlineTuner, batch: Any) -> tuple[list[Tensor], Tensor] | None:
        """The kept gradient and losses when they are the step's (used at most once)."""
        entry, self.entry = self.entry, None
        return entry.take(tuner, batch) if entry is not None else None

    def follow(self, tuner: OnlineTuner, old: Tree) -> None:
        """Re-bind the kept gradient to the rebuilt weights dict (or drop it)."""
        if self.entry is not None:
            self.entry = self.entry.follow(tuner, old)

    def hypergradient(self, tuner: OnlineTuner, train_batch: Any, val_batch: Any) -> Tree:
        """The inner IFT hypergradient; its residual's training gradient is kept for the next weight step."""

        def observe(p: Tree, h: Mapping[str, Tensor], batch: Any) -> Callable[[list[Tensor], Tensor], None]:
            rng = SharedEntry.rng_state(tuner.device)

            def done(grads: list[Tensor], losses: Tensor) -> None:
                self.entry = SharedEntry.offer(tuner, batch, grads, losses, h, rng)

            return done

        return self.inner.hypergradient(tuner, train_batch, val_batch, observe=observe)

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state (the kept gradient is not saved: a resumed loop recomputes it)."""
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and drop any kept gradient."""
        self.entry = None
        self.inner.load_state_dict(sd)


@dataclass
class SharedEntry:
    """A hyperparameter step's training gradient, kept for the next weight step (see :class:`SharedGradient`).

    Args:
        t: the loop's step when the gradient was computed.
        params: the weights dict the gradient was computed at (compared by identity).
        versions: the version counters of the weights, then of the hyperparameters that were not tuned.
        fixed: the hyperparameters that were not tuned.
        batch: the training context's tensors.
        batch_versions: their version counters.
        batch_values: copies of them.
        grads: the training gradient, one tensor per weight tensor (detached).
        losses: the per-member training losses (detached).
    """

    t: int
    params: Tree  # the weights dict the gradient was computed at (compared by identity, with versions)
    versions: tuple[int, ...]  # of the weights, then of the hyperparameters that were not tuned
    fixed: list[Tensor]
    batch: list[Any]  # the context's leaves (kept alive, so that identity means the same tensor)
    batch_versions: tuple[int, ...]
    batch_values: list[Tensor]  # copies: a batch refilled in place without a version bump is caught by value
    grads: list[Tensor]
    losses: Tensor

    @staticmethod
    def rng_state(device: torch.device) -> list[Tensor]:
        """The random-number generators a loss on ``device`` may draw from (compared before and after).

        Args:
            device: the device of the weights.

        Returns:
            The CPU generator's state, and the device's for a CUDA device.
        """
        states = [torch.random.get_rng_state()]
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device))
        return states

    @classmethod
    def offer(
        cls,
        tuner: OnlineTuner,
        batch: Any,
        grads: Sequence[Tensor],
        losses: Tensor,
        tuned: Mapping[str, Tensor],
        rng_before: list[Tensor],
    ) -> SharedEntry | None:
        """The entry for the gradient just computed at ``tuner.params`` (``None`` if it can never be reused).

        Args:
            tuner: the loop whose weights the gradient was computed at.
            batch: the training context the gradient was computed on.
            grads: the training gradient, one tensor per weight tensor.
            losses: the per-member training losses computed with it.
            tuned: the tuned raw hyperparameters the gradient was computed with.
            rng_before: :meth:`rng_state` taken before the gradient was computed.

        Returns:
            The entry, or ``None`` when the batch holds non-tensors, the loss drew random numbers, or the
            gradient depends on the tuned hyperparameters.
        """
        leaves = torch.utils._pytree.tree_leaves(batch)
        if not all(isinstance(x, Tensor) for x in leaves):
            return None
        if any(not torch.equal(a, b) for a, b in zip(rng_before, cls.rng_state(tuner.device))):
            return None  # the loss drew random numbers: the next step must draw its own
        if _reaches([*grads, losses], tuned.values()):
            return None  # the gradient moves with the tuned hyperparameters
        fixed = [v for k, v in tuner.raw.items() if k not in tuned]
        return cls(
            t=tuner.t,
            params=tuner.params,
            versions=_versions(tuner.params, fixed),
            fixed=fixed,
            batch=leaves,
            batch_versions=tuple(x._version for x in leaves),
            batch_values=[x.detach().clone() for x in leaves],
            grads=[g.detach() for g in grads],
            losses=losses.detach(),
        )

    def follow(self, tuner: OnlineTuner, old: Tree) -> SharedEntry | None:
        """This entry for ``tuner.params`` after the sync-free freeze rebuilt them from ``old`` (``None`` if stale).

        On the sync-free path (the loop's freezing of diverged members) every marking rebuilds the weights with
        ``where(alive, w, w_0)``: the live members' weights are unchanged, and the dead members are put back
        at ``w_0`` after every weight step, so the gradient stays the next step's for every member that matters.

        Args:
            tuner: the loop whose weights were rebuilt.
            old: the weights dict before the rebuild.

        Returns:
            The entry bound to ``tuner.params``, or ``None`` when it no longer describes ``old``.
        """
        if self.params is not old or _versions(old, self.fixed) != self.versions:
            return None
        return replace(self, params=tuner.params, versions=_versions(tuner.params, self.fixed))

    def take(self, tuner: OnlineTuner, batch: Any) -> tuple[list[Tensor], Tensor] | None:
        """(gradient, losses) if this entry is the gradient of the step ``tuner`` is about to take on ``batch``.

        Args:
            tuner: the loop about to take a weight step.
            batch: the training context of that step.

        Returns:
            ``(grads, losses)`` (detached), or ``None`` when the step, weights, batch or fixed
            hyperparameters differ.
        """
        leaves = torch.utils._pytree.tree_leaves(batch)
        same = (
            tuner.t == self.t
            and tuner.params is self.params
            and len(leaves) == len(self.batch)
            and all(a is b for a, b in zip(leaves, self.batch))
            and tuple(x._version for x in leaves) == self.batch_versions
            and all(torch.equal(a, b) for a, b in zip(leaves, self.batch_values))
            and _versions(tuner.params, self.fixed) == self.versions
        )
        return (self.grads, self.losses) if same else None


def _versions(params: Tree, fixed: list[Tensor]) -> tuple[int, ...]:
    """In-place modification counters of the weights, then of the hyperparameters that were not tuned."""
    return tuple(v._version for v in [*params.values(), *fixed])


def _reaches(outputs: Sequence[Tensor], leaves: Iterable[Tensor]) -> bool:
    """Whether the autograd graph of ``outputs`` reaches any of the leaf tensors ``leaves``."""
    targets = {id(x) for x in leaves}
    stack: list[Any] = [o.grad_fn for o in outputs if o.grad_fn is not None]
    seen: dict[int, Any] = {}  # id -> node, kept alive so that an id is never reused during the walk
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen[id(fn)] = fn
        variable = getattr(fn, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and id(variable) in targets:
            return True
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return False
