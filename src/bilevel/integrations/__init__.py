"""Online hyperparameter tuning inside other trainers: PyTorch Lightning and Hugging Face ``transformers``.

Another trainer owns the training loop: it draws the batches, calls ``backward`` and steps its own
``torch.optim`` optimiser. These integrations add only the *hyperparameter step* of Algorithm 1
(Lorraine et al. 2020; Clarke et al. 2022, Alg. 1) at the trainer's cadence: every T optimiser steps,

.. math::

    \\lambda \\leftarrow \\lambda - \\eta_h \\,\\widehat{\\nabla}_\\lambda L_V,
    \\qquad
    \\frac{dL_V}{d\\lambda} = \\frac{\\partial L_V}{\\partial \\lambda}
        - \\frac{\\partial L_V}{\\partial w}
          \\Big(\\frac{\\partial u}{\\partial w}\\Big)^{-1} \\frac{\\partial u}{\\partial \\lambda},

the implicit-function-theorem hypergradient on the optimiser's update map ``u(lambda, w)`` (the step
``w <- w - u``), Clarke et al. (2022), eq. 4-7, with the inverse approximated by ``lookback`` Neumann
terms (Lorraine et al. 2020, eq. 2-3 and Alg. 3). ``u`` is the optimiser's differentiable twin
(:func:`bilevel.updates.twin`) started from the optimiser's own state
(:func:`bilevel.updates.state_from_torch`), and the step is taken by
:meth:`bilevel.tuner.OnlineTuner.hyper_step`; the tuned values are then written back into the
optimiser's ``param_groups``, where the trainer's next step reads them.

* :mod:`bilevel.integrations.lightning`: :class:`~bilevel.integrations.lightning.HyperTuner`, a Lightning
  ``Callback`` (``pip install "bilevel[lightning]"``);
* :mod:`bilevel.integrations.transformers`: :class:`~bilevel.integrations.transformers.HyperCallback`, a
  ``transformers.TrainerCallback`` tuning a multiplier of the learning-rate schedule and the weight decay
  (``pip install "bilevel[transformers]"``).

Neither is imported by ``import bilevel``; each imports its trainer when it is imported itself, and
constructing a callback without the trainer installed raises an ``ImportError`` naming the extra to install.
"""

from .engine import ModuleLoss, OptimizerHyperStep, parse_tune

__all__ = ["OptimizerHyperStep", "parse_tune", "ModuleLoss"]
