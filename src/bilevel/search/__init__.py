"""Population search on top of the one-pass tuner: Ray Tune trials, ASHA, PBT and Bayesian optimisation.

* :mod:`bilevel.search.ray_tune` -- a population of initialisations as Ray Tune trials (the
  ``clarke`` experiment's ``--backend ray``), ASHA and PBT schedulers over single initialisations
  trained with fixed (``random``) or online-tuned (``ours-wd-lr-m``) hyperparameters, and the PBT
  "ratio" mutation of Clarke et al. (2022), appendix B.8.2.
* :mod:`bilevel.search.bayesopt` -- the Bayesian-optimisation baseline of Clarke et al. (2022),
  appendix B.5 (Optuna's Gaussian-process sampler).

Ray and Optuna are optional (``pip install 'bilevel[ray]'``); nothing here imports them at import
time, and every entry point that needs one raises an ``ImportError`` naming the extra.
"""

from .ray_tune import Interrupted, blocks, check_run_config, clip_to_domains, merge_blocks, pbt_ratios, require

__all__ = ["Interrupted", "blocks", "check_run_config", "clip_to_domains", "merge_blocks", "pbt_ratios", "require"]
