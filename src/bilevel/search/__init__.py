"""Population search over any trainable run: Ray Tune trials, ASHA, PBT and Bayesian optimisation.

* :mod:`bilevel.search.ray_tune` -- a population split into blocks of members, each block a Ray
  Tune trial (:func:`~bilevel.search.ray_tune.run_population`), and ASHA and PBT over single
  members (:func:`~bilevel.search.ray_tune.run_scheduled`), with the PBT "ratio" mutation of
  Clarke et al. (2022), appendix B.8.2, for runs that tune their own hyperparameters online. The
  runs are built in the trials by a user-supplied factory.
* :mod:`bilevel.search.bayesopt` -- repeated Bayesian optimisation (Optuna's Gaussian-process
  sampler) of a user-supplied evaluation, the repeats evaluated together.

What is searched is the caller's: the Clarke et al. (2022) studies plug their problem in from
``bilevel_studies.clarke.search``. Ray and Optuna are optional (``pip install 'bilevel[ray]'``);
nothing here imports them at import time, and every entry point that needs one raises an
``ImportError`` naming the extra.
"""

from .ray_tune import (
    Interrupted,
    blocks,
    clip_to_domains,
    merge_blocks,
    pbt_ratios,
    require,
    run_population,
    run_scheduled,
)

__all__ = [
    "Interrupted",
    "blocks",
    "clip_to_domains",
    "merge_blocks",
    "pbt_ratios",
    "require",
    "run_population",
    "run_scheduled",
]
