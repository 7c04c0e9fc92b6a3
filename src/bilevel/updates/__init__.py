"""Differentiable weight-update maps ``u(lambda, w)``.

Clarke et al. (2022), "Scalable One-Pass Optimisation of High-Dimensional
Weight-Update Hyperparameters by Implicit Differentiation" (ICLR 2022), write
every optimiser step as

.. math::  w_i = w_{i-1} - u(\\lambda, w_{i-1})                       \\quad (4)

for a differentiable *update function* ``u`` of the hyperparameters ``lambda``
(learning rate, momentum, weight decay, Adam's betas, ...) and the weights.
The approximate best-response Jacobian (their eq. 6, converging to eq. 7,
``dw*/dlambda ~ -(du/dw)^{-1} du/dlambda``) then only needs derivatives of
``u``. This module provides ``u`` for the optimisers of ``torch.optim``:

* :class:`SGD` (momentum, dampening, Nesterov, L2 weight decay),
* :class:`Adam` (L2 weight decay added to the gradient),
* :class:`AdamW` (decoupled weight decay),
* :class:`RMSprop` (momentum, centred variant, L2 weight decay),

each reproducing ``torch.optim`` step by step (to round-off), while keeping the
update a pure function of ``(params, grads, hparams, state)``:

* the result carries autograd graph to the hyperparameter tensors **and** to
  ``params`` and ``grads`` (nothing is detached inside), so ``du/dw`` (through
  the gradient) and ``du/dlambda`` are both available;
* only out-of-place tensor ops are used, with no ``.item()`` and no Python
  branch on tensor values, so the rules work under ``torch.func.grad``,
  ``vjp``, ``jvp`` and ``vmap``;
* optimiser state (momentum buffers, Adam moments, the step counter) is
  returned *with* graph, so several steps can be differentiated through
  (unrolled differentiation). Clarke et al. (Appendix A.4) instead treat the
  state as a constant: call :func:`detach_state` between steps for that.

Hyperparameter granularity
--------------------------
The dataclass fields of a rule are its default hyperparameters. ``hparams``
given to ``__call__`` override them by name, and each value may be

* a tensor broadcastable to every parameter (typically a 0-d tensor: one value
  shared by all weights), or
* a mapping ``{param_name: tensor}`` holding, per parameter tensor, either one
  scalar (per-tensor hyperparameters, like ``torch.optim`` parameter groups)
  or a tensor of the parameter's shape (one value per weight: Clarke et al.'s
  "HDLR" high-dimensional learning rates, Section 4).

``torch.optim`` parameter groups and state
------------------------------------------
:func:`twin` turns a ``torch.optim`` optimiser with parameter groups (e.g. a backbone and a head
learning rate, no decay on biases) into its twin: the hyperparameters that differ across groups become
per-parameter mappings, which :class:`WithDefaults` applies wherever the caller does not tune them.
:func:`state_from_torch` and :func:`state_to_torch` carry the optimiser's momentum buffers, moments and
step counts into the twin's state and back, so that a plain ``torch.optim`` loop continues where the
twin stopped (and vice versa), step for step.

Structural options (``nesterov``, ``centered``) are Python booleans, not
hyperparameters. Whether a momentum buffer is used is also decided
structurally: it is used when the field ``momentum`` is non-zero *or* when
``"momentum"`` is passed in ``hparams`` (the tuned value may then be anything,
including 0).

Package layout (one idea per module; every name is re-exported here, so ``bilevel.updates.X`` is the name
to use):

* :mod:`bilevel.updates.base`: :class:`UpdateRule`, :data:`State`, :data:`HValue`, :func:`resolve`,
  :func:`apply`, :func:`detach_state` and the helpers the rules share;
* :mod:`bilevel.updates.sgd`, :mod:`bilevel.updates.adam`, :mod:`bilevel.updates.rmsprop`: the rules;
* :mod:`bilevel.updates.torch_optimizer`: :class:`TorchOptimizer`;
* :mod:`bilevel.updates.defaults`: :class:`WithDefaults`;
* :mod:`bilevel.updates.torch_twin`: :func:`from_torch`, :class:`TorchTwin`, :func:`twin`;
* :mod:`bilevel.updates.torch_state`: :func:`state_from_torch`, :func:`state_to_torch`.
"""

from __future__ import annotations

from .adam import Adam, AdamW
from .base import HValue, State, UpdateRule, apply, detach_state, resolve
from .clip import clip_grad_norm
from .defaults import WithDefaults
from .rmsprop import RMSprop
from .sgd import SGD
from .torch_optimizer import TorchOptimizer
from .torch_state import state_from_torch, state_to_torch
from .torch_twin import TorchTwin, from_torch, twin
from .torch_twin import TwinRule as TwinRule  # public, though not in __all__ (as before the split)

__all__ = [
    "clip_grad_norm",
    "HValue",
    "State",
    "UpdateRule",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "resolve",
    "apply",
    "detach_state",
    "TorchOptimizer",
    "from_torch",
    "WithDefaults",
    "TorchTwin",
    "twin",
    "state_from_torch",
    "state_to_torch",
]
