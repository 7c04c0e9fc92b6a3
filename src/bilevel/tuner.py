"""Algorithm 1, the one online loop: T weight steps, one hyperparameter step, on without restarting.

Lorraine, Vicol & Duvenaud (2020), Algorithm 1, and Clarke, Oldewage & Hernández-Lobato (2022), Alg. 1::

    repeat:  T times  w <- w - u(lambda, w; c_t)           (weight steps, context c_t: batch, noise)
             lambda <- HyperOpt(lambda, dL_V/dlambda)       (one hypergradient step)

Every study and the :class:`bilevel.Tuner` front door run this class. It works on one model
(``stacked=False``) or on a population of P independent initialisations whose tensors carry a
leading axis of size P (``stacked=True``; losses are ``vmap``-ed over it and return shape (P,),
see :mod:`bilevel.population`): the members do not interact, so every gradient, solver and
hypergradient of the summed losses is the stack of the members' own (Jacobians are block
diagonal).

Hyperparameters live in a :class:`~bilevel.hparams.HyperParameterSpace` (raw values optimised,
natural values used). Each one is declared *update-form* (``update_form``: passed to the
differentiable optimiser ``rule``, e.g. a learning rate, momentum or decoupled decay) or else
*loss-form* (seen by the losses and the ``penalty``: a per-weight L2 decay, dropout rates,
augmentation weights). Both enter the one residual ``u(lambda, w; c) = rule(w, dL_T/dw, lambda)``.

Hypergradient modes (``TunerConfig.mode``):

* ``"ift"``: the implicit-function-theorem estimate ``dL_V/dlambda - dL_V/dw J^{-1} dr/dlambda``
  (Lorraine et al. eq. 2-3) with any :mod:`bilevel.solvers` solver, on the update map
  (``implicit="update"``: r = u, J = du/dw, Clarke et al. eq. 4-7) or on the training loss's
  stationarity (``implicit="loss"``: r = dL_T/dw, J the Hessian, Lorraine et al. Alg. 2-3; every
  tuned hyperparameter must then be loss-form, and ``rule`` may be any optimiser, even a
  ``torch.optim`` one through :class:`bilevel.updates.TorchOptimizer`);
* ``"unroll"``: Diff-through-Opt, exact differentiation through the last ``lookback`` weight
  steps, each replayed with its own stored context;
* ``"baydin"``: hypergradient descent (Baydin et al. 2018), every step, through the last step;
* ``"none"``: hyperparameters fixed.

Policies of the same loop (Vicol et al. 2021): warm start (default), cold start
(``warm_start=False``: re-train from the initial weights for ``cold_steps`` before each
hypergradient) and the proximal best response (a solver with ``damping`` eps:
``(J + eps I)^{-1}``). Optimiser state is detached between steps and constant in the IFT
hypergradient (Clarke et al. A.4). Diverged members are recorded and frozen
(``on_divergence="record"``) or raise :class:`~bilevel.errors.NonFiniteError` (``"raise"``).
Callbacks (:mod:`bilevel.callbacks`) hook into each weight step, each T-step boundary and each
record; :meth:`OnlineTuner.state_dict` holds every piece of loop state, callbacks' included. The
weight step right after a hyperparameter step reuses that step's training gradient when it is provably
the same one (:class:`SharedGradient`: full-batch training, update-form tuning), bit for bit.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from . import population as pop
from . import tree as _T
from .callbacks import default_callbacks
from .errors import NonFiniteError
from .hparams import HyperParameterSpace
from .hypergradient import hypergradient
from .solvers import Neumann, Solver
from .unroll import replay_hypergradient, unrolled_hypergradient
from .updates import UpdateRule, detach_state

__all__ = ["TunerConfig", "History", "OnlineTuner", "SharedGradient", "clip_grad_norm", "Loss", "Penalty"]

Tree = _T.Tree
#: ``loss(params, natural_hparams, batch)``: shape (P,) for a stacked population, () for one model
Loss = Callable[[Tree, dict[str, Any], Any], Tensor]
#: ``penalty(params, natural_hparams)``: a loss-form term added to the training loss
Penalty = Callable[[Tree, dict[str, Any]], Tensor]
MODES = ("ift", "unroll", "baydin", "none")


@dataclass
class TunerConfig:
    """Meta-hyperparameters of the online loop (defaults: Clarke et al. 2022, sec. 4: T = 10, i = 5, Adam 0.05).

    Args:
        tuned: the names of the tuned hyperparameters (the others stay fixed).
        interval: T, weight steps between hyperparameter steps.
        lookback: i, Neumann steps of the default solver (IFT) or unrolled steps (Diff-through-Opt).
        mode: ``"ift"``, ``"unroll"``, ``"baydin"`` or ``"none"`` (see the module docstring).
        solver: the IFT solver; ``None``: ``Neumann(lookback, alpha=1)``.
        hyper_lr: the learning rate of the hyperparameter optimiser (> 0).
        hyper_optimizer: the hyperparameter optimiser's class, called as ``hyper_optimizer(raw, lr=hyper_lr)``.
        warm_start: continue from the current weights (``True``) or re-train from the initial ones before each
            hypergradient (Vicol et al.'s cold start).
        cold_steps: weight steps of each cold-start re-training.
        record_every: weight steps between two records of :meth:`OnlineTuner.run`'s ``record_batches``.
        grad_clip: clip each member's training-gradient norm to this, or ``None``.
        seed: the loop's seed.
        implicit: the fixed point the IFT differentiates: ``"update"`` or ``"loss"`` (see the comment below).
        on_divergence: ``"record"``, ``"raise"`` or ``"rollback"`` (see the comment below).
        rollback_factor: the multiplier of a rolled-back member's learning rate or hyperparameter step, in (0, 1).
        rollback_spike: a training loss above this many times the lowest seen is not a good state (>= 1).
        max_rollbacks: rollbacks of a member before it is frozen (>= 1).
        share_gradient: reuse a hyperparameter step's training gradient in the next weight step
            (:class:`SharedGradient`).
    """

    tuned: Sequence[str] = ("lr", "weight_decay", "momentum")
    interval: int = 10  # T: weight steps between hyperparameter steps
    lookback: int = 5  # i: Neumann steps of the default solver (IFT) or unrolled steps (Diff-through-Opt)
    mode: Literal["ift", "unroll", "baydin", "none"] = "ift"
    solver: Solver | None = None  # default Neumann(lookback, alpha=1)
    hyper_lr: float = 0.05
    hyper_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.Adam
    warm_start: bool = True
    cold_steps: int = 100
    record_every: int = 10
    grad_clip: float | None = None  # clip each member's training-gradient norm (Clarke et al. on PTB: 0.25)
    seed: int = 0
    # "update": IFT on the update map u(lambda, w) = 0 (Clarke et al. eq. 4-7, J = du/dw); "loss": IFT on
    # dL_T/dw = 0 with J the Hessian of training loss + penalty (Lorraine et al. 2020 Alg. 2-3), whatever
    # rule steps the weights (e.g. Adam); "loss" needs every tuned hyperparameter to be loss-form
    implicit: Literal["update", "loss"] = "update"
    # "record": diverged members are recorded (``History.events``) and frozen at their initial weights;
    # "raise": the first non-finite value raises NonFiniteError naming it, with the weights, optimiser state and
    # hyperparameters left at their last finite values; "rollback": a member whose weight step goes non-finite
    # is put back to its last good state (the last weights whose training loss was finite and at most
    # ``rollback_spike`` times the lowest it has seen) and its learning rate is multiplied by ``rollback_factor``
    # (a non-finite hypergradient: the hyperparameter step is skipped and that member's hyperparameter steps
    # are scaled by ``rollback_factor``), recorded in ``History.events``; after ``max_rollbacks`` a member is
    # recorded and frozen as in "record" (one model: raises)
    on_divergence: Literal["record", "raise", "rollback"] = "record"
    rollback_factor: float = 0.5
    rollback_spike: float = 10.0
    max_rollbacks: int = 30
    # opt-in speed-up: reuse a hyperparameter step's training gradient in the next weight step when the checks
    # of SharedGradient pass (exact only when the training loss is a pure function of the weights and the
    # batch tensors: see SharedGradient for the conditions the checks cannot see)
    share_gradient: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; known: {list(MODES)}")
        if self.implicit not in ("update", "loss"):
            raise ValueError(f"implicit must be 'update' or 'loss', got {self.implicit!r}")
        if self.on_divergence not in ("record", "raise", "rollback"):
            raise ValueError(f"on_divergence must be 'record', 'raise' or 'rollback', got {self.on_divergence!r}")
        if not 0 < self.rollback_factor < 1:
            raise ValueError(f"rollback_factor must lie in (0, 1), got {self.rollback_factor}")
        if not self.rollback_spike >= 1:
            raise ValueError(f"rollback_spike must be >= 1, got {self.rollback_spike}")
        if int(self.max_rollbacks) < 1:
            raise ValueError(f"max_rollbacks must be >= 1, got {self.max_rollbacks}")
        for name in ("interval", "record_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lookback < (1 if self.mode == "unroll" else 0):
            raise ValueError(
                f"lookback must be >= {1 if self.mode == 'unroll' else 0} in mode {self.mode!r}, got {self.lookback}"
            )
        if self.cold_steps < 0:
            raise ValueError(f"cold_steps must be >= 0, got {self.cold_steps}")
        if not (self.hyper_lr > 0 and math.isfinite(self.hyper_lr)):
            raise ValueError(f"hyper_lr must be a positive finite number, got {self.hyper_lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")


@dataclass
class History:
    """Trajectories, one list per member; ``diverged_at[i]`` is the step member i went non-finite.

    ``events`` lists every divergence the loop handled, in order, as plain dicts
    ``{"step": t, "member": i, "what": "training loss" | "weights" | "data" | "hypergradient" | ...,
    "action": "frozen" | "rollback"}`` (a rollback also gives ``"factor"``, the learning rate's or the
    hyperparameter step's new multiplier). :meth:`as_dict` / :meth:`from_dict` convert to and from plain
    containers (a checkpoint that loads with ``torch.load(..., weights_only=True)``).

    Args:
        step: the weight step of each record.
        train_loss: per member, the training loss at each record (``None`` once diverged or non-finite).
        val_loss: per member, the validation loss at each record.
        test_loss: per member, the test loss at each record.
        hparams: per hyperparameter, per member, the mean natural value at each record.
        diverged_at: per member, the step it went non-finite, else ``None``.
        seconds: the wall-clock time spent in :meth:`OnlineTuner.run`.
        events: the divergences the loop handled (see above).
    """

    step: list[int] = field(default_factory=list)
    train_loss: list[list[float | None]] = field(default_factory=list)
    val_loss: list[list[float | None]] = field(default_factory=list)
    test_loss: list[list[float | None]] = field(default_factory=list)
    hparams: dict[str, list[list[float | None]]] = field(default_factory=dict)
    diverged_at: list[int | None] = field(default_factory=list)
    seconds: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The history as plain lists, dicts, numbers and strings (a deep copy)."""
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | History) -> History:
        """Inverse of :meth:`as_dict` (a :class:`History` is copied as it is, for old checkpoints).

        Args:
            d: a dictionary from :meth:`as_dict`, or a :class:`History`.

        Returns:
            A new :class:`History` (a deep copy).
        """
        if isinstance(d, History):
            return copy.deepcopy(d)
        return cls(**copy.deepcopy(dict(d)))


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float | None, population: int | None = None) -> list[Tensor]:
    """Scale gradients so that their joint 2-norm (per member, with a leading ``population`` axis) is <= ``max_norm``.

    ``g * min(1, max_norm / (||g|| + 1e-6))``, differentiably: ``torch.nn.utils.clip_grad_norm_``
    (AWD-LSTM's clipping, Merity et al. 2018; Clarke et al. on PTB). ``None`` returns them unchanged.

    Args:
        grads: the gradients, one per parameter tensor (each of shape ``(P, ...)`` with ``population``).
        max_norm: the largest joint norm (> 0), or ``None`` for no clipping.
        population: P, the size of the leading member axis, or ``None`` for one model (one joint norm).

    Returns:
        The clipped gradients, in the order of ``grads``.

    Raises:
        ValueError: when ``max_norm`` is not positive.
    """
    if max_norm is None:
        return list(grads)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    if population is None:
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))  # type: ignore[arg-type]  # sum() of no tensors is 0; grads is never empty
        factor = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        return [g * factor for g in grads]
    norms = sum(g.reshape(population, -1).pow(2).sum(1) for g in grads).sqrt()  # type: ignore[union-attr]  # as above
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    return [g * pop.per_member(factor, g) for g in grads]


@dataclass
class SharedGradient:
    """A hyperparameter step's training gradient, kept for the next weight step when it is that step's.

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

    **Opt-in** (``TunerConfig(share_gradient=True)``, ``bilevel.Tuner(share_gradient=True)``), because the
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
    ) -> SharedGradient | None:
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

    def follow(self, tuner: OnlineTuner, old: Tree) -> SharedGradient | None:
        """This entry for ``tuner.params`` after the sync-free freeze rebuilt them from ``old`` (``None`` if stale).

        On the sync-free path (:meth:`OnlineTuner._mark`) every marking rebuilds the weights with
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


def scale_lr(rule: Any, factor: float) -> Any:
    """``rule`` with its learning rate(s) multiplied by ``factor`` (a torch.optim optimiser: every group's, in place).

    Used by ``on_divergence="rollback"`` when the learning rate is not in the hyperparameter space. Raises
    ``ValueError`` for a rule without a learning rate it can reach.

    Args:
        rule: an update rule: a dataclass with an ``lr`` field, a wrapper with fixed per-parameter values, or a
            rule holding a ``torch.optim`` optimiser.
        factor: the multiplier of the learning rate(s).

    Returns:
        The rule with the scaled learning rate(s): a new one, or ``rule`` itself for a ``torch.optim`` optimiser.

    Raises:
        ValueError: when the rule's learning rate cannot be reached.
    """
    optimizer = getattr(rule, "optimizer", None)
    if isinstance(optimizer, torch.optim.Optimizer):
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        return rule
    inner = getattr(rule, "rule", None)  # a wrapper holding fixed per-parameter values (updates.WithDefaults)
    values = getattr(rule, "values", None)
    if inner is not None and isinstance(values, Mapping):
        lr = values.get("lr")
        scaled = {**values, "lr": {k: v * factor for k, v in lr.items()}} if isinstance(lr, Mapping) else values
        return type(rule)(scale_lr(inner, factor), scaled)
    if is_dataclass(rule) and hasattr(rule, "lr"):
        return replace(rule, lr=rule.lr * factor)  # type: ignore[type-var]
    raise ValueError(
        f"on_divergence='rollback' cannot shrink the learning rate of {type(rule).__name__}: put 'lr' in the "
        "hyperparameter space (tuned or not)"
    )


def _zeros_as(x: Any) -> Any:
    """Zeros shaped like the tensors of a (nested) state entry."""
    if isinstance(x, Tensor):
        return torch.zeros_like(x)
    if isinstance(x, Mapping):
        return {k: _zeros_as(v) for k, v in x.items()}
    return x


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


class OnlineTuner:
    """Algorithm 1 on one model or a stacked population (see the module docstring for the maths).

    Args:
        params: weights, each of shape (P, ...) when ``stacked`` (the default), else one model's.
        raw: raw hyperparameters for ``space`` (shape (P, ...) when stacked).
        space: the hyperparameter parametrisation (``None``: the raw tensors are the hyperparameters, any keys).
        rule: the weight update (e.g. ``updates.SGD()``; a ``updates.TorchOptimizer`` for ``torch.optim``).
        train_loss, val_loss: ``loss(params, natural_hparams, batch)``; per member (shape (P,)) when stacked
            (build them with :func:`bilevel.population.vmap_loss`), a scalar otherwise.
        update_form: names of the hyperparameters passed to ``rule`` (all others are loss-form).
        penalty: optional loss-form term ``(params, natural_hparams) -> (P,) or ()`` added to the training loss.
        config: :class:`TunerConfig`.
        test_loss: for :meth:`record` (default ``val_loss``).
        callbacks: objects with any of ``on_weight_step(tuner)``, ``on_interval(tuner)``, ``on_record(tuner)``,
            ``state_dict()``/``load_state_dict(sd)`` (:mod:`bilevel.callbacks`).
        stacked: whether tensors carry a leading population axis.
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        raw: Mapping[str, Tensor],
        space: HyperParameterSpace | None,
        rule: UpdateRule,
        train_loss: Loss,
        val_loss: Loss,
        *,
        update_form: Sequence[str] = (),
        penalty: Penalty | None = None,
        config: TunerConfig | None = None,
        test_loss: Loss | None = None,
        callbacks: Iterable[Any] = (),
        stacked: bool = True,
    ) -> None:
        self.cfg = cfg = config or TunerConfig()
        cfg.validate()
        names = space.names if space is not None else list(raw)
        unknown = [n for n in list(cfg.tuned) + list(update_form) if n not in names]
        if unknown:
            raise ValueError(f"hyperparameters {unknown} are not in the space {names}")
        if space is not None:
            space.check(raw)
        self.update_form = tuple(update_form)
        not_rule = [n for n in self.update_form if n not in rule.hyperparameters]
        if not_rule:
            raise ValueError(
                f"update-form hyperparameters {not_rule} are not hyperparameters of "
                f"{type(rule).__name__} ({list(rule.hyperparameters)})"
            )
        undeclared = [n for n in cfg.tuned if n in rule.hyperparameters and n not in self.update_form]
        if undeclared and penalty is None:
            raise ValueError(
                f"tuned hyperparameters {undeclared} are hyperparameters of {type(rule).__name__} but not "
                "declared update-form (update_form=...): the rule would never see them"
            )
        differentiable = getattr(rule, "differentiable", True)
        if not differentiable and (
            cfg.mode in ("unroll", "baydin") or not cfg.warm_start or (cfg.mode == "ift" and cfg.implicit == "update")
        ):
            raise ValueError(
                f"{type(rule).__name__} steps the weights without a graph: it supports mode='ift' with "
                "implicit='loss' (IFT on the training loss) or mode='none', warm start only"
            )
        if cfg.implicit == "loss" and cfg.mode == "ift":
            in_rule = [n for n in cfg.tuned if n in self.update_form]
            if in_rule:
                raise ValueError(
                    "implicit='loss' differentiates dL_T/dw = 0, so tuned hyperparameters must be "
                    f"loss-form; {in_rule} are update-form and would get no implicit term"
                )
        self.space, self.rule, self.penalty = space, rule, penalty
        self.train_loss, self.val_loss = train_loss, val_loss
        self.test_loss = test_loss or val_loss
        self.callbacks = list(callbacks) + default_callbacks()
        self.stacked = stacked
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.initial_params = {k: v.clone() for k, v in self.params.items()}
        self.raw = {k: v.detach().clone() for k, v in raw.items()}
        self.P = pop.size(self.params) if stacked else 1
        self.tuned_keys = [k for k in self.raw if k in cfg.tuned or k.split("/", 1)[0] in cfg.tuned]
        self.hyper_opt = (
            cfg.hyper_optimizer([self.raw[k].requires_grad_() for k in self.tuned_keys], lr=cfg.hyper_lr)
            if self.tuned_keys and cfg.mode != "none"
            else None
        )
        self.state = rule.init_state(self.params)
        self.device = next(iter(self.params.values())).device
        self.alive = torch.ones(self.P, dtype=torch.bool, device=self.device)
        self.t = 0
        self.history = History(diverged_at=[None] * self.P)
        # the step each member diverged at (-1: alive), kept on the device so that marking a divergence
        # needs no host-device synchronisation (:meth:`_mark`); copied into ``history`` when it is read
        self._diverged_t = torch.full((self.P,), -1, dtype=torch.long, device=self.device)
        self.sync_free = self.device.type != "cpu"  # on a CPU a synchronisation costs nothing
        self._window: list[tuple[Tree, Any, Any]] = []  # (w, state, batch) of the last i steps, for unrolling
        self._prev: tuple[Tree, Any] | None = None  # (w, state) before the last step, for Baydin
        self.last_losses: Tensor | None = None  # training losses of the last weight step (for callbacks)
        self.solver = cfg.solver if cfg.solver is not None else Neumann(cfg.lookback, alpha=1.0, divergence="ignore")
        self._shared: SharedGradient | None = None  # the last hyperparameter step's gradient, for the next step
        self.rolled_back: Tensor | None = None  # (P,) members whose last weight step was rolled back, else None
        self._rollbacks = [0] * self.P  # rollbacks per member (on_divergence="rollback")
        # per-member multiplier of the hyperparameter step (rollback shrinks it after a non-finite hypergradient)
        self._hyper_scale = torch.ones(self.P, dtype=torch.float64)
        self._good: tuple[Tree, Any] = (self.params, self.state)  # rollback's target: see weight_step
        #: whether a flag computed on this process's data holds on any process (data-parallel training sets an
        #: all-reduce here, so that every rank takes the same branch; one process: the flag itself)
        self.any_rank: Callable[[bool], bool] = lambda flag: flag
        self._best_loss = torch.full((self.P,), math.inf, dtype=torch.float64)  # lowest training loss seen
        self.snapshot: Tensor | None = None

    # ------------------------------------------------------------------ the update map u(lambda, w)

    def _per_member(self, value: Tensor, like: Tensor) -> Tensor:
        return pop.per_member(value, like) if self.stacked else value.reshape(value.shape[1:] if value.dim() else ())

    def natural(self, raw: Mapping[str, Tensor]) -> dict[str, Any]:
        """Natural hyperparameter values (``space.natural``; the raw tensors themselves without a space).

        Args:
            raw: the flat raw dict.

        Returns:
            ``{hp_name: natural value}`` (see :meth:`bilevel.hparams.HyperParameterSpace.natural`).
        """
        return self.space.natural(raw) if self.space is not None else dict(raw)

    def _rule_hparams(self, nat: Mapping[str, Any], params: Mapping[str, Tensor]) -> dict[str, Any]:
        """Natural update-form values, each viewed to broadcast against the (P, ...) parameters."""
        out: dict[str, Any] = {}
        for name in self.update_form:
            v = nat[name]
            if not self.stacked:
                out[name] = v
            elif isinstance(v, Tensor):
                out[name] = {k: pop.per_member(v, p) for k, p in params.items()}
            else:
                out[name] = {k: pop.per_member(v[k], p) for k, p in params.items() if k in v}
        return out

    def training_objective(self, params: Tree, raw: Mapping[str, Tensor], batch: Any) -> tuple[Tensor, Tensor]:
        """``(sum of training losses + penalty, per-member training losses)`` at raw hyperparameters ``raw``.

        Args:
            params: the weights (shape ``(P, ...)`` when stacked).
            raw: the flat raw hyperparameters.
            batch: the training context.

        Returns:
            ``(total, losses)``: a 0-d tensor, and the training losses, shape ``(P,)`` (stacked) or ``()``.
        """
        nat = self.natural(raw)
        losses = self.train_loss(params, nat, batch)
        total = losses.sum()
        if self.penalty is not None:
            total = total + self.penalty(params, nat).sum()
        return total, losses

    def _gradient(
        self, params: Tree, raw: Mapping[str, Tensor], batch: Any, create_graph: bool
    ) -> tuple[list[Tensor], Tensor]:
        """(dL_T/dw of the summed training objective, per-member training losses) at ``params``."""
        total, losses = self.training_objective(params, raw, batch)
        return list(torch.autograd.grad(total, list(params.values()), create_graph=create_graph)), losses

    def _apply_rule(
        self, params: Tree, grads: Sequence[Tensor], raw: Mapping[str, Tensor], state: Any
    ) -> tuple[Tree, Any]:
        """(u, new_state): the update rule on (clipped) training gradients ``grads``."""
        grads = clip_grad_norm(grads, self.cfg.grad_clip, self.P if self.stacked else None)
        nat = self.natural(raw) if self.update_form else {}
        return self.rule(params, dict(zip(params, grads)), self._rule_hparams(nat, params), state)

    def _step_map(
        self, params: Tree, raw: Mapping[str, Tensor], batch: Any, state: Any, create_graph: bool
    ) -> tuple[Tree, Any, Tensor]:
        """(u, new_state, per-member training losses) at ``params`` with raw hyperparameters ``raw``."""
        grads, losses = self._gradient(params, raw, batch, create_graph)
        u, new_state = self._apply_rule(params, grads, raw, state)
        return u, new_state, losses

    def weight_step(self, batch: Any) -> Tensor:
        """One step ``w <- w - u(lambda, w; batch)`` with the current hyperparameters; returns the training losses.

        Right after a hyperparameter step the gradient may be that step's (:class:`SharedGradient`, opt-in).
        A member whose loss or step is non-finite is handled by ``on_divergence`` (see :class:`TunerConfig`):
        ``"raise"`` keeps the weights and optimiser state from before the step; ``"rollback"`` puts the member
        back to its last good state (the last weights at which its training loss was finite and at most
        ``rollback_spike`` times the lowest it has seen, with their optimiser state).

        Args:
            batch: the training context c_t (a batch, or a batch with noise).

        Returns:
            The training losses at the weights before the step (detached), shape ``(P,)`` or ``()``.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when a loss or the step is non-finite.
        """
        w = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        raw = {k: v.detach() for k, v in self.raw.items()}
        shared, self._shared = self._shared, None
        guarded = self.cfg.on_divergence != "record"
        self.rolled_back = None
        refused = None
        with torch.enable_grad():
            reused = shared.take(self, batch) if shared is not None else None
            grads, losses = reused if reused is not None else self._gradient(w, raw, batch, create_graph=False)
            losses = losses.detach()
            if guarded and not getattr(self.rule, "differentiable", True):
                # a torch.optim optimiser updates its own state in place: never step it on a non-finite gradient
                refused = self._nonfinite(losses, dict(zip(w, grads)))
            if refused is not None and bool(refused.any()):
                new, state = dict(self.params), self.state
            else:
                refused = None
                u, state = self._apply_rule(w, grads, raw, self.state)
                stepped = getattr(self.rule, "stepped", None)  # a torch.optim step's own result, bit for bit
                new = dict(stepped) if stepped is not None else {k: (w[k] - u[k]).detach() for k in w}
        if guarded:
            bad = self._nonfinite(losses, new) if refused is None else refused
            if self.cfg.on_divergence == "rollback":  # the last good weights: see TunerConfig.on_divergence
                ok = torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
                mean = torch.where(ok, losses.reshape(self.P, -1).double().mean(dim=1), math.inf)
                self._best_loss = torch.minimum(self._best_loss.to(mean.device), mean)
                ok = ok & (mean <= self.cfg.rollback_spike * self._best_loss)
                gp, gs = self._good
                self._good = (
                    {k: torch.where(self._per_member(ok, v), v, gp[k]) for k, v in self.params.items()},
                    self._where_state(ok, self.state, gs),
                )
                self.snapshot = ok  # (P,) members whose state before this step is now their last good one
            if bool(bad.any()):
                cause = self._cause(batch, losses, "weights" if refused is None else "training gradient")
                if self.cfg.on_divergence == "raise":
                    self._raise(cause)
                gp, gs = self._good
                new = {k: torch.where(self._per_member(bad, v), gp[k], v) for k, v in new.items()}
                state = self._where_state(bad, gs, state)
                self._rollback(bad, cause)
        if self.cfg.mode == "unroll":
            self._window = (self._window + [(_T.detach(self.params), self.state, batch)])[-self.cfg.lookback :]
        self.params = new
        self.state = detach_state(state)
        if not guarded:
            self._mark_diverged(losses, "training loss or weights")
        return losses

    # ------------------------------------------------------------------ divergence

    def _nonfinite(self, losses: Tensor, tree: Mapping[str, Tensor]) -> Tensor:
        """Shape (P,): whether a member's losses or any of its tensors in ``tree`` hold NaN or inf."""
        bad = ~torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
        for v in tree.values():
            bad |= ~torch.isfinite(v.reshape(self.P, -1)).all(dim=1)
        return bad

    def _cause(self, batch: Any, losses: Tensor, otherwise: str, which: str = "training") -> str:
        """What became non-finite first: the data, the loss, or ``otherwise`` (weights, gradient, ...)."""
        bad_data = any(
            isinstance(x, Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())
            for x in torch.utils._pytree.tree_leaves(batch)
        )
        if self.any_rank(bad_data):
            return f"data (the {which} batch holds NaN or inf)"
        if not bool(torch.isfinite(losses).all()):
            return f"{which} loss"
        return otherwise

    def _raise(self, cause: str) -> None:
        """Raise :class:`NonFiniteError` for a weight step that was not taken, naming ``cause`` and the step."""
        advice = (
            "a training batch holds NaN or inf: check the data pipeline"
            if cause.startswith("data")
            else "the training loss is non-finite at finite weights and data: check the loss (log of 0, division "
            "by 0) or lower the learning rate"
            if cause == "training loss"
            else "the weight step overflowed: try a smaller learning rate"
        )
        raise NonFiniteError(
            f"{cause} at weight step {self.t + 1}",
            advice + "; the weights, optimiser state and hyperparameters are those before this step",
            step=self.t + 1,
        )

    def _where_state(self, bad: Tensor, old: Any, new: Any) -> Any:
        """The optimiser state with ``old`` for the members in ``bad`` and ``new`` for the others.

        A buffer present on one side only (a momentum buffer a rule creates on its first step) counts as zeros
        on the other, as the rules read a missing buffer."""
        if isinstance(new, Mapping) or isinstance(old, Mapping):
            old = old if isinstance(old, Mapping) else {}
            new = new if isinstance(new, Mapping) else {}
            out = {}
            for k in [*new, *(k for k in old if k not in new)]:
                a, b = old.get(k), new.get(k)
                out[k] = self._where_state(bad, _zeros_as(b) if a is None else a, _zeros_as(a) if b is None else b)
            return out
        if isinstance(new, Tensor) and isinstance(old, Tensor):
            if not self.stacked:
                return old if bool(bad.reshape(())) else new
            if new.dim() == 0 or new.shape[0] != self.P:
                return new
            return torch.where(pop.per_member(bad, new), old, new)
        return new

    def _event(self, member: int, what: str, action: str, **extra: Any) -> None:
        self._history.events.append({"step": self.t, "member": member, "what": what, "action": action, **extra})

    def _rollback(self, bad: Tensor, cause: str) -> None:
        """Members in ``bad`` keep their last finite state (done by the caller); shrink the step that caused it.

        A weight-step divergence multiplies the member's learning rate by ``rollback_factor`` (unless the data
        were non-finite: then the batch is only skipped); after ``max_rollbacks`` the member is frozen."""
        self.rolled_back = bad
        members = torch.nonzero(bad).flatten().tolist()
        data = cause.startswith("data")
        for i in members:
            self._rollbacks[i] += 1
        if not data:
            self._shrink_lr(bad, self.cfg.rollback_factor)
        for i in members:
            factor = None if data else self.cfg.rollback_factor ** self._lr_shrinks(i)
            self._event(i, cause, "rollback", lr_factor=factor)
        spent = [i for i in members if self._rollbacks[i] > self.cfg.max_rollbacks]
        if spent:
            if not self.stacked:
                raise NonFiniteError(
                    f"{cause} at weight step {self.t + 1}",
                    f"still non-finite after {self.cfg.max_rollbacks} rollbacks; "
                    "the weights and optimiser state are those before this step",
                    step=self.t + 1,
                )
            dead = torch.zeros_like(bad)
            dead[spent] = True
            self._mark(dead, f"{cause} (after {self.cfg.max_rollbacks} rollbacks)")

    def _lr_shrinks(self, member: int) -> int:
        return sum(1 for e in self._history.events if e["member"] == member and e.get("lr_factor") is not None) + 1

    def _shrink_lr(self, bad: Tensor, factor: float) -> None:
        """Multiply the learning rate of the members in ``bad`` by ``factor`` (the others' stays bit for bit)."""
        if self.space is not None and "lr" in self.space:
            self.rescale("lr", torch.where(bad.cpu(), factor, 1.0).to(torch.float64))
            return
        self.rule = scale_lr(self.rule, factor)

    # ------------------------------------------------------------------ hypergradients

    def _split(self) -> tuple[Tree, Tree]:
        tuned = {k: self.raw[k].detach() for k in self.tuned_keys}
        return tuned, {k: v.detach() for k, v in self.raw.items() if k not in tuned}

    def hypergradient(self, train_batch: Any, val_batch: Any) -> Tree:
        """dL_V/dlambda of the tuned raw hyperparameters at the current weights (mode ``ift`` or ``unroll``).

        Args:
            train_batch: the training context of the residual (the last weight step's).
            val_batch: the validation context of L_V.

        Returns:
            ``{raw key: hypergradient}`` for every tuned raw key, shapes of the raw values.

        Raises:
            ValueError: before the first weight step, or in a mode other than ``ift`` and ``unroll``.
            NonFiniteError: with ``on_divergence="raise"``, when a quantity is non-finite.
        """
        if self.t == 0:
            raise ValueError("take at least one weight step before a hypergradient")
        tuned, fixed = self._split()
        check = self.cfg.on_divergence == "raise"

        def outer(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
            return self.val_loss(p, self.natural({**fixed, **h}), val_batch).sum()

        if self.cfg.mode == "unroll":
            return replay_hypergradient(outer, self._step_map, self._window, tuned, fixed, check=check)
        if self.cfg.mode != "ift":
            raise ValueError(f"no IFT/unrolled hypergradient in mode {self.cfg.mode!r}")
        if self.cfg.implicit == "loss":

            def inner(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
                return self.training_objective(p, {**fixed, **h}, train_batch)[0]

            return hypergradient(outer, self.params, tuned, inner=inner, solver=self.solver, check=check)
        state = self.state

        def update(p: Tree, h: Mapping[str, Tensor]) -> Tree:
            raw = {**fixed, **h}
            rng = SharedGradient.rng_state(self.device) if self.cfg.share_gradient else None
            grads, losses = self._gradient(p, raw, train_batch, create_graph=True)
            if rng is not None:
                self._shared = SharedGradient.offer(self, train_batch, grads, losses, h, rng)
            return self._apply_rule(p, grads, raw, state)[0]

        return hypergradient(outer, self.params, tuned, update=update, solver=self.solver, check=check)

    def hyper_step(self, train_batch: Any, val_batch: Any) -> Tree | None:
        """One hyperparameter step along :meth:`hypergradient` (``None`` when nothing is tuned).

        With ``on_divergence="raise"`` a non-finite quantity raises :class:`NonFiniteError` naming it (the
        validation data, the validation loss, a product, the hypergradient) and the weight step it followed,
        before anything is changed.

        Args:
            train_batch: the training context of the residual (the last weight step's).
            val_batch: the validation context of L_V.

        Returns:
            The hypergradient applied, or ``None`` when nothing is tuned.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when a quantity is non-finite.
        """
        if self.hyper_opt is None:
            return None
        try:
            hg = self.hypergradient(train_batch, val_batch)
        except NonFiniteError as e:
            where = f"at the hyperparameter step after weight step {self.t}"
            cause = self._cause(val_batch, torch.zeros(()), e.quantity, which="validation")
            if cause == e.quantity:
                cause = self._cause(train_batch, torch.zeros(()), e.quantity)
            raise NonFiniteError(
                f"{cause} {where}",
                "try a smaller hyper_lr, or a solver with fewer steps or damping; the weights and "
                "hyperparameters are those before this step",
                step=self.t,
            ) from e
        self.apply_hypergradient(hg)
        return hg

    def _baydin_step(self, batch: Any) -> None:
        """Baydin et al. (2018): d L_T(w_{t+1}) / d lambda through the step just taken, every step."""
        tuned, fixed = self._split()
        w_prev, state = self._prev  # type: ignore[misc]

        def outer(p: Tree, h: Mapping[str, Tensor]) -> Tensor:
            return self.train_loss(p, self.natural({**fixed, **h}), batch).sum()

        update = lambda p, h: self._step_map(p, {**fixed, **h}, batch, state, True)[0]  # noqa: E731
        hg = unrolled_hypergradient(
            outer, w_prev, tuned, update=update, steps=1, check=self.cfg.on_divergence == "raise"
        )
        self.apply_hypergradient(hg)

    def apply_hypergradient(self, hg: Mapping[str, Tensor]) -> None:
        """One step of the hyperparameter optimiser along ``hg``.

        Members with a non-finite hypergradient are marked diverged, or (``on_divergence="rollback"``) skip
        this step and have their later hyperparameter steps scaled by ``rollback_factor`` (the raw change
        ``lambda_new - lambda_old`` is multiplied by the member's scale: for Adam or SGD, the same as a
        smaller hyper learning rate).

        Args:
            hg: ``{raw key: hypergradient}`` of the tuned raw hyperparameters.

        Raises:
            NonFiniteError: with ``on_divergence="raise"``, when the hypergradient is non-finite.
        """
        rollback = self.cfg.on_divergence == "rollback"
        skip = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        for g in hg.values():
            skip |= ~torch.isfinite(g).reshape(self.P, -1).all(dim=1)
        if rollback:
            if bool(skip.any()):
                members = torch.nonzero(skip).flatten().tolist()
                self._hyper_scale[members] *= self.cfg.rollback_factor
                for i in members:
                    self._event(i, "hypergradient", "rollback", hyper_factor=float(self._hyper_scale[i]))
        else:
            self._mark(skip, "hypergradient")
        go = self.alive & ~skip
        for k, g in hg.items():
            self.raw[k].grad = torch.where(self._per_member(go, g), g, torch.zeros_like(g))
        scaled = rollback and bool((self._hyper_scale != 1).any())
        before = {k: self.raw[k].detach().clone() for k in hg} if scaled else {}
        self.hyper_opt.step()  # type: ignore[union-attr]
        self.hyper_opt.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        if scaled:
            s = self._hyper_scale.to(self.device)
            with torch.no_grad():
                for k, old in before.items():
                    r = self.raw[k]
                    sm = self._per_member(s, r).to(r.dtype)
                    r.copy_(torch.where(sm == 1, r, old + sm * (r - old)))

    # ------------------------------------------------------------------ bookkeeping

    def _mark_diverged(self, losses: Tensor, what: str) -> None:
        bad = ~torch.isfinite(losses.reshape(self.P, -1)).all(dim=1)
        for v in self.params.values():
            bad |= ~torch.isfinite(v).reshape(self.P, -1).all(dim=1)
        self._mark(bad, what)

    @property
    def history(self) -> History:
        """Trajectories and divergence steps (reading it synchronises with the device once)."""
        h = self._history
        if self.sync_free:
            for i, t in enumerate(self._diverged_t.tolist()):
                if t >= 0 and h.diverged_at[i] is None:
                    h.diverged_at[i] = t
                    h.events.append({"step": t, "member": i, "what": "non-finite value", "action": "frozen"})
        return h

    @history.setter
    def history(self, h: History) -> None:
        """Replace the history.

        Args:
            h: the new history.
        """
        self._history = h

    def _mark(self, bad: Tensor, what: str) -> None:
        """Mark the members in ``bad`` (shape (P,)) that are still alive as diverged at step ``t``.

        On a CPU (and with ``on_divergence="raise"``) this asks whether any member is new; with
        ``sync_free`` (on an accelerator) it never waits for the device: the freezing below runs every
        time and is a no-op for members that did not diverge."""
        new = bad & self.alive
        if self.cfg.on_divergence == "raise" or not self.sync_free:
            if not bool(new.any()):
                return
            if self.cfg.on_divergence == "raise":
                raise NonFiniteError(
                    f"{what} at step {self.t}",
                    "the weights or hyperparameters diverged: try a smaller learning rate or hyper_lr",
                )
            for i in torch.nonzero(new).flatten().tolist():
                self._history.diverged_at[i] = self.t
                self._event(i, what, "frozen")
        else:
            self._diverged_t = torch.where(new, torch.full_like(self._diverged_t, self.t), self._diverged_t)
        self.alive = self.alive & ~new
        # freeze diverged members at finite values so they cannot disturb anything downstream
        old = self.params
        with torch.no_grad():
            self.params = {
                k: torch.where(self._per_member(self.alive, v), v, self.initial_params[k])
                for k, v in self.params.items()
            }
            self.state = self._zero_dead(self.state)
        if self.sync_free and self._shared is not None:
            self._shared = self._shared.follow(self, old)

    def _zero_dead(self, state: Any) -> Any:
        if isinstance(state, Tensor):
            if not self.stacked:
                return torch.where(self.alive.reshape(()), state, torch.zeros_like(state)) if state.dim() else state
            if state.dim() == 0 or state.shape[0] != self.P:
                return state
            return torch.where(pop.per_member(self.alive, state), state, torch.zeros_like(state))
        if isinstance(state, Mapping):
            return {k: self._zero_dead(v) for k, v in state.items()}
        return state

    def _cold_restart(self, batches: Callable[[], Any]) -> None:
        self.params = {k: v.clone() for k, v in self.initial_params.items()}
        self.state = self.rule.init_state(self.params)
        self._good = (self.params, self.state)
        for _ in range(self.cfg.cold_steps):
            self.weight_step(batches())

    def record(self, train: Any, val: Any, test: Any | None) -> None:
        """Append the losses at the given batches and the hyperparameters' mean natural values to the history.

        Args:
            train: the training batch, or ``None`` to skip the training loss.
            val: the validation batch, or ``None`` to skip the validation loss.
            test: the test batch, or ``None`` to skip the test loss.
        """
        h = self.history
        h.step.append(self.t)
        with torch.no_grad():
            nat = self.natural({k: v.detach() for k, v in self.raw.items()})
            for fn, batch, store in (
                (self.train_loss, train, h.train_loss),
                (self.val_loss, val, h.val_loss),
                (self.test_loss, test, h.test_loss),
            ):
                if batch is not None:
                    _append(store, fn(self.params, nat, batch).reshape(self.P), self.alive)
            for name, v in self.describe().items():
                _append(h.hparams.setdefault(name, []), v, self.alive)
        self._call("on_record")

    def describe(self) -> dict[str, Tensor]:
        """Per-member mean natural value of every hyperparameter, shape (P,)."""
        with torch.no_grad():
            nat = self.natural(self.raw)
        out = {}
        for name, v in nat.items():
            vals = [v] if isinstance(v, Tensor) else list(v.values())
            flat = torch.cat([t.detach().reshape(self.P, -1).to(torch.float64) for t in vals], dim=1)
            out[name] = flat.mean(dim=1)
        return out

    def _call(self, event: str) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self)

    # ------------------------------------------------------------------ the loop

    def step(self, batch: Any) -> Tensor:
        """One counted weight step (``t += 1``, callbacks' ``on_weight_step``); returns the training losses.

        With :meth:`hyper_step` this lets a study write its own schedule around the same loop.

        Args:
            batch: the training context c_t.

        Returns:
            The training losses (see :meth:`weight_step`).
        """
        if self.cfg.mode == "baydin":
            self._prev = (_T.detach(self.params), self.state)
        losses = self.weight_step(batch)
        self.t += 1
        self.last_losses = losses
        self._call("on_weight_step")
        return losses

    def run(
        self,
        steps: int,
        train_batches: Callable[[], Any],
        val_batches: Callable[[], Any],
        *,
        record_batches: tuple[Any, Any, Any | None] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> History:
        """Take ``steps`` weight steps from the current step, with a hyperparameter step every T.

        ``train_batches()`` / ``val_batches()`` return the next context (a batch, or a batch with noise).

        Args:
            steps: the number of weight steps (>= 0).
            train_batches: returns the next training context.
            val_batches: returns the next validation context.
            record_batches: ``(train, val, test)`` batches passed to :meth:`record` every ``record_every`` steps,
                or ``None`` for no records.
            progress: called with 1 after every weight step (e.g. a progress bar's ``update``), or ``None``.

        Returns:
            The :attr:`history`.

        Raises:
            ValueError: when ``steps < 0``.
        """
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        start = time.perf_counter()
        cfg = self.cfg
        for _ in range(steps):
            batch = train_batches()
            self.step(batch)
            if cfg.mode == "baydin" and self.hyper_opt is not None:
                self._baydin_step(batch)
            elif self.t % cfg.interval == 0:
                self._call("on_interval")
                if self.hyper_opt is not None and cfg.mode in ("ift", "unroll"):
                    if not cfg.warm_start:
                        self._cold_restart(train_batches)
                    self.hyper_step(batch, val_batches())
            if record_batches is not None and self.t % cfg.record_every == 0:
                self.record(*record_batches)
            if progress is not None:
                progress(1)
        self.history.seconds += time.perf_counter() - start
        return self.history

    def rescale(self, name: str, factor: float | Tensor) -> None:
        """Multiply the *natural* value of hyperparameter ``name`` by ``factor`` (a float or shape (P,)).

        ``lambda <- T^{-1}(clamp_into_domain(T(raw) * factor))`` for every raw key of ``name`` (all
        elements of a per-weight one), in float64. Used by Random (x LR)
        (:class:`bilevel.callbacks.RandomLRMultiplier`) and by PBT + ours (Clarke et al. 2022,
        appendix B.8.2: a PBT mutation old -> new is applied to the tuner's *current* value as the
        ratio new / old). A result on or past a finite end of the domain (a momentum pushed to 1 or
        beyond) is moved just inside it, so the raw value stays finite. The hyperparameter
        optimiser's state is kept.

        Args:
            name: the hyperparameter, a name in the space.
            factor: a positive finite factor, or one per member (shape ``(P,)``).

        Raises:
            ValueError: when ``name`` is not in the space, or a factor is not positive and finite or
                ``factor`` has neither 1 nor P values.
        """
        if self.space is None or name not in self.space:
            raise ValueError(f"cannot rescale {name!r}: not in the space {self.space.names if self.space else []}")
        h = self.space[name]
        f = torch.as_tensor(factor, dtype=torch.float64).reshape(-1)
        if f.numel() not in (1, self.P) or not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
            raise ValueError(
                f"rescale factor for {name!r} must be positive and finite, one value or one per member "
                f"({self.P}), got {factor!r}"
            )
        f = f.expand(self.P)
        with torch.no_grad():
            for k in [k for k in self.raw if k.split("/", 1)[0] == name]:
                r = self.raw[k]
                fm = self._per_member(f.to(r.device), r)
                nat = h.transform.forward(r.double()) * fm
                self.raw[k].copy_(torch.where(fm == 1, r, h.to_raw(nat).to(r.dtype)))  # factor 1: bit for bit

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Every piece of loop state: weights, hyperparameters, optimiser states, unrolling window, Baydin's
        previous step, divergence, history, solver and callback states."""
        return {
            "params": self.params,
            "initial_params": self.initial_params,
            "raw": {k: v.detach() for k, v in self.raw.items()},
            "state": self.state,
            "alive": self.alive,
            "t": self.t,
            "history": self.history.as_dict(),
            "rollbacks": list(self._rollbacks),
            "hyper_scale": self._hyper_scale.clone(),
            "best_loss": self._best_loss.clone(),
            "good": (self._good[0], self._good[1]) if self.cfg.on_divergence == "rollback" else None,
            "window": self._window,
            "prev": self._prev,
            "hyper_opt": self.hyper_opt.state_dict() if self.hyper_opt else None,
            "rule": self.rule.state_dict() if hasattr(self.rule, "state_dict") else None,
            "solver": self.solver.state_dict() if hasattr(self.solver, "state_dict") else None,
            "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in self.callbacks],
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore the loop from :meth:`state_dict` (a loop built with the same arguments).

        Args:
            sd: a dictionary from :meth:`state_dict`.
        """
        self._shared = None
        self.params, self.initial_params, self.state = dict(sd["params"]), dict(sd["initial_params"]), sd["state"]
        with torch.no_grad():
            for k, v in sd["raw"].items():
                self.raw[k].copy_(v)
        self.alive, self.t, self.history = sd["alive"], sd["t"], History.from_dict(sd["history"])
        self._rollbacks = list(sd.get("rollbacks", [0] * self.P))
        self._hyper_scale = sd.get("hyper_scale", torch.ones(self.P, dtype=torch.float64)).clone()
        self._best_loss = sd.get("best_loss", torch.full((self.P,), math.inf, dtype=torch.float64)).clone()
        good = sd.get("good")
        self._good = (dict(good[0]), good[1]) if good is not None else (self.params, self.state)
        at = [-1 if d is None else d for d in self._history.diverged_at]
        self._diverged_t = torch.tensor(at, dtype=torch.long, device=self.device)
        self._window, self._prev = list(sd.get("window", [])), sd.get("prev")
        if self.hyper_opt is not None:
            self.hyper_opt.load_state_dict(sd["hyper_opt"])
        if sd.get("rule") is not None:
            self.rule.load_state_dict(sd["rule"])  # type: ignore[attr-defined]
        if sd.get("solver") is not None:
            self.solver.load_state_dict(sd["solver"])  # type: ignore[attr-defined]  # only a stateful solver saved one
        for cb, s in zip(self.callbacks, sd.get("callbacks", [])):
            if s is not None:
                cb.load_state_dict(s)


def _append(store: list[list[float | None]], values: Tensor, alive: Tensor) -> None:
    if not store:
        store.extend([] for _ in range(values.shape[0]))
    for i, (v, a) in enumerate(zip(values.tolist(), alive.tolist())):
        store[i].append(v if a and math.isfinite(v) else None)
